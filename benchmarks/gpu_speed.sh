#!/usr/bin/env bash
# Extraction speed on one GPU machine, one prepared run (device tool: 10 minutes a command).
# From the repository root on a CUDA machine with the package's dependencies:
#   bash benchmarks/gpu_speed.sh              (results in $OUT, default ./gpu-out)
#   bash benchmarks/gpu_speed.sh --cpu-smoke  (tiny sizes on a CPU machine: proves it runs)
# benchmarks/gpu_speed.py does the work (its docstring lists the parts and their caps); the
# whole run keeps to $DEADLINE_S (default 510 s) after the install. $OUT gets 7 files: summary.txt,
# summary.json, gpu_util.csv, gpu_util.png, logs.tgz (every command's log, run.json, slides.parquet),
# gpu.txt (nvidia-smi), gpu_speed.log (what the driver printed).
# Packages missing on the machine can travel as wheels in a git-ignored .whl/ (see
# /work/.library/device/README.md): they are installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:-gpu-out}
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps -e . || exit 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 - <<'EOF' || exit 3
import importlib.util, sys
missing = [m for m in ("ray", "tiffslide", "tifffile", "imagecodecs", "pyarrow", "pandas", "skimage", "cv2",
                       "shapely", "safetensors", "fsspec", "scipy", "torch") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_speed.sh: missing Python packages: {', '.join(missing)} (carry them as wheels in .whl/)")
EOF
python3 benchmarks/gpu_speed.py --out "$OUT" ${DEADLINE_S:+--deadline-s "$DEADLINE_S"} "$@" 2>&1 | tee "$OUT/gpu_speed.log"
