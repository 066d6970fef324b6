"""The mesh and its communicators: single-process behaviour, and MPI runs under mpiexec
(oversubscribed on this 2-core machine; tiny arrays; every run bounded by a timeout)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import palmcore
from palmcore import _core

from helpers import mpiexec, scaled_err

HERE = os.path.dirname(os.path.abspath(__file__))


def launch(ranks: int, *args: str, script: str = "mpi_collectives.py", timeout: float = 120):
    env = {**os.environ, "PALMCORE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, os.path.join(HERE, script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_single_process_mesh():
    mesh = palmcore.Mesh()
    assert (mesh.data, mesh.model, mesh.world_rank, mesh.is_main) == (1, 1, 0, True)
    x = np.arange(5, dtype=np.float32)
    mesh.model_comm.all_reduce_sum(x)
    assert np.array_equal(x, np.arange(5)) and mesh.model_comm.bytes_sent == 0
    assert np.array_equal(mesh.data_comm.all_gather(x), x)
    assert np.array_equal(mesh.data_comm.reduce_scatter_sum(x), x)


def test_a_mesh_larger_than_the_world_is_refused():
    with pytest.raises(ValueError, match=r"mesh data=2 x model=2 needs 4 ranks, but the world has 1 "
                                         r"\(launch with mpiexec -n 4\)"):
        palmcore.Mesh(data=2, model=2)
    with pytest.raises(ValueError, match="mesh axis 'model' must be a positive integer"):
        palmcore.Mesh(model=0)


def test_built_with_mpi():
    """CI installs the mpi extra, and the build finds MPICH's mpi.h through the mpich wheel."""
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    assert _core.built_with_mpi()


@pytest.mark.parametrize("data,model", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_collectives_on_every_mesh(data, model):
    done = launch(data * model, str(data), str(model))
    assert done.returncode == 0, done.stdout + done.stderr
    # ranks share stdout, so their lines may interleave
    assert sorted(int(r) for r in re.findall(r"OK (\d+)", done.stdout)) == list(range(data * model))


def test_a_mesh_that_does_not_divide_the_world_fails_on_every_rank():
    done = launch(3, "2", "2")
    assert done.returncode != 0
    assert done.stderr.count("mesh data=2 x model=2 needs 4 ranks, but the world has 3") == 3


@pytest.mark.parametrize("how", ["die", "raise"])
def test_a_dead_rank_ends_the_run_instead_of_hanging(how):
    """Rank 1 exits (or raises an exception) before a collective that rank 0 is waiting in: the
    job ends with an error well within the timeout (a hang would raise TimeoutExpired)."""
    done = launch(2, "2", "1", how, timeout=60)
    assert done.returncode != 0
    assert "OK" not in done.stdout
    if how == "raise":
        assert "RuntimeError: rank 1 fails" in done.stderr


MESHES = [(1, 1), (1, 2), (2, 1), (2, 2)]


def train_on_every_mesh(out, *args: str) -> dict:
    """tests/mpi_model.py on each mesh (args: its optional DEVICE and moe): 3 Adafactor steps,
    same seed and global batch; {(data, model): what the main rank saved}."""
    results = {}
    for data, model in MESHES:
        path = str(out / f"{data}x{model}.npz")
        done = launch(data * model, str(data), str(model), path, *args, script="mpi_model.py")
        assert done.returncode == 0, done.stdout + done.stderr
        with np.load(path) as f:
            results[(data, model)] = {k: f[k] for k in f.files}
    return results


@pytest.fixture(scope="module")
def trained_on_every_mesh(tmp_path_factory):
    return train_on_every_mesh(tmp_path_factory.mktemp("meshes"))


@pytest.fixture(scope="module")
def moe_trained_on_every_mesh(tmp_path_factory):
    """The same with a mixture-of-experts layer (issue 13)."""
    return train_on_every_mesh(tmp_path_factory.mktemp("moe-meshes"), "cpu", "moe")


@pytest.mark.parametrize("data,model", MESHES[1:])
def test_a_mixture_of_experts_trains_on_every_mesh_like_one_rank(moe_trained_on_every_mesh, data, model):
    """Experts split over the model axis, the router replicated, the routing statistics reduced
    over the data axis: 3 steps equal the 1 x 1 run as test_every_mesh_trains_like_one_rank's
    (1e-5, floor 1)."""
    one, other = moe_trained_on_every_mesh[(1, 1)], moe_trained_on_every_mesh[(data, model)]
    assert set(one) == set(other) and "layers.1.mlp.experts.w_gate" in one
    for name in one:
        assert scaled_err(other[name], one[name], floor=1.0) <= 1e-5, name


@pytest.mark.parametrize("data,model", MESHES[1:])
def test_every_mesh_trains_like_one_rank(trained_on_every_mesh, data, model):
    """After 3 optimizer steps the losses, the first step's logits and every gathered parameter
    agree with the 1 x 1 run: helpers.scaled_err <= 1e-5 with floor 1 (losses in nats, logits
    and parameters are O(1): norm scales ~1, a unit-std embedding), float32 sums in another
    order; seen: 2e-7."""
    one, other = trained_on_every_mesh[(1, 1)], trained_on_every_mesh[(data, model)]
    assert set(one) == set(other)
    for name in one:
        assert scaled_err(other[name], one[name], floor=1.0) <= 1e-5, name


def train(out, mesh: str, steps: int, corpus: str, resume: bool = False):
    """`palmcore train` of a tiny model on ``corpus``, under mpiexec with one rank per mesh
    device. Returns the losses of metrics.jsonl by step (the last line for a step wins)."""
    data, model = (int(part.split("=")[1]) for part in mesh.split(","))
    args = ["-m", "palmcore", "train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=32",
            "--set", "n_layers=1", "--set", "n_heads=2", "--set", "ffn_dim=64", "--batch-size", "4",
            "--seq-len", "16", "--eval-every", "2", "--steps", str(steps), "--out", str(out), "--mesh", mesh]
    env = {**os.environ, "PALMCORE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([mpiexec(), "-n", str(data * model), sys.executable, *args] + (["--resume"] if resume else []),
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, done


def test_train_on_a_mesh_and_resume_on_others(corpus, tmp_path):
    """`mpiexec -n 4 palmcore train --mesh data=2,model=2` follows the 1 x 1 loss curve; its
    checkpoint (full layout) resumes on 1 x 1, whose checkpoint resumes on 1 x 2, and the curve
    goes on as the straight run's (2x2 -> 1x1 -> 1x2). Tolerance: relative 1e-5 on every loss
    (seen: equal to 6-7 digits)."""
    straight, _ = train(tmp_path / "straight", "data=1,model=1", 8, corpus)
    run_dir = tmp_path / "moving"
    losses, done = train(run_dir, "data=2,model=2", 4, corpus)
    assert done.stdout.count("trained to step 4 ") == 1   # only the main rank prints its summary
    for mesh, steps in (("data=1,model=1", 6), ("data=1,model=2", 8)):
        losses, done = train(run_dir, mesh, steps, corpus, resume=True)
        assert f"resumed from {run_dir}" in done.stdout + done.stderr
    for step in range(1, 9):
        assert losses[step] == pytest.approx(straight[step], rel=1e-5), step


@pytest.mark.parametrize("field,value,match", [
    ("n_heads", 3, r"the model axis \(2\) must divide n_heads \(3\)"),
    ("ffn_dim", 15, r"the model axis \(2\) must divide ffn_dim \(15\)"),
    ("vocab_size", 31, r"the model axis \(2\) must divide vocab_size \(31\)"),
    ("n_experts", 3, r"the model axis \(2\) must divide n_experts \(3\)"),
])
def test_a_model_axis_that_does_not_divide_the_model_is_refused(field, value, match):
    code = (f"import palmcore\nfrom palmcore.config import PaLMConfig\n"
            f"cfg = PaLMConfig(**{{**dict(vocab_size=32, d_model=8, n_layers=1, n_heads=2, head_dim=4, ffn_dim=16), '{field}': {value}}})\n"
            f"try:\n    palmcore.PaLM(cfg, mesh=palmcore.Mesh(model=2))\n"
            f"except ValueError as e:\n    import os\n    os.write(1, f'refused: {{e}}\\n'.encode())\n")
    env = {**os.environ, "PALMCORE_NUM_THREADS": "1"}
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert len(re.findall("refused: " + match, done.stdout)) == 2
