#!/usr/bin/env bash
# CI's run of the CUDA code on the emulated device: builds palmcore with PALMCORE_CUDA=EMULATE
# into a build folder (no nvcc needed; the CPU build is not touched) and runs every test file
# that has GPU tests against it, one file at a time. Prints each file's time and the total.
#   EMU_BUILD            build folder (default: <repo>/build-emulated)
#   PALMCORE_SANITIZE    address: the AddressSanitizer build (slower; the emulator's memcheck)
#   PYTHON               the Python with palmcore's build and test requirements (default: python)
# Extra arguments go to pytest (e.g. -x).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${EMU_BUILD:-$root/build-emulated}
python=${PYTHON:-python}
start=$(date +%s)
sanitize=()
if [ -n "${PALMCORE_SANITIZE:-}" ]; then sanitize=(-Ccmake.define.PALMCORE_SANITIZE="$PALMCORE_SANITIZE"); fi
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$python" -m pip install -q --no-build-isolation --no-deps \
  "$root" -Cbuild-dir="$build/cmake" -Ccmake.define.PALMCORE_CUDA=EMULATE "${sanitize[@]}" \
  --target "$build/site" --upgrade
echo "emulated build: $(( $(date +%s) - start )) s"
export PYTHONPATH="$build/site"
blas=$("$python" -c "import scipy_openblas32 as o; print(o.get_lib_dir())")
export LD_LIBRARY_PATH="$blas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "${PALMCORE_SANITIZE:-}" = address ]; then
  # the interpreter is not instrumented: ASan's runtime goes first (and libstdc++, whose __cxa_throw it
  # intercepts); the interpreter's own leaks are not ours
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
  export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0
fi
"$python" -c "import palmcore; assert palmcore._core.build_info()['cuda_emulated'] and palmcore.cuda_available()"
cd "$root"
status=0
for file in tests/test_cuda_emulator.py tests/test_backend_ops.py tests/test_backend_ops_elementwise.py \
            tests/test_backend_ops_loss_optim.py tests/test_backend_ops_sampling.py \
            tests/test_backend_ops_attention.py tests/test_shared_math.py tests/test_cuda_model.py \
            tests/test_cuda_build.py tests/test_nccl.py; do
  t=$(date +%s)
  "$python" -m pytest -q -p no:cacheprovider "$file" "$@" || status=1
  echo "$file: $(( $(date +%s) - t )) s"
done
echo "emulated CUDA build and tests: $(( $(date +%s) - start )) s"
exit $status
