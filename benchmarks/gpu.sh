#!/usr/bin/env bash
# The GPU figures for README -> Performance, ready for a machine with one CUDA device (not run in this project so
# far: no GPU was lent to it). Prints the same tables as the CPU benchmarks and saves them under
# benchmarks/results/*_cuda*.json. About 5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
# one ALF step, factored vs textbook order, and the 21-configuration grid vs 21 textbook runs
$PY bench_alf.py --device cuda --repeats 10 --rounds 3
# extraction vs a plain forward of a ViT-B/16 (random weights) at 224 px, autocast off and bf16, two batch sizes
for b in 128 256; do
  $PY bench_extract.py --device cuda --shape vit-b --amp off,bf16 --batch "$b" --workers 8 --repeats 2
done
# the probe grid in one pass vs one configuration, on the GPU
$PY bench_grid.py  # uses CUDA when there is one
