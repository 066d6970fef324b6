"""A training step (forward, backward, Adafactor update) on one GPU, palmcore against PyTorch on
the same weights. Prints one table (and writes it to $OUT/train_step.txt when OUT is set):
tokens/s, MFU = flops_per_token(T) x tokens/s over the dense bf16 peak (989 TFLOP/s on
H100/H200 SXM), the same model FLOP rate as a share of the measured cuBLASLt bf16 GEMM rate
(at the config's w_gate shape: tokens x D -> F), and the peak GPU memory of each. palmcore runs
with the fast kernels (flash attention), and with the plain ones for the configs of --plain.

    python bench/gpu/train_step.py [--configs 350m,1.3b] [--plain 350m] [--seq 2048]
                                   [--tokens 16384] [--steps 3] [--precision bf16] [--no-torch]
                                   [--device cuda]
    python bench/gpu/train_step.py --configs tiny --seq 64 --tokens 256 --device cpu --no-torch   # smoke

Configs (vocabulary 32,000, multi-query attention as in PaLM; `tiny` for a smoke run and the
compute-sanitizer, head_dim 64 so that the flash kernels run):
    350m   D=1024, L=24, H=16, dh=64,  F=4096   (~0.36B parameters)
    1.3b   D=2048, L=24, H=16, dh=128, F=8192   (~1.3B parameters)
PyTorch runs PALM_SPEC's model (bench/torch_palm.py) on the same weights under bf16 autocast
with scaled_dot_product_attention, through torch.compile when it works there. Both sides time
forward + backward + an optimizer update (palmcore: its Adafactor; torch: torch.optim.Adafactor
where it exists, else AdamW).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PEAK_BF16 = 989e12
CONFIGS = {
    "tiny": dict(vocab_size=512, d_model=128, n_layers=2, n_heads=2, head_dim=64, ffn_dim=256, n_kv_heads=1),
    "350m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, head_dim=64, ffn_dim=4096, n_kv_heads=1),
    "1.3b": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, head_dim=128, ffn_dim=8192, n_kv_heads=1),
}


def timed(step, steps: int, sync) -> float:
    """Seconds per step: one warm-up step, then the mean of `steps`."""
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def palmcore_row(cfg, batch, seq, steps, precision, device, kernels):
    import numpy as np  # noqa: PLC0415

    import palmcore  # noqa: PLC0415
    from palmcore import _core  # noqa: PLC0415

    palmcore.set_kernels(kernels)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
    before = _core.allocated_bytes()
    model = palmcore.PaLM(cfg, seed=0, device=device, precision=precision)
    opt = palmcore.Adafactor(model)

    def step():
        model.zero_grad()
        model.forward_backward(tokens[:, :-1], tokens[:, 1:])
        opt.step(1e-2)

    seconds = timed(step, steps, lambda: None)  # the step reads its loss back: it waits already
    return seconds, _core.allocated_bytes() - before, model.state_dict()


def torch_row(cfg, state_dict, batch, seq, steps):
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from torch_palm import TorchPaLM  # noqa: PLC0415

    model = TorchPaLM(cfg, state_dict, threads=1, dtype=torch.float32, device="cuda")
    opt = torch.optim.Adafactor(list(model.params.values()), lr=1e-2) if hasattr(torch.optim, "Adafactor") \
        else torch.optim.AdamW(list(model.params.values()), lr=1e-4)
    tokens = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)), device="cuda")
    def loss_of(tokens_in, targets):
        return model.loss(tokens_in, targets)[0]

    loss_fn = loss_of
    try:
        loss_fn = torch.compile(loss_of)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_fn(tokens[:, :-1], tokens[:, 1:]).backward()
        compiled = True
    except Exception:  # noqa: BLE001 (torch.compile may not work on this machine)
        loss_fn, compiled = loss_of, False
    torch.cuda.reset_peak_memory_stats()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()

    seconds = timed(step, steps, torch.cuda.synchronize)
    return seconds, torch.cuda.max_memory_allocated(), compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="350m,1.3b")
    parser.add_argument("--plain", default="", help="configs also run with the plain CUDA kernels (comma-separated)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / seq)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark), or cpu for a smoke run of a tiny config")
    args = parser.parse_args()

    from palmcore import PaLMConfig, _core  # noqa: PLC0415

    batch = max(1, args.tokens // args.seq)
    lines = [f"{'config':<6} {'params':>7} {'runtime':<34} {'tok/s':>9} {'MFU':>6} {'of GEMM':>7} {'GiB':>6}"]
    print(lines[0], flush=True)
    printed = 1
    for name in args.configs.split(","):
        cfg = PaLMConfig(**CONFIGS[name], max_seq_len=args.seq)
        flops = cfg.flops_per_token(args.seq)
        try:  # the cuBLASLt bf16 rate at this config's largest GEMM shape: what the step could reach
            gemm_rate = 2 * batch * args.seq * cfg.d_model * cfg.ffn_dim / _core.kernels.time_matmul(
                batch * args.seq, cfg.ffn_dim, cfg.d_model, "bfloat16", args.device, 5)
        except Exception:  # noqa: BLE001 (no CUDA: the column stays empty)
            gemm_rate = float("nan")

        def row(who, s, mem):
            rate = flops * batch * args.seq / s
            return (f"{name:<6} {cfg.num_params() / 1e9:>6.2f}B {who:<34} {batch * args.seq / s:>9,.0f} "
                    f"{rate / PEAK_BF16:>6.1%} {rate / gemm_rate:>7.1%} {mem / 2**30:>6.1f}")

        state = None
        for kernels in ["fast"] + (["plain"] if name in args.plain.split(",") else []):
            try:
                seconds, memory, state = palmcore_row(cfg, batch, args.seq, args.steps, args.precision, args.device,
                                                      kernels)
                lines.append(row(f"palmcore ({args.precision}, {kernels} kernels)", seconds, memory))
            except Exception as e:  # noqa: BLE001 (a table row says what failed)
                lines.append(f"{name:<6} palmcore ({kernels} kernels): {type(e).__name__}: {e}")
        if not args.no_torch and state is not None:
            try:
                seconds, memory, compiled = torch_row(cfg, state, batch, args.seq, args.steps)
                lines.append(row("torch bf16 autocast" + (" compiled" if compiled else " eager"), seconds, memory))
            except Exception as e:  # noqa: BLE001
                lines.append(f"{name:<6} torch: {type(e).__name__}: {e}")
        print("\n".join(lines[printed:]), flush=True)
        printed = len(lines)
    lines.append(f"batch {batch} x seq {args.seq}; MFU over {PEAK_BF16 / 1e12:.0f} TFLOP/s (dense bf16); "
                 "'of GEMM': the same rate over cuBLASLt's bf16 rate at tokens x D -> F")
    print(lines[-1])
    table = "\n".join(lines)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step.txt"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
