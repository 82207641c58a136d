#!/usr/bin/env bash
# The quality issue's GPU check, one prepared run (device tool: 15 minutes in all).
# From the repository root on a CUDA machine with the package's dependencies:
#   bash benchmarks/gpu_quality.sh        (writes logs and summaries to $OUT, default ./gpu-out)
# 1. F on the training part only (reference recipe, 540 s budget), 2. its map calibrated
# per slide scored on the validation part, 3. a consensus student from that teacher and a
# classical-recipe student (the ablation), both on the training part only, 4. the quality
# benchmark of both students on the validation part. $OUT gets three files (the device tool
# returns at most 8, 16 MiB each): results.tgz (logs, metrics, summaries, quality tables) and
# the two fold weights (~2 MB each).
set -uo pipefail
FINAL=${OUT:-gpu-out}
OUT=$(mktemp -d)
mkdir -p "$FINAL"
trap 'mv "$OUT"/*.safetensors "$FINAL"/ 2>/dev/null; tar czf "$FINAL/results.tgz" -C "$OUT" . ; ls -la "$FINAL"' EXIT
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps -e . || exit 3
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
nucleiscope train --config jobs/configs/train-attention-fold.toml --device cuda 2>&1 | tee "$OUT/teacher.log"
cp runs/train-attention-fold/{metrics.csv,train.json} "$OUT/" 2>/dev/null
cp runs/train-attention-fold/attention_f.safetensors "$OUT/attention_f_fold.safetensors" 2>/dev/null
sed -e 's#runs/train-student-fold#runs/student-classical#; s#recipe = "consensus"#recipe = "classical"#' \
    jobs/configs/train-student-fold.toml > /tmp/student-classical.toml
for job in jobs/configs/train-student-fold.toml /tmp/student-classical.toml; do
  nucleiscope train --config "$job" --device cuda 2>&1 | tee -a "$OUT/students.log"
done
cp runs/train-student-fold/student.safetensors "$OUT/student_fold.safetensors" 2>/dev/null
cp runs/train-student-fold/summary.json "$OUT/student_fold_summary.json" 2>/dev/null
python3 benchmarks/bench_quality.py --segmenter attention --validation-only attention \
    --model runs/train-attention-fold/attention_f.safetensors > "$OUT/quality_teacher.txt" 2>&1
for model in runs/train-student-fold runs/student-classical; do
  python3 benchmarks/bench_quality.py --segmenter student --segmenter classical \
      --model "$model/student.safetensors" > "$OUT/quality_$(basename "$model").txt" 2>&1
done
