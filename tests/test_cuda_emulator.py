"""The emulated CUDA device (csrc/cuda_emulator): its own checks (tests/checks.cu, built with the
host compiler through rewrite.py; each asserts that correct code works and the broken variant is
caught), and the rewrite of every launch and __shared__ declaration under csrc/cuda."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "csrc" / "cuda_emulator"

sys.path.insert(0, str(EMULATOR))
import rewrite  # noqa: E402

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no host C++ compiler")


@needs_compiler
def test_emulator_checks_pass(tmp_path):
    done = subprocess.run(["sh", str(EMULATOR / "tests" / "run_checks.sh")], capture_output=True, text=True,
                          env={**os.environ, "BUILD_DIR": str(tmp_path), "PYTHON": sys.executable}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^(\d+) of \1 checks passed$", done.stdout, re.M), done.stdout
    assert "FAIL" not in done.stdout


def test_rewrite_handles_every_launch_and_shared_declaration():
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources
    launches = 0
    for source in sources:
        text = source.read_text()
        out = rewrite.rewrite(text, str(source))
        assert out.count("\n") == text.count("\n") + 1, f"{source.name}: line numbers moved"
        launches += out.count("::palmcore_emu::launch(")
        assert out.count("::palmcore_emu::launch(") == rewrite.masked(text).count("<<<"), source.name
    assert launches >= 40


def test_rewrite_keeps_explicit_template_arguments_and_deduces_the_others():
    text = ("template <class T>\n__global__ void k(T* x) {}\n"
            "template <int N>\n__global__ void e(int* x) {}\n"
            "void f(float* x, int* y) {\n  k<<<1, 2>>>(x);\n  e<3><<<dim3(1, 2), 4, 0,\n     s>>>(\n    y);\n}\n")
    out = rewrite.rewrite(text, "t.cu")
    assert '::palmcore_emu::launch(1, 2, 0, nullptr, "k", nullptr, [](auto&&... a) { k(a...); }, x)' in out
    assert ('::palmcore_emu::launch(dim3(1, 2), 4, 0, s, "e", reinterpret_cast<const void*>(&e<3>), '
            '[](auto&&... a) { e<3>(a...); }, \n    y)') in out
    assert out.count("\n") == text.count("\n") + 1
    with pytest.raises(SyntaxError):
        rewrite.rewrite("void f() { k<<<1>>>(x); }", "t.cu")
