"""Decode throughput on one GPU (issue 12): palmcore's KV-cached greedy decoding of the ~1.3B
config in bf16 at batch 1, 16 and 64, against the memory bound of a step and PyTorch.

    python bench/gpu/decode.py [--config 1.3b] [--batches 1,16,64] [--prompt 128] [--new 64] [--no-torch]
                            [--copy-bytes N]

A decode step must read every weight once (the GEMMs' bf16 copy: 2 bytes per parameter) and
each row's keys and values so far (2 bytes each); the bound is those bytes over the measured
device-to-device copy bandwidth ((bytes read + bytes written) / s of a large copy). Columns:
tokens/s (new tokens of all rows / decode seconds, the prefill excluded), ms per step, the
share of the bound reached. PyTorch runs the same weights in bf16 on a static cache
(bench/torch_palm.py decode_step_static) through torch.compile(mode="reduce-overhead") when it
works there, else eagerly. The table goes to $OUT/decode.txt when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from train_step import CONFIGS  # noqa: E402


def palmcore_decode(model, prompts, new):
    """(decode seconds, prefill seconds) of a greedy generation, stepped so the prefill is apart;
    after a short warm-up generation of the same shape (GEMM algorithms, scratch, graphs)."""
    model.generate(prompts, max_new_tokens=4, temperature=0, stop_tokens=())
    gen = model.generation(prompts, max_new_tokens=new, temperature=0, stop_tokens=())
    t0 = time.perf_counter()
    gen.step()  # the prefill (and the first token)
    t1 = time.perf_counter()
    while not gen.done:
        gen.step()
    return time.perf_counter() - t1, t1 - t0


def torch_decode(cfg, state_dict, prompts, new, device):
    import torch  # noqa: PLC0415

    from torch_palm import TorchPaLM  # noqa: PLC0415

    model = TorchPaLM(cfg, state_dict, threads=1, dtype=torch.bfloat16, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    B, P = len(prompts), len(prompts[0])
    shape = (B, cfg.n_kv_heads, P + new, cfg.head_dim)
    cache = [(torch.zeros(shape, dtype=torch.bfloat16, device=device),
              torch.zeros(shape, dtype=torch.bfloat16, device=device)) for _ in range(cfg.n_layers)]
    step = model.decode_step_static
    compiled = False
    try:
        step = torch.compile(model.decode_step_static, mode="reduce-overhead", fullgraph=True)
        compiled = True
    except Exception:  # noqa: BLE001
        pass
    tokens = torch.tensor(prompts, device=device)

    def run():
        token = None
        for i in range(P):  # the prompt one position at a time (the static step's one shape)
            token = step(tokens[:, i], torch.tensor(i, device=device)).argmax(-1)
        sync()
        t1 = time.perf_counter()
        for i in range(P, P + new - 1):
            token = step(token, torch.tensor(i, device=device)).argmax(-1)
        sync()
        return time.perf_counter() - t1

    step_fn = step
    step = lambda token, pos: step_fn(token, pos, cache)  # noqa: E731
    try:
        run()  # warm-up (compiles, captures)
        return run(), compiled
    except Exception:  # noqa: BLE001 (torch.compile may fail at run time): eager
        step = lambda token, pos: model.decode_step_static(token, pos, cache)  # noqa: E731
        run()
        return run(), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="1.3b")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--copy-bytes", type=int, default=1 << 30, help="size of the copy that measures bandwidth")
    args = parser.parse_args()

    import numpy as np  # noqa: PLC0415

    import palmcore  # noqa: PLC0415
    from palmcore import PaLMConfig, _core  # noqa: PLC0415

    cfg = PaLMConfig(**CONFIGS[args.config], max_seq_len=args.prompt + args.new)
    model = palmcore.PaLM(cfg, seed=0, device=args.device, precision="bf16")
    bandwidth = 2 * args.copy_bytes / _core.kernels.time_copy(args.copy_bytes, args.device, 5)
    state = model.state_dict() if not args.no_torch else None
    lines = [f"decode {args.config} bf16, prompt {args.prompt}, {args.new} new tokens; device copy bandwidth "
             f"{bandwidth / 1e9:,.0f} GB/s",
             f"{'batch':>5} {'runtime':<30} {'tok/s':>9} {'ms/step':>8} {'of bound':>8}"]
    print("\n".join(lines), flush=True)
    kv_width = cfg.n_kv_heads * cfg.head_dim
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt)).tolist()
        # mean bytes per decode step: the weights, and each row's keys and values at the mean length
        mean_len = args.prompt + args.new / 2
        step_bytes = 2 * cfg.num_params() + batch * cfg.n_layers * 2 * mean_len * kv_width * 2
        bound = step_bytes / bandwidth
        steps = args.new - 1

        def row(who, seconds):
            return (f"{batch:>5} {who:<30} {batch * steps / seconds:>9,.0f} {seconds / steps * 1e3:>8.3f} "
                    f"{bound / (seconds / steps):>8.1%}")

        try:
            seconds, _ = palmcore_decode(model, prompts, args.new)
            graphs = ", CUDA graphs" if args.device.startswith("cuda") and _core.cuda_graphs() else ""
            lines.append(row(f"palmcore (bf16{graphs})", seconds))
        except Exception as e:  # noqa: BLE001
            lines.append(f"{batch:>5} palmcore: {type(e).__name__}: {e}")
        if state is not None:
            try:
                seconds, compiled = torch_decode(cfg, state, prompts, args.new, args.device)
                lines.append(row("torch bf16 static cache" + (" compiled" if compiled else " eager"), seconds))
            except Exception as e:  # noqa: BLE001
                lines.append(f"{batch:>5} torch: {type(e).__name__}: {e}")
        print("\n".join(lines[-2 if state is not None else -1:]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
