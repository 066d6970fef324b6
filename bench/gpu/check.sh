#!/usr/bin/env bash
# The one script a GPU session runs, in a copy of this repository on the device machine: build
# palmcore there, print `palmcore info`, run the GPU tests one file at a time, the cuBLASLt GEMM
# benchmark, a training step of ~350M and ~1.3B configs against PyTorch, decoding of the ~1.3B
# one at batch 1/16/64 against its memory bound and PyTorch, and compute-sanitizer (memcheck,
# racecheck) on a tiny training step; one table at the end. Every step is guarded: a failing or
# slow step gives its row a verdict and the script goes on; the whole run ends within a budget
# (PALMCORE_CHECK_SECONDS, default 530 s: the device allows 10 minutes a call), later steps
# marked "not run" when it is spent.
#
#   bench/gpu/check.sh [--emulated] [--sanitize]
#
# --emulated  builds the emulated CUDA device (PALMCORE_CUDA=EMULATE) and runs the benchmarks at
#             tiny sizes: everything but the hardware, on any machine (rehearsal of a GPU run).
# --sanitize  runs the GPU tests themselves under compute-sanitizer memcheck instead, and nothing
#             else (slow).
#
# What the device machine needs: a Python with numpy, pytest, pybind11, scikit-build-core, cmake,
# ninja, sentencepiece and tqdm (PYTHON; default /opt/torch/.venv/bin/python3 where it exists, the
# lent machine's torch environment, else python3), nvcc, and the scipy-openblas32 wheel for that
# Python in build/gpu-wheels unless that Python has it (prepare it here, for the device's Python:
#   pip download -d build/gpu-wheels --only-binary=:all: --python-version 3.12 --no-deps scipy-openblas32
# and carry "build/gpu-wheels"). cuBLASLt and NCCL are taken from that Python's nvidia wheels
# (nvidia/cu13/lib and the like), else from $CUDA_HOME/lib64.
#
# The logs and the table (check.txt) are written to $OUT as the run goes (to a temporary folder
# when OUT is unset), so that what ran comes back even if the run is cut short.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

emulated=0 sanitize=0
for arg in "$@"; do
  case "$arg" in
    --emulated) emulated=1 ;;
    --sanitize) sanitize=1 ;;
    *) echo "check.sh: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
default_python=python3
[[ -x /opt/torch/.venv/bin/python3 ]] && default_python=/opt/torch/.venv/bin/python3
python="${PYTHON:-$default_python}"
command -v "$python" >/dev/null || { echo "check.sh: no $python on this machine" >&2; exit 2; }

out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
budget="${PALMCORE_CHECK_SECONDS:-530}"
deadline=$((SECONDS + budget))
rows="$out/rows.txt"
: >"$rows"

# The table: every row so far, written at exit whatever ended the run.
write_table() {
  {
    echo "== palmcore GPU check: $(date -u +%FT%TZ), ${device_name:-device unknown}$( ((emulated)) && echo ' (emulated device)')"
    cat "$rows"
    for part in gemm train_step decode; do
      [[ -s "$out/$part.log" ]] && { echo; cat "$out/$part.log"; }
    done
  } >"$out/check.txt"
  cat "$out/check.txt"
}
trap write_table EXIT

row() { echo "$*" >>"$rows"; }

# The line of a log that says what went wrong: its first error line, else its last line.
first_error() { { grep -m1 -E 'Error|error:|FAILED|Traceback' "$1" || tail -1 "$1"; } | cut -c1-200; }

# step NAME SECONDS COMMAND...: run COMMAND with its output in $out/NAME.log, for at most SECONDS
# and never past the deadline; its verdict becomes a row. Returns the command's status.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$((deadline - SECONDS - 5))
  if ((left < 10)); then row "$name: not run (the ${budget} s budget was spent)"; return 124; fi
  ((limit > left)) && limit=$left
  local start=$SECONDS status=0
  timeout --kill-after=5 "$limit" "$@" >"$out/$name.log" 2>&1 || status=$?
  local took=$((SECONDS - start))
  if ((status == 0)); then row "$name: ok (${took} s)"
  elif ((status == 124 || status == 137)); then row "$name: TIMEOUT after ${limit} s"
  else row "$name: FAILED (exit $status, ${took} s; $(first_error "$out/$name.log"))"; fi
  return $status
}

# -- build: from this tree, portable code (no -march=native: the device's host CPU is not this one)
prefix="$repo/build/gpu-prefix"
rm -rf "$prefix" && mkdir -p "$prefix"
export PYTHONPATH="$prefix"
if ! "$python" -c "import scipy_openblas32" 2>/dev/null; then
  step install-openblas 60 "$python" -m pip install -q --no-index --find-links "$repo/build/gpu-wheels" \
    --target "$prefix" scipy-openblas32
fi
cuda_mode=ON archs=90
((emulated)) && cuda_mode=EMULATE
build_flags=(-Ccmake.define.PALMCORE_NATIVE=OFF "-Ccmake.define.PALMCORE_CUDA=$cuda_mode"
             "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$archs" "-Cbuild-dir=$repo/build/gpu-build")
if ! CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" step build 300 "$python" -m pip install -q --no-build-isolation \
    --no-deps --target "$prefix" "${build_flags[@]}" "$repo"; then
  exit 1  # nothing else can run; the table says why
fi

# -- libraries opened at run time: cuBLASLt and NCCL from the Python's nvidia wheels, else the toolkit
lib_dirs="$("$python" - <<'EOF'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "*", "lib")))]
dirs.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64"))
print(":".join(d for d in dirs if glob.glob(os.path.join(d, "libcublasLt.so*")) or glob.glob(os.path.join(d, "libnccl.so*"))))
EOF
)"
openblas_lib="$("$python" -c 'import scipy_openblas32 as o; print(o.get_lib_dir())')"
export LD_LIBRARY_PATH="$openblas_lib${lib_dirs:+:$lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nccl_dir="$(tr ':' '\n' <<<"$lib_dirs" | while read -r d; do compgen -G "$d/libnccl.so*" >/dev/null && echo "$d" && break; done)"
[[ -n "$nccl_dir" ]] && export PALMCORE_NCCL_LIBRARY="$nccl_dir"
row "libraries: ${lib_dirs:-no cuBLASLt/NCCL found}"

cd /tmp  # import the built palmcore, not the checkout's python/ folder
step info 60 "$python" -m palmcore info
if ! step cuda-available 60 "$python" -c "import sys, palmcore; from palmcore import _core
sys.exit(0 if palmcore.cuda_available() else 'CUDA is not usable here: ' + _core.cuda_unavailable_reason())"; then
  exit 1
fi
device_name="$("$python" -c 'from palmcore import _core; d = _core.cuda_devices(); print(d[0]["name"] if d else "?")' 2>/dev/null)"
cd "$repo"

gpu_tests=(tests/test_cuda_build.py tests/test_cuda_model.py tests/test_backend_ops*.py tests/test_shared_math.py
           tests/test_nccl.py)
sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if ((sanitize)); then
  step sanitize-tests "$budget" "$sanitizer" --tool memcheck --error-exitcode 3 "$python" -m pytest -q \
    -p no:cacheprovider "${gpu_tests[@]}"
  exit
fi

# -- the GPU tests, one process a file (a device fault is sticky: it must not fail the other
# files), stopping a file at its first failure, each launch checked where it happens
for file in "${gpu_tests[@]}"; do
  name="test:$(basename "$file" .py)"
  CUDA_LAUNCH_BLOCKING=1 step "$name" 150 "$python" -m pytest -x -q -p no:cacheprovider -rs "$file"
  sed -i "\$s|\$| -- $(grep -E '(passed|failed|error|skipped)' "$out/$name.log" | tail -1 | tr -d '=')|" "$rows"
done

# -- benchmarks (tiny sizes on the emulated device: they check that the scripts run)
if ((emulated)); then
  gemm=(--quick) train=(--configs tiny --plain tiny --seq 130 --tokens 260 --steps 1 --no-torch)
  decode=(--config tiny --batches 1,2 --prompt 8 --new 4 --copy-bytes 16777216 --no-torch)
else
  gemm=() train=(--configs 350m,1.3b --plain 350m) decode=()
fi
step gemm 60 "$python" bench/gpu/gemm.py "${gemm[@]}"
step train_step 200 "$python" bench/gpu/train_step.py "${train[@]}"
step decode 150 "$python" bench/gpu/decode.py "${decode[@]}"

# -- compute-sanitizer on a tiny training step whose attention runs the flash kernels
tiny=(bench/gpu/train_step.py --configs tiny --seq 130 --tokens 260 --steps 1 --no-torch)
for tool in memcheck racecheck; do
  if ((emulated)); then row "compute-sanitizer $tool: not on the emulated device"
  elif [[ -x "$sanitizer" ]]; then step "sanitizer:$tool" 60 "$sanitizer" --tool "$tool" --error-exitcode 3 "$python" "${tiny[@]}"
  else row "compute-sanitizer $tool: not found"; fi
done
