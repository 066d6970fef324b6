#!/usr/bin/env bash
# The one script a GPU session runs: install palmcore and what its CUDA tests need from a folder
# of wheels (the device machine has no package registry), print `palmcore info`, run the CUDA
# build and backend tests on the cuda device, the cuBLASLt GEMM benchmark, a training step of
# ~350M and ~1.3B configs against PyTorch, decoding of the ~1.3B one at batch 1/16/64 against
# its memory bound and PyTorch, and compute-sanitizer on a tiny step; one table at
# the end, copied with the logs to $OUT when it is set.
#
#   bench/gpu/check.sh [--sanitize] [WHEELS_DIR]        (WHEELS_DIR default: build/gpu-wheels)
#
# --sanitize runs the GPU tests themselves under compute-sanitizer memcheck instead (slow; it
# must be on PATH or in $CUDA_HOME/bin), and nothing else.
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
sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if (( sanitize )); then
  "$sanitizer" --tool memcheck --error-exitcode 3 "$python" -m pytest -q -p no:cacheprovider "${tests[@]}"
  exit
fi
# One table at the end (and $OUT/check.txt): the tests' verdict, the GEMM rates, the training
# step against PyTorch (fast kernels; the plain ones too for 350m), compute-sanitizer's verdicts
# (memcheck and racecheck) on a tiny training step whose attention runs the flash kernels.
logs="$(mktemp -d)"
# "ok" or "FAILED (exit N)" for a command whose output goes to the log file $1
verdict() { local log="$1"; shift; if "$@" >"$log" 2>&1; then echo ok; else echo "FAILED (exit $?)"; fi; }
tests_verdict="$(verdict "$logs/tests.txt" "$python" -m pytest -q -p no:cacheprovider -rs "${tests[@]}")"
tail -30 "$logs/tests.txt"
tests_verdict="$tests_verdict: $(tail -1 "$logs/tests.txt")"
"$python" bench/gpu/gemm.py --device cuda | tee "$logs/gemm.txt"
timeout 200 "$python" bench/gpu/train_step.py --configs 350m,1.3b --plain 350m | tee "$logs/train.txt" ||
  echo "check.sh: train_step.py ended early" | tee -a "$logs/train.txt"
timeout 120 "$python" bench/gpu/decode.py | tee "$logs/decode.txt" ||
  echo "check.sh: decode.py ended early" | tee -a "$logs/decode.txt"
tiny=(bench/gpu/train_step.py --configs tiny --seq 130 --tokens 260 --steps 1 --no-torch)
sanitized=()
for tool in memcheck racecheck; do
  if [[ -x "$sanitizer" ]]; then
    v="$(verdict "$logs/$tool.txt" timeout 90 "$sanitizer" --tool "$tool" --error-exitcode 3 "$python" "${tiny[@]}")"
  else
    v="compute-sanitizer not found"
  fi
  sanitized+=("compute-sanitizer $tool on a tiny training step (flash attention, T=130): $v")
  tail -5 "$logs/$tool.txt" 2>/dev/null || true
done
{
  echo "== palmcore GPU check: $(date -u +%FT%TZ), $("$python" -c 'from palmcore import _core; d = _core.cuda_devices(); print(d[0]["name"] if d else "?")' 2>/dev/null)"
  echo "GPU tests: $tests_verdict"
  printf '%s\n' "${sanitized[@]}"
  echo; cat "$logs/gemm.txt"
  echo; cat "$logs/train.txt"
  echo; cat "$logs/decode.txt"
} | tee "$logs/check.txt"
if [[ -n "${OUT:-}" ]]; then cp "$logs"/*.txt "$OUT"/; fi
