"""Training-step benchmark (issue 2): palmcore forward+backward throughput on the CPU, its
achieved GFLOP/s against palmcore's own measured SGEMM rate, and (optionally) the same step
in plain PyTorch eager (bench/torch_palm.py) with the same weights and thread count.

Configurations (defaults; --batch/--seq override both):
  seed   the `seed` preset (V=10000, D=256, L=6, H=8, dh=32, F=1024, Hkv=1), B=8, T=256
  100m   D=768, L=12, H=12, Hkv=1, V=32000, F=3072, B=8, T=512

Usage (from the repository root):
  # palmcore only (the built package on PYTHONPATH, or installed)
  python bench/bench_train.py
  # palmcore and PyTorch: run with a Python that has torch (kept out of the repo and CI)
  PYTHONPATH=<where palmcore is importable> /work/torchvenv/bin/python bench/bench_train.py --torch
  # (torch runs in a fresh process on the same weights; --same-process keeps it in this one)
  # PyTorch only (needs no built palmcore; random spec-init weights)
  /work/torchvenv/bin/python bench/bench_train.py --only-torch --threads 2

A step is: zero the gradients, forward, loss, backward (no optimizer update), so every step
sees the same weights and the two losses can be compared. Times are the median of --steps
steps after --warmup untimed ones. FLOPs per token are cfg.flops_per_token(T) (the PaLM
paper's 6N + 12·L·H·dh·T).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_PY = os.path.join(os.path.dirname(HERE), "python")
sys.path.insert(0, HERE)

TOKEN_DTYPE = np.int32  # palmcore's token tensors are int32


def _import_palmcore():
    """palmcore, or None (with the reason) when it cannot be imported."""
    try:
        import palmcore  # noqa: F401
        return palmcore, None
    except Exception as e:  # not built / not on the path
        return None, f"{type(e).__name__}: {e}"


def _config_class(palmcore):
    if palmcore is not None:
        return palmcore.PaLMConfig
    # Before the C++ core is built: load config.py by path (it imports nothing of palmcore).
    path = os.path.join(REPO_PY, "palmcore", "config.py")
    spec = importlib.util.spec_from_file_location("_palmcore_config", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.PaLMConfig


def bench_configs(PaLMConfig):
    """name -> (cfg, B, T)."""
    return {
        "seed": (PaLMConfig.preset("seed"), 8, 256),
        "100m": (PaLMConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                            n_kv_heads=1, ffn_dim=3072), 8, 512),
    }


def spec_init_state_dict(cfg, seed=0):
    """Random spec-init float32 weights (used only when palmcore is not available)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in cfg.param_shapes().items():
        if name.endswith("norm.scale"):
            sd[name] = np.ones(shape, dtype=np.float32)
        else:
            std = 1.0 if name == "embed" else shape[0] ** -0.5
            sd[name] = (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return sd


def gemm_shapes(cfg, B, T):
    """(m, n, k) shapes of a training step's big GEMMs, plus a fixed reference shape."""
    M, D, F = B * T, cfg.d_model, cfg.ffn_dim
    qkv = cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
    shapes = [(M, F, D), (M, D, F), (M, qkv + 2 * F, D), (M, cfg.vocab_size, D),
              (4096, 3072, 768)]
    out = []
    for s in shapes:  # dedupe, keep order
        if s not in out:
            out.append(s)
    return out


def time_steps(step, warmup, steps):
    """(median seconds, list of seconds, first result). step() -> loss."""
    first = None
    for _ in range(warmup):
        r = step()
        first = r if first is None else first
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        r = step()
        times.append(time.perf_counter() - t0)
        first = r if first is None else first
    return statistics.median(times), times, first


def torch_sgemm_gflops(torch, m, n, k, repeats=5):
    a = torch.randn(m, k)
    b = torch.randn(k, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * n * k / best / 1e9


def torch_in_child(name, B, T, steps, args, state_dict):
    """Time torch on the same weights in a fresh process, so that palmcore's OpenMP runtime
    (and torch's) each have the machine to themselves."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, **state_dict)
        cmd = [sys.executable, os.path.abspath(__file__), "--only-torch", "--json",
               "--configs", name, "--batch", str(B), "--seq", str(T), "--steps", str(steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--weights", weights]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line[5:] for line in out.splitlines() if line.startswith("JSON ")))


def main():
    ap = argparse.ArgumentParser(description="palmcore training-step benchmark (issue 2)")
    ap.add_argument("--configs", default="seed,100m",
                    help="comma-separated subset of: seed, 100m (default: both)")
    ap.add_argument("--batch", type=int, default=None, help="override B for every config")
    ap.add_argument("--seq", type=int, default=None, help="override T for every config")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for palmcore and torch (default: all usable cores)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (default: 10 for seed, 3 for 100m)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--gemm-repeats", type=int, default=5)
    ap.add_argument("--torch", action="store_true",
                    help="also time PyTorch eager (bench/torch_palm.py) on the same weights")
    ap.add_argument("--only-torch", action="store_true",
                    help="time PyTorch only (no palmcore needed; random spec-init weights)")
    ap.add_argument("--same-process", action="store_true",
                    help="with --torch, time torch in this process instead of a fresh one "
                         "(two OpenMP runtimes in one process can slow each other)")
    ap.add_argument("--weights", help=argparse.SUPPRESS)  # child mode: .npz state dict
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()

    palmcore, why = _import_palmcore()
    if palmcore is None and not args.only_torch:
        sys.exit(f"cannot import palmcore ({why}); build it and put it on PYTHONPATH, "
                 f"or use --only-torch")
    run_palmcore = not args.only_torch
    run_torch = args.torch or args.only_torch
    torch = None
    if run_torch and run_palmcore and not args.same_process:
        # torch runs in a child process; only check here that it is there
        if importlib.util.find_spec("torch") is None:
            print("note: PyTorch is not importable here; skipping the PyTorch comparison "
                  "(run with /work/torchvenv/bin/python)")
            run_torch = False
    elif run_torch:
        try:
            import torch  # noqa: F811
            from torch_palm import TorchPaLM
        except ImportError as e:
            print(f"note: PyTorch is not importable here ({e}); skipping the PyTorch comparison "
                  f"(run with /work/torchvenv/bin/python)")
            run_torch = False
            if not run_palmcore:
                sys.exit(1)

    all_cfgs = bench_configs(_config_class(palmcore))
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_cfgs]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {', '.join(all_cfgs)}")

    print(f"threads={args.threads}  warmup={args.warmup}"
          + (f"  torch {torch.__version__}" if torch is not None else ""))
    if run_palmcore:
        palmcore.set_num_threads(args.threads)
    rows = []
    for name in names:
        cfg, B, T = all_cfgs[name]
        B = args.batch or B
        T = args.seq or T
        steps = args.steps or (10 if name == "seed" else 3)
        ntok = B * T
        fpt = cfg.flops_per_token(T)
        print(f"\n== {name}: V={cfg.vocab_size} D={cfg.d_model} L={cfg.n_layers} "
              f"H={cfg.n_heads} Hkv={cfg.n_kv_heads} dh={cfg.head_dim} F={cfg.ffn_dim}  "
              f"B={B} T={T}  params={cfg.num_params() / 1e6:.1f}M  "
              f"{fpt / 1e6:.1f} MFLOP/token  steps={steps}")
        rng = np.random.default_rng(1234)
        seq = rng.integers(0, cfg.vocab_size, size=(B, T + 1)).astype(TOKEN_DTYPE)
        tokens = np.ascontiguousarray(seq[:, :-1])
        targets = np.ascontiguousarray(seq[:, 1:])
        row = {"config": name, "B": B, "T": T}

        if run_palmcore:
            shapes = gemm_shapes(cfg, B, T)
            rates = {s: palmcore._core.measure_sgemm_gflops(*s, args.gemm_repeats)
                     for s in shapes}
            best = max(rates, key=rates.get)
            gemm = rates[best]
            print("  palmcore SGEMM GFLOP/s: " + ", ".join(
                f"{m}x{n}x{k} {r:.1f}" for (m, n, k), r in rates.items())
                + f"  -> best {gemm:.1f}")
            model = palmcore.PaLM(cfg, seed=0)

            def pc_step():
                model.zero_grad()
                return model.forward_backward(tokens, targets)["loss"]

            med, times, pc_loss = time_steps(pc_step, args.warmup, steps)
            tps = ntok / med
            gf = fpt * tps / 1e9
            print(f"  palmcore: step {med * 1e3:.1f} ms (median of {steps}; "
                  f"min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})  "
                  f"{tps:,.0f} tokens/s  {gf:.1f} GFLOP/s  = {gf / gemm:.1%} of SGEMM  "
                  f"loss {pc_loss:.6f}")
            row.update(pc_tps=tps, pc_gf=gf, gemm=gemm, pc_frac=gf / gemm, pc_loss=pc_loss)
            sd = model.state_dict()
        elif args.weights:
            with np.load(args.weights) as f:
                sd = {name: f[name] for name in f.files}
        else:
            sd = spec_init_state_dict(cfg, seed=0)

        if run_torch and run_palmcore and not args.same_process:
            row.update(torch_in_child(name, B, T, steps, args, sd))
            del sd
            t_loss, tps = row["t_loss"], row["t_tps"]
            print(f"  torch:    {tps:,.0f} tokens/s  {row['t_gf']:.1f} GFLOP/s  "
                  f"(own process; its SGEMM {row['t_gemm']:.1f})  loss {t_loss:.6f}")
            rel = abs(row["pc_loss"] - t_loss) / abs(t_loss)
            row["loss_rel"] = rel
            print(f"  palmcore/torch speed {row['pc_tps'] / tps:.2f}x;  rel loss diff {rel:.1e} "
                  + ("ok" if rel < 1e-4 else "MISMATCH (want < 1e-4)"))
        elif run_torch:
            tm = TorchPaLM(cfg, sd, threads=args.threads)
            del sd
            t_gemm = max(torch_sgemm_gflops(torch, *s) for s in gemm_shapes(cfg, B, T))
            med, times, t_loss = time_steps(lambda: tm.train_step(tokens, targets),
                                            args.warmup, steps)
            tps = ntok / med
            gf = fpt * tps / 1e9
            print(f"  torch:    step {med * 1e3:.1f} ms (median of {steps}; "
                  f"min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})  "
                  f"{tps:,.0f} tokens/s  {gf:.1f} GFLOP/s  = {gf / t_gemm:.1%} of torch's "
                  f"SGEMM ({t_gemm:.1f})  loss {t_loss:.6f}")
            row.update(t_tps=tps, t_gf=gf, t_gemm=t_gemm, t_loss=t_loss)
            if args.json:
                print("JSON " + json.dumps({k: row[k] for k in ("t_tps", "t_gf", "t_gemm", "t_loss")}))
            del tm
            if run_palmcore:
                rel = abs(row["pc_loss"] - t_loss) / abs(t_loss)
                row["loss_rel"] = rel
                verdict = "ok" if rel < 1e-4 else "MISMATCH (want < 1e-4)"
                print(f"  palmcore/torch speed {row['pc_tps'] / tps:.2f}x;  losses palmcore "
                      f"{row['pc_loss']:.7f} torch {t_loss:.7f}  rel diff {rel:.1e} {verdict}")
        rows.append(row)

    # markdown summary
    print()
    head = ["config", "B×T"]
    if run_palmcore:
        head += ["palmcore tok/s", "palmcore GFLOP/s", "SGEMM GFLOP/s", "of SGEMM"]
    if run_torch:
        head += ["torch tok/s", "torch GFLOP/s"]
    if run_palmcore and run_torch:
        head += ["palmcore/torch", "loss palmcore", "loss torch", "rel diff"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["config"], f"{r['B']}×{r['T']}"]
        if run_palmcore:
            cells += [f"{r['pc_tps']:,.0f}", f"{r['pc_gf']:.1f}", f"{r['gemm']:.1f}",
                      f"{r['pc_frac']:.0%}"]
        if run_torch:
            cells += [f"{r['t_tps']:,.0f}", f"{r['t_gf']:.1f}"]
        if run_palmcore and run_torch:
            cells += [f"{r['pc_tps'] / r['t_tps']:.2f}×", f"{r['pc_loss']:.6f}",
                      f"{r['t_loss']:.6f}", f"{r['loss_rel']:.1e}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\n(threads={args.threads}; step = zero_grad + forward + backward, median of timed "
          f"steps; GFLOP/s = flops_per_token(T) × tokens/s)")


if __name__ == "__main__":
    main()
