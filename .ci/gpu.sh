#!/usr/bin/env bash
# The GPU checks (CI has no GPU; run this on a CUDA machine):
#   bash .ci/gpu.sh install   # stack into the active env (its torch kept)
#   bash .ci/gpu.sh ops       # SeT operator tests on CUDA (needs mmengine)
#   bash .ci/gpu.sh tests     # every CUDA test: operator, models, NCCL
#   bash .ci/gpu.sh bench     # tools/benchmark.py --device cuda
# OUT=dir collects logs and results (default ./gpu_out).  Offline machines:
# PIP_NO_INDEX=1 PIP_FIND_LINKS=/dir/of/wheels (mmcv's sdist among them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

case "${1:-all}" in
  install)
    nvidia-smi -L
    "$PY" -c 'import torch, triton; print("torch", torch.__version__,
          "CUDA", torch.version.cuda, "triton", triton.__version__,
          torch.cuda.get_device_name())'
    time MMSETFORMER_TORCH=existing PYTHON="$PY" bash tools/install.sh \
      2>&1 | tee "$OUT/install.log" ;;
  ops)
    "$PY" -m pytest -q tests/test_cuda.py -k 'not model_amp and not nccl' \
      2>&1 | tee "$OUT/tests_ops.log" ;;
  tests)
    "$PY" -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests_cuda.log" ;;
  bench)
    "$PY" tools/benchmark.py --device cuda --out "$OUT" "${@:2}" \
      2>&1 | tee "$OUT/bench.log" ;;
  all)
    bash "$0" install && bash "$0" tests && bash "$0" bench ;;
  *) echo "usage: $0 install|ops|tests|bench|all" >&2; exit 2 ;;
esac
