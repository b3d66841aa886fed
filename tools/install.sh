#!/usr/bin/env bash
# Build mmsetformer's whole stack into a project-local virtual environment.
#
#   bash tools/install.sh            # CPU ops (or CUDA ops where a GPU + nvcc exist)
#   MMSETFORMER_CUDA=1 bash tools/install.sh   # force mmcv's CUDA ops (needs nvcc)
#   MMSETFORMER_CUDA=0 bash tools/install.sh   # force CPU-only ops
#   MMSETFORMER_VENV=/path/venv bash tools/install.sh  # another venv location
#   MMSETFORMER_TORCH=existing bash tools/install.sh   # into the active env:
#       keep its torch/torchvision (e.g. a cluster's CUDA build), build mmcv's
#       ops against them; PYTHON=... picks the interpreter (default python3).
#       Offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=/dir/of/wheels (mmcv's sdist
#       mmcv-2.1.0.tar.gz among them).  CUDA ops are built for the visible
#       GPU's architecture unless TORCH_CUDA_ARCH_LIST says otherwise.
#
# Idempotent: when the environment was built from the same pins (this file and
# setup.cfg) and still imports, it returns in seconds.  mmcv 2.1.0 has no wheel
# for torch 2.14, so it is built from source once (~10 min on 2 cores); the
# built wheel is kept in pip's cache dir, one per torch build
# (~/.cache/pip/mmsetformer-mmcv/<torch>-<python>-cuda<0|1>), so a rebuild of
# the venv on the same machine reuses it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMSETFORMER_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"

TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
MMENGINE_PIN="mmengine==0.10.7"
MMCV_PIN="mmcv==2.1.0"
DOWNSTREAM_PINS="mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 timm>=1.0,<2 pycocotools>=2.0.7 ftfy regex"
# onnx + onnxruntime: tools/export.py's check (tests/test_deploy.py)
TEST_PINS="pytest>=7 hypothesis>=6 matplotlib>=3.7 scipy flake8 isort onnx>=1.16 onnxruntime>=1.18"

say() { printf '[install %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# pip warns about every file:// index it cannot list on this machine kind.
pip_() {
  "$PY" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

stamp_of() {
  cat "$ROOT/tools/install.sh" "$ROOT/setup.cfg" "$ROOT/pyproject.toml" \
      "$ROOT/setup.py" "$ROOT"/mmsetformer/ops/csrc/* 2>/dev/null | sha256sum | cut -c1-16
}
TORCH_MODE="${MMSETFORMER_TORCH:-pinned}"
case "$TORCH_MODE" in
  pinned) PY="$VENV/bin/python"; STAMP_FILE="$VENV/.mmsetformer-stamp" ;;
  existing)
    PY="$(command -v "$PY_BOOT")"
    STAMP_FILE="$ROOT/.mmsetformer-env-stamp"
    if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
      echo "MMSETFORMER_TORCH=existing: $PY has no torch + torchvision to keep" >&2
      exit 1
    fi ;;
  *) echo "MMSETFORMER_TORCH must be 'pinned' or 'existing', got '$TORCH_MODE'" >&2; exit 1 ;;
esac
want_stamp="$(stamp_of)-$TORCH_MODE"

check_env() {
  # Everything the project needs, including mmcv's compiled ops.
  "$PY" - <<'PY' >/dev/null 2>&1
import torch, torchvision, mmengine, mmcv, mmdet, mmseg, mmpretrain, timm, pycocotools
import pkg_resources  # mmengine needs it to resolve `mmdet::` config bases
from mmcv.ops import nms, RoIAlign  # compiled extension
import mmsetformer
from mmsetformer.ops import fused_cpu  # the compiled SeT CPU kernel
assert fused_cpu._ext is not None, fused_cpu.why_unavailable()
PY
}

if [[ -x "$PY" && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$want_stamp" ]]; then
  if check_env; then
    say "environment $PY is up to date (stamp $want_stamp)"
    exit 0
  fi
  say "environment $PY has the right stamp but does not import: repairing"
fi

if [[ "$TORCH_MODE" == existing ]]; then
  say "torch: keeping $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') in $PY"
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV with $($PY_BOOT --version)"
    "$PY_BOOT" -m venv "$VENV"
  fi
  say "torch: $TORCH_PIN"
  pip_ install -q $TORCH_PIN
fi
# mmcv's setup.py imports pkg_resources (removed in setuptools >= 80).
say "build tools: setuptools<70, wheel, ninja, $MMENGINE_PIN"
# (torch declares setuptools>=77: the temporary downgrade is expected)
pip_ install -q --no-warn-conflicts "setuptools<70" wheel ninja
NO_DEPS=()
if [[ "$TORCH_MODE" == existing ]] && "$PY" -c "import cv2" >/dev/null 2>&1 \
   && ! "$PY" -m pip show -q opencv-python >/dev/null 2>&1; then
  # mmengine and mmcv declare opencv-python; an environment with another
  # OpenCV build (opencv-python-headless, a cluster's own cv2) keeps that
  # one: both are installed without their declared requirements, which
  # are installed here by name instead.
  say "OpenCV: keeping the environment's cv2 $("$PY" -c 'import cv2; print(cv2.__version__)')"
  NO_DEPS=(--no-deps)
  pip_ install -q --no-deps $MMENGINE_PIN
  pip_ install -q addict matplotlib numpy packaging Pillow pyyaml rich \
    termcolor yapf
else
  pip_ install -q $MMENGINE_PIN
fi

if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" >/dev/null 2>&1; then
  # mmcv compiles with -std=c++17 but torch 2.14's headers need C++20.  A
  # compiler wrapper on PATH rewrites the flag, so the sdist is built
  # unmodified and pip caches the resulting wheel under its own key.
  WRAP="$(mktemp -d)"
  trap 'rm -rf "$WRAP"' EXIT
  # wrapper NAME REAL: a NAME on PATH that runs REAL with -std=c++20
  wrapper() {
    cat > "$WRAP/$1" <<W
#!/usr/bin/env bash
args=()
for a in "\$@"; do
  case "\$a" in -std=c++14|-std=c++17) a=-std=c++20;; esac
  args+=("\$a")
done
exec "$2" "\${args[@]}"
W
    chmod +x "$WRAP/$1"
  }
  for cc in c++ g++ gcc cc; do
    real="$(command -v "$cc" || true)"
    [[ -n "$real" ]] && wrapper "$cc" "$real"
  done
  export CC="$WRAP/gcc" CXX="$WRAP/g++"

  cuda="${MMSETFORMER_CUDA:-auto}"
  if [[ "$cuda" == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
       && "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      cuda=1
    else
      cuda=0
    fi
  fi
  if [[ "$cuda" == 1 ]]; then
    # nvcc gets the same -std rewrite through torch's PYTORCH_NVCC hook.
    nvcc_real="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    command -v nvcc >/dev/null 2>&1 && nvcc_real="$(command -v nvcc)"
    wrapper nvcc "$nvcc_real"
    export PYTORCH_NVCC="$WRAP/nvcc" FORCE_CUDA=1
    say "mmcv ops: CUDA + CPU (FORCE_CUDA=1, nvcc=$nvcc_real)"
  else
    export FORCE_CUDA=0
    say "mmcv ops: CPU only (set MMSETFORMER_CUDA=1 on a CUDA machine)"
  fi
  export PATH="$WRAP:$PATH" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  # pip's wheel cache keys a wheel built from an sdist by the sdist alone:
  # an mmcv built against another torch would be reused and fail to load
  # (undefined c10 symbols). One cache per torch build and op set, inside
  # pip's own cache (what CI keeps).
  tag="$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')"
  MMCV_CACHE="$("$PY" -m pip cache dir 2>/dev/null || echo "$HOME/.cache/pip")/mmsetformer-mmcv/$tag-cuda$cuda"
  # an mmcv that is installed but does not load (built for another torch)
  "$PY" -m pip show -q mmcv >/dev/null 2>&1 && pip_ uninstall -q -y mmcv
  say "$MMCV_PIN with compiled ops: from the wheel cache $MMCV_CACHE if built before, else a source build (~10 min)"
  pip_ install --no-build-isolation --cache-dir "$MMCV_CACHE" "${NO_DEPS[@]}" $MMCV_PIN
else
  say "mmcv 2.1.0 with ops already present"
fi

say "OpenMMLab libraries and timm: $DOWNSTREAM_PINS"
# setuptools back to what torch asks for, now that mmcv is built, but
# below 80: mmengine imports pkg_resources at run time (config `mmdet::`
# inheritance), which setuptools 80 removed.
pip_ install -q $DOWNSTREAM_PINS $TEST_PINS "setuptools>=77.0.3,<80"
say "mmsetformer (editable, compiles the SeT CPU kernel against this torch, AVX2 + AVX-512 builds on x86, ~2 min)"
pip_ install -q --no-build-isolation --no-deps -e "$ROOT"

if ! check_env; then
  say "ERROR: the environment does not import; details:"
  "$PY" -c "import mmcv.ops, mmdet, mmseg, mmpretrain, timm, mmsetformer" || true
  exit 1
fi
echo "$want_stamp" > "$STAMP_FILE"
say "ready: $("$PY" -c 'import torch,mmcv,mmdet,mmseg,mmpretrain,timm;print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}, timm {timm.__version__}")')"
