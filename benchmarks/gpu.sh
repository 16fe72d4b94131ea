#!/usr/bin/env bash
# The GPU figures for README -> Performance (*On a GPU*), for a machine with one CUDA device (run once, on an H200,
# 2026-12-04). Prints the same tables as the CPU benchmarks and saves them under
# benchmarks/results/*_cuda*.json. About 5 minutes on an H100. First, that the grid trained on the GPU agrees with
# each configuration alone and with the CPU (gpu_check.py); its verdict is the script's exit status.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
check=0
$PY gpu_check.py || check=$?
# one ALF step, factored vs textbook order, and the 21-configuration grid vs 21 textbook runs
$PY bench_alf.py --device cuda --repeats 10 --rounds 3
# extraction vs a plain forward of a ViT-B/16 (random weights) at 224 px, autocast off and bf16, two batch sizes
for b in 128 256; do
  $PY bench_extract.py --device cuda --shape vit-b --amp off,bf16 --batch "$b" --workers 8 --repeats 2
done
# the probe grid in one pass vs one configuration, on the GPU
$PY bench_grid.py  # uses CUDA when there is one
exit $check
