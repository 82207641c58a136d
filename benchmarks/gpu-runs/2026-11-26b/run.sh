#!/usr/bin/env bash
# One device session (self-training stage): students trained on the v07 teacher's
# pseudo-labels (three recipes, all 30 MoNuSeg images, labels read only to score), and a
# clean hold-out fold: a teacher F trained on the first 20 images (sorted), its student,
# both scored on the last 10. Results under $OUT.
IMAGES=${IMAGES:-.gpu/monuseg}
LABELS=${LABELS:-.gpu/labels}
TEACHER=${TEACHER:-benchmarks/gpu-runs/2026-11-26/v07/attention_f.safetensors}
SECS=${SECS:-150}
FOLD_SECS=${FOLD_SECS:-180}
FOLD_N=${FOLD_N:-20}
HOLDOUT=${HOLDOUT:-10}
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/ns/nucleiscope /tmp/run /tmp/fold20 "$OUT"
# Copies, with the committed trainer (.gpu/snap) in case the working tree holds a refactor in progress.
rm -rf /tmp/ns/nucleiscope/pipeline /tmp/ns/nucleiscope/jobs
cp -r "$PWD/pipeline" "$PWD/jobs" /tmp/ns/nucleiscope/
[ -d .gpu/snap ] && cp .gpu/snap/training.py /tmp/ns/nucleiscope/pipeline/ && cp .gpu/snap/quick_train.py /tmp/ns/nucleiscope/jobs/
export PYTHONPATH=/tmp/ns PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, scipy, skimage, tifffile, safetensors; print('torch', torch.__version__, torch.cuda.is_available())" || exit 3
python3 -c "import pandas; print('pandas', pandas.__version__)" || echo "no pandas: scores computed later on CPU"
for f in $(ls "$IMAGES" | sort | head -"$FOLD_N"); do ln -sfn "$(realpath "$IMAGES")/$f" /tmp/fold20/$f; done
(while true; do nvidia-smi 2>/dev/null --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> /tmp/run/util.log; sleep 5; done) &
MON=$!
python3 -m nucleiscope.jobs.quick_train --images /tmp/fold20 --mpp 0.25 --out /tmp/run/teacher20 \
  --seconds "$FOLD_SECS" --eval-images "$IMAGES" --sparsity 0.07 --log-every 250 > /tmp/run/teacher20.log 2>&1 &
TPID=$!
PIDS=""
for r in attention_h attention classical; do
  python3 -m nucleiscope.jobs.self_train --images "$IMAGES" --teacher "$TEACHER" --labels "$LABELS" \
    --out /tmp/run/s_$r --recipe $r $( [ $r = attention_h ] && echo --save-maps ) --steps 100000 --seconds "$SECS" --workers 5 > /tmp/run/s_$r.log 2>&1 &
  PIDS="$PIDS $!"
done
for p in $PIDS; do wait $p; echo "student $p exit $?"; done
wait $TPID; echo "teacher20 exit $?"
tail -n 4 /tmp/run/teacher20.log
python3 -m nucleiscope.jobs.self_train --images "$IMAGES" --teacher /tmp/run/teacher20/attention_f.safetensors \
  --labels "$LABELS" --out /tmp/run/s_fold --recipe attention_h --holdout "$HOLDOUT" --steps 100000 --seconds "${FOLD_STUDENT_SECS:-120}" \
  --workers 12 > /tmp/run/s_fold.log 2>&1 &
FPID=$!
wait $FPID; echo "fold student exit $?"
kill $MON

for d in s_attention_h s_attention s_classical s_fold; do grep -E "^(teacher|classical|student|student_tta) " /tmp/run/$d.log; done
cp /tmp/run/*.log /tmp/run/*.txt "$OUT"/ 2>/dev/null
tar -C /tmp/run -czf "$OUT/run.tgz" s_attention_h s_attention s_classical s_fold teacher20
ls -la "$OUT"
