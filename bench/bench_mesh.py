"""Sharded training-step benchmark (issue 5): step time and bytes communicated per step of the
~100M config of bench_train.py on a data x model mesh, one process per rank.

    mpiexec -n 1 python bench/bench_mesh.py --mesh data=1,model=1 --threads 2
    mpiexec -n 2 python bench/bench_mesh.py --mesh data=1,model=2 --threads 1
    mpiexec -n 2 python bench/bench_mesh.py --mesh data=2,model=1 --threads 1

A step: zero_grad, forward_backward of this data rank's share of a B x T batch, Adafactor step
(reduce-scatter of the gradients, the rank's share updated, parameters all-gathered). Time:
median of --steps steps after one warm-up. Bytes: sent by this rank through each axis's
collectives per step, counted as ring algorithms send them (Communicator.bytes_sent).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import palmcore  # noqa: E402
from bench_train import bench_configs  # noqa: E402
from palmcore.plan import MeshShape  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default="data=1,model=1")
    ap.add_argument("--config", default="100m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    palmcore.set_num_threads(args.threads)
    shape = MeshShape.parse(args.mesh)
    mesh = palmcore.Mesh(shape.data, shape.model)
    cfg = bench_configs(palmcore.PaLMConfig)[args.config][0]
    model = palmcore.PaLM(cfg, seed=0, mesh=mesh)
    opt = palmcore.Adafactor(model)
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    times, sent = [], []
    for step in range(args.steps + 1):
        batch = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
        rows = batch[mesh.data_index * B // shape.data:(mesh.data_index + 1) * B // shape.data]
        before = (mesh.model_comm.bytes_sent, mesh.data_comm.bytes_sent)
        mesh.barrier()
        t0 = time.perf_counter()
        model.zero_grad()
        out = model.forward_backward(rows[:, :-1], rows[:, 1:], total_tokens=B * T)
        opt.step(lr=1e-2)
        mesh.barrier()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
            sent.append((mesh.model_comm.bytes_sent - before[0], mesh.data_comm.bytes_sent - before[1]))
    step_s = statistics.median(times)
    mesh.print(f"| {args.config} {cfg.num_params() / 1e6:.1f}M | {shape.data}x{shape.model} | {args.threads} | "
               f"{B}x{T} | {step_s:.2f} | {B * T / step_s:,.0f} | {sent[-1][0] / 2**20:,.1f} | "
               f"{sent[-1][1] / 2**20:,.1f} | {model.num_params() / 1e6:.1f}M | {out['loss']:.4f} |")


if __name__ == "__main__":
    main()
