"""NCCL: finding the library (on every machine: a clear error when it is absent or is not
NCCL), and what one GPU allows (world size 1 through NCCL: every collective on float32,
bfloat16 and float64; a model and its optimizer on NCCL communicators equal to no mesh; the
communicator/device mismatch errors). GPU tests skip with "no CUDA device"; meshes of several
GPUs run tests/mpi_model.py where the machine has enough of them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import palmcore
from palmcore import _core
from palmcore.config import PaLMConfig

from helpers import mpiexec, scaled_err

HERE = os.path.dirname(os.path.abspath(__file__))
needs_cuda = pytest.mark.skipif(not palmcore.cuda_available(), reason="no CUDA device")


def in_subprocess(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh Python (NCCL is opened once per process), with `env` added."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def nccl_found():
    """(version, path) of the NCCL this process finds, or None."""
    try:
        return _core.nccl_library_info()
    except RuntimeError:
        return None


def test_an_absent_nccl_library_is_named_in_the_error(tmp_path):
    """PALMCORE_NCCL_LIBRARY names an empty folder: asking for NCCL (its version, a unique id)
    raises RuntimeError naming the variable, the file it looked for and the loader's reason;
    `palmcore info` prints the same reason instead of failing."""
    code = ("from palmcore import _core\n"
            "for call in (_core.nccl_library_info, _core.nccl_unique_id):\n"
            "    try:\n        call()\n    except RuntimeError as e:\n        print('refused:', e)\n")
    done = in_subprocess(code, PALMCORE_NCCL_LIBRARY=str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    want = (f"refused: NCCL not found: PALMCORE_NCCL_LIBRARY={tmp_path} names no loadable libnccl.so.2 "
            f"({tmp_path}/libnccl.so.2: cannot open shared object file: No such file or directory)")
    assert lines == [want, want], done.stdout
    if _core.build_info()["nccl"]:
        info = subprocess.run([sys.executable, "-m", "palmcore", "info"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PALMCORE_NCCL_LIBRARY": str(tmp_path)})
        assert info.returncode == 0, info.stderr
        assert f"NCCL      yes, loaded at run time; NCCL not found: PALMCORE_NCCL_LIBRARY={tmp_path}" in info.stdout


def test_a_library_that_is_not_nccl_is_refused(tmp_path):
    """A libnccl.so.2 that is some other library (here OpenBLAS): the error says it is not NCCL."""
    import scipy_openblas32  # noqa: PLC0415

    blas = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library() + ".so")
    if not os.path.exists(blas):
        blas = os.path.join(scipy_openblas32.get_lib_dir(), "lib" + scipy_openblas32.get_library() + ".so")
    (tmp_path / "libnccl.so.2").symlink_to(blas)
    done = in_subprocess("from palmcore import _core\n_core.nccl_library_info()\n",
                         PALMCORE_NCCL_LIBRARY=str(tmp_path / "libnccl.so.2"))
    assert done.returncode != 0
    # (named by the file the loader took: OpenBLAS's own, already loaded in the process)
    assert re.search(r"RuntimeError: NCCL library \S+ has no ncclGetVersion: it is not NCCL 2", done.stderr), done.stderr


@pytest.mark.skipif(nccl_found() is None, reason="libnccl.so.2 not found here (pip install nvidia-nccl-cu13)")
def test_the_library_found_gives_its_version_and_unique_ids():
    """The NCCL found here, then the same one named through PALMCORE_NCCL_LIBRARY (its folder):
    a 2.x version, the file it came from, and 128-byte unique ids, a new one each time (none of
    this needs a GPU)."""
    version, path = nccl_found()
    assert 21000 <= version < 30000 and os.path.exists(path)
    a, b = _core.nccl_unique_id(), _core.nccl_unique_id()
    assert isinstance(a, bytes) and len(a) == len(b) == 128 and a != b
    done = in_subprocess("from palmcore import _core\nprint(*_core.nccl_library_info())\n",
                         PALMCORE_NCCL_LIBRARY=os.path.dirname(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(version), os.path.join(os.path.dirname(path), "libnccl.so.2")]


def test_a_mesh_names_its_device():
    """Mesh's device is checked; a one-process mesh keeps what it was given (a model on it asks
    for "cuda" and gets that device)."""
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        palmcore.Mesh(device="gpu")
    mesh = palmcore.Mesh(device="cuda:3")
    assert mesh.device == "cuda:3" and mesh.model_device("cuda") == "cuda:3" and mesh.model_device("cpu") == "cpu"
    assert palmcore.Mesh().model_device("cuda") == "cuda"


def test_a_nccl_communicator_needs_a_usable_gpu():
    """Without a usable GPU, making a NCCL communicator raises RuntimeError saying why (before
    NCCL is asked for anything); with one, world size 1 needs nobody else."""
    if palmcore.cuda_available():
        assert _core.Communicator.nccl(_core.nccl_unique_id(), 0, 1, device="cuda:0").size == 1
        return
    with pytest.raises(RuntimeError, match=r"device 'cuda:0' cannot be used: "):
        _core.Communicator.nccl(b"\0" * 128, 0, 1, device="cuda:0")
    with pytest.raises(ValueError, match="a NCCL communicator works on a CUDA device, not 'cpu'"):
        _core.Communicator.nccl(b"\0" * 128, 0, 1, device="cpu")


def test_a_gpu_mesh_needs_a_gpu_per_rank():
    """`mpiexec -n 2` of Mesh(data=2, device="cuda") on a machine with fewer than 2 usable GPUs:
    the job ends with the reason (CUDA not usable here, or rank 1 has no GPU of its local rank)
    instead of waiting in NCCL."""
    n = len(_core.cuda_devices()) if palmcore.cuda_available() else 0
    if n >= 2:
        pytest.skip("this machine has a GPU per rank (test_a_mesh_of_gpus_trains_like_one_cpu_rank runs instead)")
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c",
                           "import palmcore\npalmcore.Mesh(data=2, device='cuda')\n"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    if n == 1:
        assert ("RuntimeError: rank 1 is rank 1 on its node, which has 1 CUDA devices: launch at most one rank "
                "per GPU on each node") in done.stderr
    else:
        reason = _core.cuda_unavailable_reason()
        assert f"RuntimeError: device 'cuda' cannot be used on rank 0: {reason}" in done.stderr or \
            f"RuntimeError: device 'cuda' cannot be used on rank 1: {reason}" in done.stderr, done.stderr


# ---- one GPU: world size 1 through NCCL ---------------------------------------------------

def to_bf16(x):
    """bfloat16 bits (uint16) of values that bfloat16 holds exactly."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.fixture(scope="module")
def nccl1():
    return _core.Communicator.nccl(_core.nccl_unique_id(), 0, 1, device="cuda:0")


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_every_collective_of_one_nccl_rank(nccl1, dtype):
    """Sum and max leave the values, reduce-scatter and all-gather copy them (through the GPU:
    the arrays go there, the collective runs on the compute stream, the result comes back);
    nothing is sent; the barrier returns."""
    assert (nccl1.rank, nccl1.size) == (0, 1) and nccl1.name == "NCCL, 1 ranks, on cuda:0"
    values = np.array([1.5, -2.0, 0.25, 3.0, -0.0, 65536.0, 7.0])
    make = {"float32": lambda v: np.asarray(v, np.float32), "float64": lambda v: np.asarray(v, np.float64),
            "bfloat16": to_bf16}[dtype]
    x = make(values)
    nccl1.all_reduce_sum(x)
    assert x.dtype == make(values).dtype and np.array_equal(x, make(values))
    nccl1.all_reduce_max(x)
    assert np.array_equal(x, make(values))
    assert np.array_equal(nccl1.reduce_scatter_sum(make(values)), make(values))
    assert np.array_equal(nccl1.all_gather(make(values)), make(values))
    nccl1.barrier()
    assert nccl1.bytes_sent == 0


def tiny_config() -> PaLMConfig:
    return PaLMConfig(vocab_size=38, d_model=12, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, ffn_dim=22,
                      max_seq_len=16, z_loss=1e-2)


ADAMW = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
ADAFACTOR = {"beta1": 0.9, "decay": 0.8, "clip": 1.0, "eps": 1e-30, "min_scale": 1e-3}


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_on_one_nccl_rank_equals_no_mesh(nccl1, precision):
    """A model whose model axis is a NCCL communicator of one rank, trained by optimizers on a
    NCCL data axis of one rank, gives the bits of the same model without communicators: logits,
    losses and the parameters after two AdamW and two Adafactor steps."""
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, size=(2, 9), dtype=np.int32) for _ in range(2)]
    results = []
    for comm in (None, nccl1):
        model = _core.Model(cfg.to_dict(), 3, 0, 1, comm, device="cuda:0")
        model.set_precision(precision)
        out = {"logits": model.forward(np.ascontiguousarray(batches[0][:, :-1]))}
        for kind, settings in (("adamw", ADAMW), ("adafactor", ADAFACTOR)):
            opt = _core.Optimizer(model, kind, settings, comm)
            for i, b in enumerate(batches):
                model.zero_grad()
                tokens, targets = np.ascontiguousarray(b[:, :-1]), np.ascontiguousarray(b[:, 1:])
                out[f"loss {kind} {i}"] = np.array(model.forward_backward(tokens, targets)["loss"])
                out[f"norm {kind} {i}"] = np.array(opt.step(1e-2, 1.0, 1.0))
        out.update({name: model.get_param(name) for name in model.param_names()})
        results.append(out)
    plain, on_nccl = results
    assert set(plain) == set(on_nccl)
    for name in plain:
        assert np.array_equal(on_nccl[name], plain[name]), name


@needs_cuda
def test_communicators_must_work_where_the_model_lives(nccl1):
    """NCCL communicators for a CPU model, and MPI ones for a CUDA model, are refused naming
    both; so is an optimizer whose data axis cannot work where the parameters are."""
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"the model axis communicator \(NCCL, 1 ranks, on cuda:0\) cannot work on "
                                         r"a cpu model: CUDA models need NCCL communicators"):
        _core.Model(cfg.to_dict(), 3, 0, 1, nccl1, device="cpu")
    cpu_model = palmcore.PaLM(cfg, seed=3)
    with pytest.raises(ValueError, match=r"the data axis communicator \(NCCL, 1 ranks, on cuda:0\) cannot work on "
                                         r"a cpu model"):
        _core.Optimizer(cpu_model.core, "adamw", ADAMW, nccl1)
    code = ("from mpi4py import MPI\nimport palmcore\nfrom palmcore import _core\n"
            "cfg = palmcore.PaLMConfig(vocab_size=38, d_model=12, n_layers=1, n_heads=2, head_dim=6, ffn_dim=8)\n"
            "comm = _core.Communicator.mpi(MPI.COMM_WORLD.py2f())\n"
            "try:\n    _core.Model(cfg.to_dict(), 0, 0, 1, comm, device='cuda')\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    done = subprocess.run([mpiexec(), "-n", "1", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: the model axis communicator (MPI, 1 ranks) cannot work on a cuda model" in done.stdout


# ---- several GPUs: tests/mpi_model.py on NCCL against one rank on the CPU ------------------

@pytest.mark.parametrize("data,model", [(2, 1), (1, 2), (2, 2)])
def test_a_mesh_of_gpus_trains_like_one_cpu_rank(tmp_path, data, model):
    """mpiexec -n D·M tests/mpi_model.py on CUDA (one GPU per rank, NCCL) against the same run
    on one CPU rank: losses, first logits and gathered parameters within 1e-5 (float32 sums in
    another order). Needs D·M GPUs."""
    n = len(_core.cuda_devices()) if palmcore.cuda_available() else 0
    if n < data * model:
        pytest.skip("no CUDA device" if n == 0 else f"needs {data * model} CUDA devices, this machine has {n}")
    env = {**os.environ, "PALMCORE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for ranks, args in ((1, ["1", "1", str(tmp_path / "cpu.npz")]),
                        (data * model, [str(data), str(model), str(tmp_path / "gpus.npz"), "cuda"])):
        done = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, os.path.join(HERE, "mpi_model.py"), *args],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        with np.load(args[2]) as f:
            runs[ranks] = {k: f[k] for k in f.files}
    one, gpus = runs[1], runs[data * model]
    assert set(one) == set(gpus)
    for name in one:
        assert scaled_err(gpus[name], one[name], floor=1.0) <= 1e-5, name
