#!/usr/bin/env bash
# The training-speed bench on one GPU (H100/H200): ddm's expert training against diffusers' DiT
# at S/2 and B/2, 256 tokens (4x32x32 latents, patch 2), batch 256, in fp32-tf32, bf16 and
# bf16-compile, then routed sampling of 4 S/2 experts. Report and JSON into $OUT, with the log.
#
#     OUT=/tmp/speed bash bench/gpu_check.sh            # PYTHON=.venv/bin/python to pick one
#
# About 3 to 6 minutes: 10 warm-up and 20 timed steps per cell, most of the time in the four
# torch.compile runs (ddm and diffusers, S/2 and B/2). The bench is bounded at 7 minutes; stopped
# there, it still writes the report of the cells it measured (marked as interrupted).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
: "${OUT:?set OUT to the folder for the report}"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
try:
    import diffusers
except ImportError:
    sys.exit("diffusers is not installed: pip install diffusers")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, {torch.cuda.get_device_name()}")
PY

timeout --kill-after=60 420 "$PYTHON" bench/train_speed.py --device cuda \
    --presets "S/2 B/2" --tokens 256 --batch 256 --modes fp32-tf32,bf16,bf16-compile \
    --window 5 --warmup-windows 2 --windows 4 --rounds 1 \
    --sample-steps 20 --sample-batch 256 --sample-batches 2 \
    --out "$OUT" 2>&1 | tee "$OUT/train_speed.log"
