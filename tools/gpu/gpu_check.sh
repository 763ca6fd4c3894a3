#!/usr/bin/env bash
# The device checks, in one short run on a GPU machine (no network there: synthetic targets).
# Exact ESM-LogME throughput on the GPU (batched float64 eigh) at d=768 and d=384.
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
for lib in cusolver magma; do
  timeout 200 python3 tools/bench/bench_scoring.py --device cuda --no-hfselect --synthetic --linalg $lib \
      --sources 500 --configs 768:1000 384:1000 768:5000 --repeats 2
done
