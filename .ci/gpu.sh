#!/usr/bin/env bash
# The GPU checks (CI has no GPU; run this on a CUDA machine):
#   bash .ci/gpu.sh install   # stack into the active env (its torch kept)
#   bash .ci/gpu.sh ops       # SeT operator tests on CUDA (needs mmengine)
#   bash .ci/gpu.sh tests     # every CUDA test: operator, models, NCCL
#   bash .ci/gpu.sh bench     # tools/benchmark.py --device cuda
#   bash .ci/gpu.sh session   # all of it within one lease (below)
#   bash .ci/gpu.sh speed     # SeT's tests and speed, ~7 min, no install
#   bash .ci/gpu.sh wheels    # (run where pip reaches PyPI) fill .whl/
# OUT=dir collects logs and results (default ./gpu_out).  Offline machines:
# PIP_NO_INDEX=1 PIP_FIND_LINKS=/dir/of/wheels (mmcv's sdist among them).
#
# A lent GPU machine (Python 3.12, torch + CUDA, Triton, timm; no package
# registry) gets 15 minutes of device time per session, and a source build
# of mmcv's CUDA ops takes ~5 of them (4 min 42 s on an H200, 12 jobs).
# So: here, `bash .ci/gpu.sh wheels` (the stack's wheels and mmcv's sdist,
# ~15 MB, into the git-ignored .whl/), then one device run, carrying .whl,
# of `bash .ci/gpu.sh session`: while mmcv builds in the background, the
# operator and 224^2 backbone benchmark (Swin from timm; SeTformer-T as
# auto runs it, and with the reference and the Triton kernels in fp32,
# 3xTF32 and streamed; each one's GPU time kernel by kernel), then the
# operator's CUDA tests; the model tests (AMP, NCCL) once the stack is in,
# and the whole-model benchmark once install.sh is done.
# Every step prints into $OUT/session.log as it runs and the reports land
# in $OUT after every part, so a run stopped at its time limit still
# returns what it did; the built mmcv wheel comes back in <= 15 MiB parts
# (`cat mmcv-*.part* > .whl/<name>`: with it in .whl a later lease has the
# stack in within a minute; OPS_TESTS=0 leaves the operator's tests out of
# a rerun, EARLY_S bounds the first benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# the CUDA tests; OPS: those that need no mmcv ops (mmdet models, NCCL)
CUDA_TESTS=(tests/test_cuda.py
            tests/test_ops.py::test_reference_rebuilds_the_kernel_for_its_backward)
OPS='not model_amp and not nccl'
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
    "$PY" -m pytest -q "${CUDA_TESTS[@]}" -k "$OPS" \
      2>&1 | tee "$OUT/tests_ops.log" ;;
  tests)
    "$PY" -m pytest -q -rs "${CUDA_TESTS[@]}" \
      2>&1 | tee "$OUT/tests_cuda.log" ;;
  bench)
    "$PY" tools/benchmark.py --device cuda --out "$OUT" "${@:2}" \
      2>&1 | tee "$OUT/bench.log" ;;
  all)
    bash "$0" install && bash "$0" tests && bash "$0" bench ;;
  speed)
    # SeT on a GPU within ~7 minutes of a lease, no install (the carried
    # mmengine; timm's Swin-T): the operator's CUDA tests (OPS_TESTS=0:
    # not them), then SeTformer-T at 224^2 x 64 as auto runs it, with the
    # reference and the Triton kernels forced (each step's GPU time per
    # operator and kernel), then every Triton kernel in 32 x 32 tiles
    # (MMSETFORMER_TRITON_BLOCK_N / _M)
    [[ -d .whl ]] && export PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl"
    "$PY" -m pip install -q --no-deps mmengine==0.10.7 addict yapf \
      termcolor platformdirs
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [[ "${OPS_TESTS:-1}" != 0 ]]; then
      "$PY" -m pytest -q -rs "${CUDA_TESTS[@]}" -k "$OPS" 2>&1 \
        | tee "$OUT/speed_tests.log"
    fi
    sp() {
      "$PY" tools/benchmark.py --device cuda --only backbone --swin timm \
        --settings 224x224 "$@" 2>&1 | tee -a "$OUT/speed.log"
    }
    sp --out "$OUT/speed" --models SeTformer-T \
      'SeTformer-T (reference SeT)' 'SeTformer-T (Triton SeT)'
    MMSETFORMER_TRITON_BLOCK_N=32 MMSETFORMER_TRITON_BLOCK_M=32 \
      sp --out "$OUT/speed_tiles32" --models 'SeTformer-T (Triton SeT)' ;;
  wheels)
    # What the GPU machine lacks, for its Python (3.12) and platform.  The
    # project's environment (setuptools < 80, torch) reads mmcv's setup.py.
    W=.whl
    mkdir -p "$W"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || \
      echo '/.whl/' >> .git/info/exclude
    DL="${PYTHON:-python3}"
    [[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && DL=.venv/bin/python
    get() {
      "$DL" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$W" "$@"
    }
    get mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 \
      mmpretrain==1.2.0 addict yapf termcolor platformdirs \
      "pycocotools>=2.0.7" shapely terminaltables prettytable wcwidth ftfy \
      mat4py modelindex model-index ordered-set importlib-metadata \
      lazy-importer flake8 \
      pyflakes pycodestyle mccabe isort
    # tools/install.sh: below 70 to build mmcv, then 77-79 for torch
    get setuptools==69.5.1
    get setuptools==79.0.1
    "$DL" -m pip download -q --no-deps --no-binary=:all: \
      --no-build-isolation -d "$W" mmcv==2.1.0
    ls "$W"; du -sh "$W" ;;
  session)
    # $OUT returns 8 files at most: one log, two benchmark reports (md +
    # json each), and up to three parts of the built mmcv wheel.
    T0=$(date +%s)
    LOGS="$(mktemp -d)"
    at() {
      echo "[session +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/session.log"
    }
    # step NAME CMD...: run, its output straight into the log (a step cut
    # off at the lease's time limit still leaves what it printed)
    step() {
      local name="$1"; shift
      at "$name: $*"
      "$@" >> "$OUT/session.log" 2>&1
      at "$name: rc $?"
    }
    # bench NAME ARGS...: tools/benchmark.py --device cuda, its report
    # (rewritten after every part) straight into $OUT/NAME, so a run cut
    # off at the time limit still returns it; not its plot (the file count)
    bench() {
      local name="$1"; shift
      step "bench_$name" "$PY" tools/benchmark.py --device cuda \
        --out "$OUT/$name" "$@"
      rm -f "$OUT/$name"/*.png
    }
    if [[ -d .whl ]]; then
      export PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl"
    fi
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv; lscpu | grep 'Model name'; nproc; } >> "$OUT/session.log"
    step light "$PY" -m pip install -q --no-deps mmengine==0.10.7 addict \
      yapf termcolor platformdirs
    at "background: tools/install.sh (mmcv 2.1.0's CUDA ops from source)"
    # its end goes into the log as soon as it comes (its whole log where it
    # failed), whatever the foreground is doing then
    (
      MMSETFORMER_TORCH=existing PYTHON="$PY" MAX_JOBS="${MAX_JOBS:-12}" \
        bash tools/install.sh > "$LOGS/install.log" 2>&1 < /dev/null
      rc=$?
      if (( rc )); then
        cat "$LOGS/install.log"
      else
        tail -n 30 "$LOGS/install.log"
      fi >> "$OUT/session.log"
      at "install.sh: rc $rc"
      exit $rc
    ) &
    BUILD=$!
    # the source tree for the foreground (install.sh installs it, with the
    # SeT CPU kernel, at its end)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # stack_in: wait until install.sh has mmcv's ops and mmdet/mmseg in
    # (the model tests need those, not the SeT CPU kernel it compiles
    # last, ~1.5 min), then hand back the built mmcv wheel
    stack_in() {
      until grep -q 'mmsetformer (editable' "$LOGS/install.log" 2>/dev/null \
          || ! kill -0 "$BUILD" 2>/dev/null; do
        sleep 2
      done
      at "install.sh: the OpenMMLab stack is in"
      local whl
      whl="$(find "$("$PY" -m pip cache dir)" -name 'mmcv-2.1.0-*.whl' \
             2>/dev/null | head -1)"
      if [[ -n "$whl" ]]; then
        at "built $(basename "$whl"): $(du -m "$whl" | cut -f1) MB"
        if (( $(stat -c %s "$whl") <= 45 * 2**20 )); then
          split -b 15M -d "$whl" "$OUT/$(basename "$whl").part"
        fi
      fi
    }
    # the GPU work that needs no mmcv ops while mmcv builds on the CPUs
    # (12 jobs of 16 cores): the operator and the 224^2 backbones (Swin
    # from timm; SeTformer-T as auto runs it, with the reference and the
    # Triton kernels forced, and where each spends its GPU time), at most
    # EARLY_S seconds (its report keeps what it measured), then the
    # operator's CUDA tests (OPS_TESTS=0: not them, a rerun in one lease)
    step bench_early timeout "${EARLY_S:-300}" "$PY" tools/benchmark.py \
      --device cuda --out "$OUT/early" --only operator backbone \
      --swin timm --models SeTformer-T --settings 224x224
    rm -f "$OUT/early"/*.png
    if [[ "${OPS_TESTS:-1}" != 0 ]]; then
      step tests_ops "$PY" -m pytest -q -rs --durations=8 \
        "${CUDA_TESTS[@]}" -k "$OPS"
    fi
    stack_in
    step tests_models "$PY" -m pytest -q -rs --durations=8 \
      "${CUDA_TESTS[@]}" -k "not ($OPS)"
    wait "$BUILD"
    bench models --only model
    at done ;;
  *) echo "usage: $0 install|ops|tests|bench|all|session|speed|wheels" >&2
     exit 2 ;;
esac
