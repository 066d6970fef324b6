"""The CUDA build: compiled in when nvcc was there at build time (PALMCORE_CUDA=AUTO), for
sm_80 and sm_90 by default; usable only where a GPU is, and saying why not elsewhere; and the
extension imports with no CUDA library on the machine (cudart static, cuBLASLt dlopen'ed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import palmcore
from palmcore import _core

INFO = _core.build_info()


def nvcc_findable() -> bool:
    """The rule of CMakeLists.txt: nvcc on PATH, $CUDACXX, or bin/nvcc under $CUDA_HOME,
    $CUDA_PATH or /usr/local/cuda (the test sees the environment the build most likely saw)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return bool(shutil.which("nvcc") or os.environ.get("CUDACXX")
                or any(r and Path(r, "bin", "nvcc").exists() for r in roots))


def test_build_info_reports_what_was_compiled():
    assert INFO["cuda_option"] in ("AUTO", "ON", "OFF", "EMULATE")
    assert isinstance(INFO["mpi"], bool) and INFO["nccl"] is INFO["cuda"]  # NCCL comes with the CUDA backend
    assert INFO["blas"].startswith("scipy-openblas32")
    assert INFO["cuda_emulated"] is (INFO["cuda_option"] == "EMULATE")
    if INFO["cuda_option"] == "OFF":
        assert not INFO["cuda"]
    elif INFO["cuda_emulated"]:
        assert INFO["cuda"] and INFO["cuda_version"] == "emulated" and INFO["cuda_architectures"] == [90]
    elif INFO["cuda_option"] == "ON" or nvcc_findable():
        assert INFO["cuda"], "nvcc was there at build time but the CUDA backend is not compiled in"


@pytest.mark.skipif(not INFO["cuda"] or INFO["cuda_emulated"], reason="built without nvcc")
def test_cuda_build_targets_sm80_and_sm90_by_default():
    assert INFO["cuda_runtime_version"] >= 12000 and re.fullmatch(r"\d+\.\d+\.\d+", INFO["cuda_version"])
    if INFO["cuda_architectures_default"]:
        assert INFO["cuda_architectures"] == [80, 90]


def test_cuda_available_agrees_with_the_devices_found():
    available = palmcore.cuda_available()
    reason = _core.cuda_unavailable_reason()
    assert available == (reason == "")
    if not INFO["cuda"]:
        assert not available and "built without CUDA" in reason
    if available:
        assert _core.cuda_devices()
    if not _core.cuda_devices():
        assert not available


@pytest.mark.skipif(palmcore.cuda_available(), reason="a usable GPU is here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_model_on_cuda_without_a_gpu_says_why(device):
    cfg = palmcore.PaLMConfig.preset("seed")
    with pytest.raises(RuntimeError, match=rf"device '{device}' cannot be used: .*"
                       rf"{re.escape(_core.cuda_unavailable_reason())}"):
        palmcore.PaLM(cfg, seed=0, device=device)
    assert palmcore.cuda_available() is False


def test_device_argument_is_checked():
    cfg = palmcore.PaLMConfig.preset("seed")
    assert palmcore.PaLM(cfg, seed=0).device == "cpu"
    assert palmcore.PaLM(cfg, seed=0, device="cpu").device == "cpu"
    for bad in ["gpu", "cuda:", "cuda:x", "CPU"]:
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            palmcore.PaLM(cfg, seed=0, device=bad)
    with pytest.raises(TypeError):
        palmcore.PaLM(cfg, seed=0, device=0)


@pytest.mark.skipif(not palmcore.cuda_available(), reason="no CUDA device")
def test_a_model_on_cuda_runs():
    """With a GPU: the model lives there and its forward gives finite logits
    (tests/test_cuda_model.py compares it with the CPU)."""
    cfg = palmcore.PaLMConfig.preset("seed")
    model = palmcore.PaLM(cfg, seed=0, device="cuda")
    assert model.device == "cuda:0"
    assert np.isfinite(model.forward([[1, 2, 3]])).all()


def test_palmcore_info_tells_the_truth():
    no_site = ["-S"] if sys.flags.no_site else []  # the same palmcore as this process imported
    out = subprocess.run([sys.executable, *no_site, "-m", "palmcore", "info"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    expected = r"CUDA\s+EMULATED on the CPU" if INFO["cuda_emulated"] else r"CUDA\s+yes: CUDA \d+\.\d+" if INFO["cuda"] \
        else r"CUDA\s+no"
    assert re.search(expected, text), text
    assert ("NCCL      yes, loaded at run time" if INFO["nccl"] else "NCCL      no") in text
    assert "BLAS      scipy-openblas32" in text
    assert ("MPI       yes" if INFO["mpi"] else "MPI       no") in text
    for d in _core.cuda_devices():
        assert d["name"] in text
    if not palmcore.cuda_available():
        assert f"not usable: {_core.cuda_unavailable_reason()}" in text


def _core_path() -> Path:
    return Path(_core.__file__)


def test_the_extension_needs_no_cuda_library():
    """No libcuda, libcudart, libcublas(Lt) in the extension's DT_NEEDED."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    dynamic = subprocess.run([readelf, "-d", str(_core_path())], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", dynamic)
    assert needed and not [n for n in needed if re.match(r"lib(cuda|cudart|cublas|cublasLt|nccl|cudnn)\b", n)], needed


def test_import_works_with_cuda_libraries_hidden(tmp_path):
    """`import palmcore` and `palmcore info` in a process whose library path holds only the BLAS
    (no CUDA folder), and no CUDA library is loaded by the import."""
    import scipy_openblas32  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "CUDACXX")}
    env["LD_LIBRARY_PATH"] = scipy_openblas32.get_lib_dir()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "cuda" not in p.lower())
    code = ("import palmcore, palmcore.cli; palmcore.cuda_available(); print('\\n'.join(palmcore.cli.build_report()));"
            "maps = open('/proc/self/maps').read();"
            "print('LOADED' if any(n in maps for n in ('libcudart.so', 'libcublas')) else 'CLEAN')")
    out = subprocess.run([sys.executable, *(["-S"] if sys.flags.no_site else []), "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    if not palmcore.cuda_available():
        assert out.stdout.strip().endswith("CLEAN"), out.stdout


def test_train_on_cuda(corpus, tmp_path, capsys):
    """Without a GPU: a clear error naming why the device cannot be used; with one: it trains."""
    from palmcore.cli import main

    args = ["train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=32", "--set", "n_layers=1",
            "--set", "n_heads=2", "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--device", "cuda",
            "--out", str(tmp_path)]
    if palmcore.cuda_available():
        assert main(args) == 0
        return
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert re.search(r"palmcore train: error: device 'cuda' cannot be used", capsys.readouterr().err)
