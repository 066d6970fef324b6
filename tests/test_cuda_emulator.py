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


@needs_compiler
def test_address_sanitizer_catches_a_kernel_writing_out_of_bounds(tmp_path):
    """The emulator's memcheck: built with -fsanitize=address, a kernel's write one element past
    a device buffer stops the process with a report naming the kernel's source line; built
    without, the same write goes unnoticed (so the report is the sanitizer's doing)."""
    script = str(EMULATOR / "tests" / "run_checks.sh")
    env = {**os.environ, "PYTHON": sys.executable, "ASAN_OPTIONS": "detect_leaks=0"}
    plain = subprocess.run(["sh", script, "out_of_bounds"], capture_output=True, text=True, timeout=600,
                           env={**env, "BUILD_DIR": str(tmp_path / "plain")})
    assert plain.returncode == 0 and "went unnoticed" in plain.stdout, plain.stdout + plain.stderr
    asan = subprocess.run(["sh", script, "out_of_bounds"], capture_output=True, text=True, timeout=600,
                          env={**env, "BUILD_DIR": str(tmp_path / "asan"), "CXXFLAGS": "-fsanitize=address"})
    if "cannot find" in asan.stderr and "asan" in asan.stderr:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    assert asan.returncode != 0 and "heap-buffer-overflow" in asan.stderr, asan.stdout + asan.stderr
    assert re.search(r"in write_past_end .*checks\.cu:\d+", asan.stderr), asan.stderr


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


@pytest.mark.skipif(not __import__("palmcore")._core.build_info()["cuda_emulated"], reason="not the emulated build")
def test_the_kernels_give_the_same_bits_in_every_thread_order(monkeypatch):
    """A training step (forward, backward, every gradient; fp32 and bf16, flash and plain) and
    a few sampled decode steps, run with the threads of each phase in forward, reverse and two
    shuffled orders: the same bits (a kernel with a race would differ; tests/checks.cu shows the
    emulator telling such a kernel apart)."""
    import numpy as np  # noqa: PLC0415

    import palmcore  # noqa: PLC0415
    from helpers import random_params, random_tokens  # noqa: PLC0415

    cfg = palmcore.PaLMConfig(vocab_size=97, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=64,
                              ffn_dim=100, max_seq_len=80, z_loss=1e-2)
    params = {n: w.astype(np.float32) for n, w in random_params(cfg, 3).items()}
    tokens = random_tokens(cfg, 2, 70, seed=1)

    def run():
        results = []
        for precision, kernels in (("fp32", "plain"), ("bf16", "fast"), ("bf16", "plain")):
            palmcore.set_kernels(kernels)
            model = palmcore.PaLM(cfg, device="cuda", precision=precision)
            model.load_state_dict(params)
            model.zero_grad()
            loss = model.forward_backward(tokens[:, :-1], tokens[:, 1:])
            results.append((model.forward(tokens[:, :-1]), loss, model.grads()))
            cache = model.kv_cache(1)
            results.append([cache.feed(tokens[0, :5])] + [cache.feed([t]) for t in tokens[0, 5:9]])
        return results

    before = palmcore.get_kernels()
    try:
        runs = {}
        for order in ("forward", "reverse", "shuffle:1", "shuffle:2"):
            monkeypatch.setenv("PALMCORE_EMULATE_ORDER", order)
            runs[order] = run()
    finally:
        palmcore.set_kernels(before)
    flat = {order: [np.asarray(a) for a in _leaves(r)] for order, r in runs.items()}
    for order, leaves in flat.items():
        assert len(leaves) == len(flat["forward"])
        for a, b in zip(leaves, flat["forward"]):
            np.testing.assert_array_equal(a, b, err_msg=order)


def _leaves(x):
    if isinstance(x, dict):
        for k in sorted(x):
            yield from _leaves(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x
