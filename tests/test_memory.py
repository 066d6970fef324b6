"""The memory guard: a model, cache or batch that would not fit is refused with a ValueError
stating the bytes needed and available, before anything that large is built, and the model
stays usable. Nothing here depends on this machine's memory: the sizes are either far beyond
any machine or measured against palmcore's own limit (_core.set_memory_limit)."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import palmcore
from palmcore import _core

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=256)
MiB = 1 << 20

# Runs in a child whose address space is capped at 1 GiB above what it holds after importing
# palmcore: a regression that builds something proportional to n_layers fails there with a
# MemoryError instead of exhausting this machine.
CHILD = r"""
import json, resource
import palmcore

def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

cap = vm_bytes() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
results = {}
configs = {
    # 5.9e13 parameters: 433 TiB of parameters and gradients, yet below the runtime's 2^48 cap.
    "layers": dict(vocab_size=256, d_model=64, n_layers=10**9, n_heads=4),
    # Every extent at its largest: the parameter count itself is beyond what can be counted.
    "overflow": dict(vocab_size=2**31 - 1, d_model=2**31 - 1, n_layers=2**31 - 1, n_heads=1,
                     head_dim=2**30, ffn_dim=2**31 - 1),
}
for name, fields in configs.items():
    c = palmcore.PaLMConfig(**fields)
    # PALM_SPEC's parameters, counted without listing the layers (as PaLMConfig.num_params does)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    params = c.vocab_size * c.d_model + c.n_layers * c.d_model * (1 + 2 * q + 2 * kv + 3 * c.ffn_dim) + c.d_model
    try:
        palmcore.PaLM(c)
        results[name] = ["built", "", params]
    except Exception as e:
        results[name] = [type(e).__name__, str(e), params]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def absurd_models():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PALMCORE_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_absurd_layer_count_is_refused_with_bytes_needed_and_available(absurd_models):
    kind, message, params = absurd_models["layers"]
    assert kind == "ValueError", message
    found = re.fullmatch(r"out of memory: the model needs [\d.]+ TiB \((\d+) bytes\) for its parameters and "
                         r"gradients \((\d+) parameters, float32\) but (.+) are available", message)
    assert found, message
    assert int(found[2]) == params
    assert int(found[1]) == 8 * params  # float32 parameters and gradients
    assert re.search(r"\d", found[3])


def test_parameter_count_beyond_the_runtime_is_refused(absurd_models):
    kind, message, _ = absurd_models["overflow"]
    assert kind == "ValueError", message


@pytest.fixture
def limited():
    """Sets palmcore's memory limit to `headroom` bytes above what it holds now; resets it after."""
    def set_headroom(headroom: int) -> int:
        limit = _core.allocated_bytes() + headroom
        _core.set_memory_limit(limit)
        assert _core.get_memory_limit() == limit
        return limit
    try:
        yield set_headroom
    finally:
        _core.set_memory_limit(0)


def test_limit_refuses_a_batch_and_the_model_still_works(limited):
    model = palmcore.PaLM(palmcore.PaLMConfig(**SMALL), seed=0)
    tokens = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(2, 16), dtype=np.int32)
    expected = model.forward(tokens)
    limited(4 * MiB)
    held = _core.allocated_bytes()
    big = np.zeros((64, SMALL["max_seq_len"]), np.int32)  # tens of MiB of activations
    with pytest.raises(ValueError, match=r"out of memory: palmcore needs .* \(\d+ bytes\) for a tensor of shape "
                                         r"\[.*\] but .* are available; palmcore's memory limit is"):
        model.forward(big)
    with pytest.raises(ValueError, match="out of memory"):
        model.forward_backward(big, big)
    assert _core.allocated_bytes() == held  # what the refused calls had built is freed
    np.testing.assert_array_equal(model.forward(tokens), expected)
    np.testing.assert_allclose(model.forward(tokens[:1]), expected[:1], rtol=1e-5, atol=1e-6)  # new buffers
    assert np.isfinite(model.forward_backward(tokens, tokens)["loss"])


def test_limit_refuses_a_model(limited):
    limited(MiB)
    with pytest.raises(ValueError, match=r"out of memory: the model needs .* for its parameters and gradients "
                                         r"\(\d+ parameters, float32\) but .* are available"):
        palmcore.PaLM(palmcore.PaLMConfig(**dict(SMALL, d_model=256, n_heads=4)))


def test_limit_refuses_a_cache_too_large(limited):
    model = palmcore.PaLM(palmcore.PaLMConfig(**SMALL), seed=0)
    limited(MiB)
    with pytest.raises(ValueError, match=r"out of memory: the key/value cache needs .* for the keys and values "
                                         r"of 64 slots x 256 positions but .* are available"):
        model.kv_cache(slots=64, capacity=256)  # 4 MiB
    cache = model.kv_cache(slots=1, capacity=16)
    assert cache.feed([1, 2, 3]).shape == (1, SMALL["vocab_size"])


def test_allocated_bytes_follow_a_model():
    gc.collect()
    before = _core.allocated_bytes()
    model = palmcore.PaLM(palmcore.PaLMConfig(**SMALL), seed=0)
    assert _core.allocated_bytes() - before >= 8 * model.num_params()  # parameters and gradients
    del model
    gc.collect()
    assert _core.allocated_bytes() == before


def test_available_memory_is_a_byte_count():
    assert isinstance(_core.available_memory(), int) and _core.available_memory() > 0


@pytest.mark.parametrize("value,limit", [("8G", 8 << 30), ("500M", 500 << 20), ("1.5GiB", 3 << 29), ("4096", 4096),
                                         ("lots", None), ("-1G", None), ("0", None)])
def test_memory_limit_from_the_environment(value, limit):
    """PALMCORE_MEMORY_LIMIT sets palmcore.set_memory_limit; a bad value is named and ignored."""
    proc = subprocess.run([sys.executable, "-c", "import palmcore; print(palmcore.get_memory_limit())"],
                          env={**os.environ, "PALMCORE_MEMORY_LIMIT": value}, cwd="/", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(limit)
    if limit is None:
        assert f"PALMCORE_MEMORY_LIMIT={value!r} is not a size" in proc.stderr


def test_the_public_limit_refuses_a_batch():
    model = palmcore.PaLM(palmcore.PaLMConfig(**SMALL))
    try:
        palmcore.set_memory_limit(_core.allocated_bytes() + MiB)
        with pytest.raises(ValueError, match=r"out of memory: palmcore needs .* bytes\) for a tensor of shape"):
            model.forward(np.ones((64, 256), np.int64))
        with pytest.raises(TypeError, match=r"the memory limit must be an integer"):
            palmcore.set_memory_limit(1.5)
    finally:
        palmcore.set_memory_limit(None)
    assert palmcore.get_memory_limit() is None
    assert model.forward(np.ones((64, 256), np.int64)).shape == (64, 256, 64)


def test_an_address_space_limit_counts_as_the_memory_available():
    """Under `ulimit -v`, the guard refuses what the limit would not allow (a ValueError naming
    the bytes), rather than letting the allocation fail with std::bad_alloc."""
    code = r"""
import resource, numpy as np, palmcore
cfg = palmcore.PaLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=256)
model = palmcore.PaLM(cfg)
vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize")][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
tokens = np.ones((4000, 256), np.int32)
try:
    model.forward_backward(tokens, tokens)
    print("allocated")
except ValueError as e:
    print("refused:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PALMCORE_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"refused: out of memory: palmcore needs .* bytes\) for a tensor of shape .* are available",
                     proc.stdout), proc.stdout + proc.stderr
