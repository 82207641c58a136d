#!/usr/bin/env bash
# Second device session (self-training stage): students on the v07 teacher's pseudo-labels,
# trained alone on the GPU for longer, with a vectorised sampler: consensus recipe (narrow
# and wide U-Net), the classical-only ablation, and a hold-out fold (consensus, trained on
# the first 20 images, scored on the last 10). Each run is packed into $OUT as soon as it ends.
IMAGES=${IMAGES:-.gpu/monuseg}
LABELS=${LABELS:-.gpu/labels}
TEACHER=${TEACHER:-benchmarks/gpu-runs/2026-11-26/v07/attention_f.safetensors}
SECS=${SECS:-240}
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/ns/nucleiscope /tmp/run "$OUT"
rm -rf /tmp/ns/nucleiscope/pipeline /tmp/ns/nucleiscope/jobs
cp -r "$PWD/pipeline" "$PWD/jobs" /tmp/ns/nucleiscope/
[ -d .gpu/snap ] && cp .gpu/snap/training.py /tmp/ns/nucleiscope/pipeline/ && cp .gpu/snap/quick_train.py /tmp/ns/nucleiscope/jobs/
export PYTHONPATH=/tmp/ns PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
(while true; do nvidia-smi 2>/dev/null --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$OUT/util.log"; sleep 10; done) &
MON=$!
go() {  # name, extra args
  local name=$1; shift
  python3 -m nucleiscope.jobs.self_train --images "$IMAGES" --teacher "$TEACHER" --labels "$LABELS" \
    --out /tmp/run/$name --steps 1000000 --seconds "$SECS" --workers 4 "$@" > /tmp/run/$name/log.txt 2>&1
  echo "$name exit $?"
  grep -E "^(teacher|classical|student|student_tta) " /tmp/run/$name/log.txt | cut -c1-160
  [ -f /tmp/run/$name/teacher_maps.npz ] && mv /tmp/run/$name/teacher_maps.npz "$OUT/teacher_maps.npz"
  tar -C /tmp/run -czf "$OUT/$name.tgz" --exclude=pred $name
}
for n in consensus consensus_wide classical fold; do mkdir -p /tmp/run/$n; done
go consensus --recipe consensus --save-maps &
go consensus_wide --recipe consensus --widths 32,64,128,256 &
go classical --recipe classical &
go fold --recipe consensus --holdout 10 &
wait
kill $MON
ls -la "$OUT"
