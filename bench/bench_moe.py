"""Sparse activation on the CPU (issue 13): a training step of `seed-moe` (8 experts, top-2,
every other layer sparse) against the dense model with the same ACTIVE parameters and the dense
model with the same TOTAL parameters; tokens/s, and held-out bits per byte after the same wall
time on the default corpus (the Python standard library). Every run: the same tokenizer, data,
batch (8 x 256), optimizer (Adafactor, palm schedule) and seed.

    python bench/bench_moe.py [--seconds 300] [--threads 2] [--out runs/bench-moe]

Dense equivalents (all six layers dense, ffn_dim chosen so the counts match within 1%):
  dense-active  ffn_dim = 1536: ~ seed-moe's active parameters per token
  dense-total   ffn_dim chosen so num_params ~ seed-moe's total (every expert)
Prints one table (and writes it to OUT/bench_moe.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="wall time of each training run")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-moe")
    args = parser.parse_args()

    import palmcore  # noqa: PLC0415
    from palmcore import PaLMConfig  # noqa: PLC0415
    from palmcore.data import stdlib_files  # noqa: PLC0415
    from palmcore.training import run, settings  # noqa: PLC0415

    if args.threads:
        palmcore.set_num_threads(args.threads)
    moe = PaLMConfig.preset("seed-moe")
    dense = PaLMConfig.preset("seed")
    per_unit = 6 * 3 * dense.d_model  # parameters per unit of ffn_dim over the six dense layers
    base = dense.num_params() - per_unit * dense.ffn_dim
    runs = {
        "seed-moe": ("seed-moe", {}),
        "dense-active": ("seed", {"ffn_dim": round((moe.num_active_params() - base) / per_unit)}),
        "dense-total": ("seed", {"ffn_dim": round((moe.num_params() - base) / per_unit)}),
    }
    rows = []
    tokenizer = None
    for name, (preset, overrides) in runs.items():
        out = os.path.join(args.out, name)
        s = settings(stdlib_files(), out=out, tokenizer=tokenizer, preset=preset, overrides=overrides, steps=10**9,
                     time_budget=args.seconds, eval_every=50, checkpoint_every=10**6, progress=False, sample_tokens=0)
        summary = run(s, log=lambda line: None)
        tokenizer = tokenizer or os.path.join(out, "tokenizer.model")  # every run: the first one's
        cfg = PaLMConfig.preset(preset, **overrides)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        speeds = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]
        speeds = speeds[min(5, len(speeds) // 2):]  # after the warm-up steps
        rows.append((name, cfg.num_params(), cfg.num_active_params(), summary["steps"],
                     sum(speeds) / max(1, len(speeds)), summary.get("val_bpb", float("nan"))))
        print(rows[-1], file=sys.stderr, flush=True)
    lines = [f"{'model':<13} {'params':>11} {'active':>11} {'steps':>6} {'tok/s':>8} {'val bpb':>8}"]
    lines += [f"{n:<13} {p:>11,} {a:>11,} {st:>6} {v:>8,.0f} {b:>8.3f}" for n, p, a, st, v, b in rows]
    lines.append(f"{args.seconds:.0f} s of training each, {palmcore.get_num_threads()} threads, batch 8 x 256")
    print("\n".join(lines))
    with open(os.path.join(args.out, "bench_moe.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
