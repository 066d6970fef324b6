"""Decode benchmark (issue 4): palmcore's KV-cached greedy decoding in tokens/s at batch 1 and
16, against the bound set by memory bandwidth and against the same decode in PyTorch eager
(bench/torch_palm.py, preallocated KV cache, same weights, prompts and thread count).

  python bench/bench_generate.py                       # palmcore only
  PYTHONPATH=<palmcore> /work/torchvenv/bin/python bench/bench_generate.py --torch

Each row: prompts of --prompt tokens, prefilled at once, then greedy steps to --new tokens.
Decode tokens/s = B · (new - 1) / (time of the steps after the prefill), the median of
--repeats runs. Bound: a decode step reads every parameter once (the tied embedding for the
logits), so tokens/s <= B · bandwidth / parameter bytes. Two bandwidths, both measured on a
buffer as large as the parameters (so they come from the memory level the weights live in):
the copy bandwidth (memcpy, bytes read + written per second: the issue's bound) and the read
bandwidth (a parallel sum: what a decode step actually does, and the tighter bound).

--weights fp32,bf16,int8 times each compact decode format (PaLM.set_weights) side by side, the
formats alternating run by run; a format's bound counts the bytes it reads (bf16 2 bytes a GEMM
weight, int8 1 + 4/32, the norms 4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_train import bench_configs  # noqa: E402


def palmcore_decode(palmcore, model, prompts, new):
    """(new tokens [B, new], prefill s, decode s) with palmcore's decoder."""
    import time  # noqa: PLC0415

    gen = model.generation([list(map(int, p)) for p in prompts], max_new_tokens=new, temperature=0.0,
                           top_k=0, top_p=1.0, stop_tokens=())
    t0 = time.perf_counter()
    gen.step()
    t1 = time.perf_counter()
    gen.run()
    t2 = time.perf_counter()
    return np.array(gen.outputs), t1 - t0, t2 - t1


def torch_child(name, batch, prompts, new, repeats, threads, state_dict):
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, prompts=prompts, **state_dict)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", weights, "--configs", name,
               "--new", str(new), "--repeats", str(repeats), "--threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line[5:] for line in out.splitlines() if line.startswith("JSON ")))


def run_child(args):
    import torch  # noqa: PLC0415

    from torch_palm import TorchPaLM  # noqa: PLC0415

    cfg = bench_configs(_config_class())[args.configs][0]
    with np.load(args.child) as f:
        prompts = f["prompts"]
        sd = {k: f[k] for k in f.files if k != "prompts"}
    model = TorchPaLM(cfg, sd, threads=args.threads)
    runs = [model.greedy_decode(prompts, args.new) for _ in range(args.repeats)]
    decode = statistics.median(r[2] for r in runs)
    print("JSON " + json.dumps({"tokens": runs[0][0].tolist(), "decode_s": decode,
                                "prefill_s": statistics.median(r[1] for r in runs),
                                "torch": torch.__version__}))


def _config_class():
    from bench_train import _config_class as find, _import_palmcore  # noqa: PLC0415

    return find(_import_palmcore()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="seed,100m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=None, help="new tokens per row (default 128 seed, 32 100m)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--weights", default="fp32", help="decode weight formats, e.g. fp32,bf16,int8")
    ap.add_argument("--torch", action="store_true", help="also time PyTorch eager (in a child process)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)

    import palmcore  # noqa: PLC0415

    palmcore.set_num_threads(args.threads)
    configs = bench_configs(palmcore.PaLMConfig)
    rows = []
    for name in args.configs.split(","):
        cfg = configs[name][0]
        new = args.new or (128 if name == "seed" else 32)
        model = palmcore.PaLM(cfg, seed=0)
        formats = args.weights.split(",")
        format_bytes = {f: decode_bytes(model, f) for f in formats}
        copy_gbps = {f: palmcore._core.measure_copy_gbps(b, 5) for f, b in format_bytes.items()}
        read_gbps = {f: palmcore._core.measure_read_gbps(b, 5) for f, b in format_bytes.items()}
        sd = model.state_dict() if args.torch else None
        for batch in map(int, args.batches.split(",")):
            prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt)).astype(np.int32)
            runs = {f: [] for f in formats}
            for _ in range(args.repeats):  # the formats alternate, so a busy moment hits them alike
                for f in formats:
                    model.set_weights(f)
                    runs[f].append(palmcore_decode(palmcore, model, prompts, new))
            for f in formats:
                rows.append(report(name, cfg, batch, new, f, runs[f], format_bytes[f], copy_gbps[f], read_gbps[f]))
            if args.torch:
                row = rows[-len(formats)]
                t = torch_child(name, batch, prompts, new, args.repeats, args.threads, sd)
                row.update(t_tps=batch * (new - 1) / t["decode_s"],
                           same=bool(np.array_equal(np.array(t["tokens"]), runs[formats[0]][0][0])))
                print(f"   torch {t['torch']}: {row['t_tps']:,.1f} tok/s -> palmcore/torch "
                      f"{row['tps'] / row['t_tps']:.2f}x, same tokens: {row['same']}", flush=True)
        model.set_weights("fp32")
    print_table(rows, args.torch)


def decode_bytes(model, weights: str) -> int:
    """The bytes a decode step reads with `weights`: every parameter once (the embedding twice
    would be the lookup of B rows: negligible), GEMM weights and the embedding in their format."""
    per_weight = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4.0 / 32}[weights]
    gemm = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down")
    total = 0.0
    for name, shape in model.config.param_shapes().items():
        n = int(np.prod(shape))
        total += n * (per_weight if name == "embed" or name.endswith(gemm) else 4.0)
    return int(total)


def report(name, cfg, batch, new, weights, runs, param_bytes, copy_gbps, read_gbps) -> dict:
    decode_s = statistics.median(r[2] for r in runs)
    tps = batch * (new - 1) / decode_s
    bound = batch * copy_gbps * 1e9 / param_bytes
    read_bound = batch * read_gbps * 1e9 / param_bytes
    row = dict(config=name, params=cfg.num_params(), B=batch, new=new, weights=weights, tps=tps,
               step_ms=decode_s / (new - 1) * 1e3, prefill_ms=statistics.median(r[1] for r in runs) * 1e3,
               copy_gbps=copy_gbps, bound=bound, read_gbps=read_gbps, read_bound=read_bound)
    print(f"{name} {weights} B={batch}: {tps:,.1f} tok/s ({row['step_ms']:.2f} ms/step, prefill "
                  f"{row['prefill_ms']:.1f} ms); bound {bound:,.1f} tok/s at copy {copy_gbps:.1f} GB/s "
                  f"-> {tps / bound:.0%}; {read_bound:,.1f} tok/s at read {read_gbps:.1f} GB/s "
                  f"-> {tps / read_bound:.0%}", flush=True)
    return row


def print_table(rows, with_torch: bool) -> None:
    head = ["config", "weights", "B", "palmcore tok/s", "ms/step", "copy bound tok/s", "of copy bound",
            "read bound tok/s", "of read bound"]
    if with_torch:
        head += ["torch eager tok/s", "palmcore/torch", "same tokens"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r['config']} ({r['params'] / 1e6:.1f}M)", r["weights"], str(r["B"]), f"{r['tps']:,.1f}", f"{r['step_ms']:.2f}",
                 f"{r['bound']:,.1f} ({r['copy_gbps']:.1f} GB/s)", f"{r['tps'] / r['bound']:.0%}",
                 f"{r['read_bound']:,.1f} ({r['read_gbps']:.1f} GB/s)", f"{r['tps'] / r['read_bound']:.0%}"]
        if with_torch and "t_tps" in r:
            cells += [f"{r['t_tps']:,.1f}", f"{r['tps'] / r['t_tps']:.2f}×", str(r["same"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
