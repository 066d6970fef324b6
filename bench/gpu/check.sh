#!/usr/bin/env bash
# The one script a GPU session runs: install palmcore and what its CUDA tests need from a folder
# of wheels (the device machine has no package registry), print `palmcore info`, run the CUDA
# build and backend tests on the cuda device, then a short cuBLASLt GEMM benchmark.
#
#   bench/gpu/check.sh [--sanitize] [WHEELS_DIR]        (WHEELS_DIR default: build/gpu-wheels)
#
# --sanitize runs the tests under compute-sanitizer (memcheck; it must be on PATH or in
# $CUDA_HOME/bin); slow, so the GEMM benchmark is then skipped.
#
# Prepare the wheels HERE (never commit them: build/ is git-ignored), for the device machine's
# Python version (check it first; 3.11 below):
#   pip wheel --no-build-isolation --no-deps -w build/gpu-wheels .        # palmcore, CUDA compiled in
#   pip download -d build/gpu-wheels --only-binary=:all: --python-version 3.11 \
#       numpy scipy-openblas32 sentencepiece tqdm pytest
# and carry the folder with the run: carry=["build/gpu-wheels"] (64 MiB in all: a palmcore
# wheel, numpy, scipy-openblas32, sentencepiece, tqdm, pytest and its deps fit in about 30 MiB).
# Without a palmcore wheel in the folder the script builds palmcore there from this checkout
# (pip install --no-build-isolation --target ...): that needs nvcc on the device machine and
# the build requirements in the folder too (scikit-build-core, pybind11, cmake, ninja, mpich,
# pathspec, packaging).
#
# cuBLASLt is opened at run time: it must be on the loader's path (the toolkit's lib64 under
# $CUDA_HOME, or the nvidia-cublas wheel's nvidia/cu13/lib); the script adds the first found.
set -euo pipefail
cd "$(dirname "$0")/../.."

sanitize=0
if [[ "${1:-}" == "--sanitize" ]]; then sanitize=1; shift; fi
wheels="$(realpath "${1:-build/gpu-wheels}")"
prefix="$(realpath -m build/gpu-prefix)"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "check.sh: no $python on this machine" >&2; exit 2; }
[[ -d "$wheels" ]] || { echo "check.sh: no wheel folder $wheels (see this script's header)" >&2; exit 2; }

rm -rf "$prefix" && mkdir -p "$prefix"
pip_install() { "$python" -m pip install -q --no-index --find-links "$wheels" --target "$prefix" "$@"; }
pip_install numpy scipy-openblas32 sentencepiece tqdm pytest
export PYTHONPATH="$prefix"
if compgen -G "$wheels/palmcore-*.whl" >/dev/null; then
  pip_install --no-deps "$wheels"/palmcore-*.whl
else
  pip_install scikit-build-core pybind11 cmake ninja mpich
  PATH="$prefix/bin:$PATH" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip_install --no-build-isolation --no-deps .
fi

openblas_lib="$("$python" -c 'import scipy_openblas32 as o; print(o.get_lib_dir())')"
cublas_lib=""
for dir in "${CUDA_HOME:-/usr/local/cuda}/lib64" "$prefix/nvidia/cu13/lib" /usr/local/cuda/lib64; do
  if compgen -G "$dir/libcublasLt.so*" >/dev/null; then cublas_lib="$dir"; break; fi
done
export LD_LIBRARY_PATH="$openblas_lib${cublas_lib:+:$cublas_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cd /tmp  # import the installed palmcore, not the checkout's python/ folder
"$python" -m palmcore info
"$python" -c "import sys, palmcore; from palmcore import _core
sys.exit(0 if palmcore.cuda_available() else 'check.sh: CUDA is not usable here: ' + _core.cuda_unavailable_reason())"
cd - >/dev/null
tests=(tests/test_cuda_build.py tests/test_cuda_model.py tests/test_backend*.py tests/test_shared_math.py)
if (( sanitize )); then
  sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  "$sanitizer" --tool memcheck --error-exitcode 3 "$python" -m pytest -q -p no:cacheprovider "${tests[@]}"
else
  "$python" -m pytest -q -p no:cacheprovider -rs "${tests[@]}"
  "$python" bench/gpu/gemm.py --device cuda
  # a training step of the ~350M and ~1.3B configs (T=2048) against PyTorch where it is there;
  # a config whose ops lack a CUDA kernel prints its error in its row
  timeout 300 "$python" bench/gpu/train_step.py --configs 350m,1.3b || echo "check.sh: train_step.py ended early"
fi
