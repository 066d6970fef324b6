"""The host emulation of the CUDA flash attention (tests/flash_emulation.cpp): the ldmatrix /
mma.m16n8k16 fragment maps of csrc/cuda/mma_fragments.h, which the kernels themselves use, and
the three kernels' tile loops emulated lane by lane against a float64 causal attention (bf16
tolerance, odd T, grouped and sharded heads). Compiled with the C++ compiler that builds
palmcore; no GPU needed. The CUDA code itself runs only in the GPU tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_flash_fragment_maps_and_tile_loops(tmp_path):
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert compiler, "no C++ compiler (g++ or $CXX): palmcore itself cannot be built here either"
    exe = tmp_path / "flash_emulation"
    subprocess.run([compiler, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "flash_emulation.cpp"),
                    "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
