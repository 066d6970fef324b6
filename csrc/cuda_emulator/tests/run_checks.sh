#!/bin/sh
# Builds the emulator's checks (tests/checks.cu through rewrite.py, with the emulator's sources)
# into BUILD_DIR (default: a temporary folder) and runs them; extra arguments name checks.
#   CXX (default g++), CXXFLAGS (added: e.g. -fsanitize=address), PYTHON (default python3)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$(mktemp -d)}
mkdir -p "$build"
"${PYTHON:-python3}" "$here/rewrite.py" "$here/tests/checks.cu" "$build/checks.cpp"
"${CXX:-g++}" -std=c++17 -O1 -g -Wall -Wextra ${CXXFLAGS:-} -I"$here/include" -I"$here" \
  "$build/checks.cpp" "$here/executor.cpp" "$here/runtime.cpp" "$here/intrinsics.cpp" "$here/tensor_core.cpp" "$here/fiber_switch.S" \
  -o "$build/checks" -lpthread
exec "$build/checks" "$@"
