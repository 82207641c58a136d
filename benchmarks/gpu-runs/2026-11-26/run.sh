#!/usr/bin/env bash
# One device session: train three sparsity variants of F concurrently, map the 30
# MoNuSeg images, time F's raw forward speed. Results under $OUT.
SECS=${SECS:-330}
IMAGES=${IMAGES:-.gpu/monuseg}
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/ns/nucleiscope /tmp/run "$OUT"
ln -sfn "$PWD/pipeline" /tmp/ns/nucleiscope/pipeline
ln -sfn "$PWD/jobs" /tmp/ns/nucleiscope/jobs
export PYTHONPATH=/tmp/ns PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, skimage, tifffile, safetensors, PIL, scipy; print('torch', torch.__version__, torch.cuda.is_available())" || exit 3
(while true; do nvidia-smi 2>/dev/null --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> /tmp/run/util.log; sleep 5; done) &
MON=$!
PIDS=""
for v in ${VARIANTS:-07 15 25}; do
  python3 -m nucleiscope.jobs.quick_train --images "$IMAGES" --mpp 0.25 --out /tmp/run/v$v \
    --seconds "$SECS" --sparsity 0.$v --log-every 250 ${EXTRA:-} > /tmp/run/v$v.log 2>&1 &
  PIDS="$PIDS $!"
done
for p in $PIDS; do wait $p; echo "trainer $p exit $?"; done
kill $MON
for v in ${VARIANTS:-07 15 25}; do tail -n 25 /tmp/run/v$v.log; cp /tmp/run/v$v.log /tmp/run/v$v/; tar -C /tmp/run -czf "$OUT/v$v.tgz" v$v; done
cp /tmp/run/util.log "$OUT/util.log"
[ -n "${SKIP_FORWARD:-}" ] || python3 benchmarks/gpu_forward.py --tile-px 512 1024 --batch 1 8 2>&1 | tee "$OUT/forward.txt"
ls -la "$OUT"
