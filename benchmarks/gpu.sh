#!/usr/bin/env bash
# The GPU check: ViT-B-32, bf16 autocast, batch 256 per GPU, clipfnd against open_clip's own
# trainer on the same shards (256 px JPEGs), samples/s, peak GPU memory, MFU, and how much of
# the step waits for the loader, with GloFND off and on; then the loader alone.
#
#   bash benchmarks/gpu.sh [WORKERS] [SAMPLES]     (defaults: 12 loader workers, 256 * 48)
#
# Needs: a CUDA GPU, this project installed (make install: torch with CUDA, open_clip with its
# training extra) and, the first time, the network (benchmarks/vs_open_clip.py makes the
# virtual environment for open_clip's trainer with the webdataset it pins). Writes
# runs/gpu_check/*.json and prints the tables that benchmarks/RESULTS.md records.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${1:-12}
SAMPLES=${2:-12288}
OUT=runs/gpu_check
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# the trainers, side by side (rounds alternate the order)
"$PY" benchmarks/vs_open_clip.py --device cuda --model ViT-B-32 --precision bf16 \
    --batch 256 --samples "$SAMPLES" --workers "$WORKERS" --rounds 2 --log-every 4 \
    --settings open_clip clipfnd clipfnd+glofnd --out "$OUT/vs_open_clip.json"

# the loader alone, as many workers as the trainers had
"$PY" benchmarks/loader.py --workers "$WORKERS" --batch 256 --samples 8192 --rounds 2
