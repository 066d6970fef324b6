"""Serving benchmark (issue 15): palmcore serve under 1, 8, 16 and 32 concurrent streaming clients
against the same requests run one after another with model.generate.

  python bench/bench_serve.py [--preset seed] [--new 64] [--device cpu]

The model has the preset's random initial weights (seed 0): speed does not depend on them. Prompts
are sent as token ids; the tokenizer is a stand-in that writes ids as text (" 17"), so every
token is one streamed chunk. Each request: a prompt of --prompt random ids, --new tokens
sampled (temperature 0.8, top-k 40, its own seed; the end-of-document token may end a row
early, the same way in both runs).
Reported per concurrency: aggregate tokens/s (all tokens / wall time), time to first token
(median, p99) and per-token latency (gaps between a stream's chunks: p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

import numpy as np


class IdTokenizer:
    """Ids as text: enough for the server's text path, no SentencePiece model needed."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


async def client_load(url, prompts, concurrency, new):
    import httpx  # noqa: PLC0415

    ttft, gaps, tokens = [], [], 0
    todo = list(enumerate(prompts))

    async def worker(client):
        nonlocal tokens
        while todo:
            i, prompt = todo.pop()
            body = {"prompt": prompt, "max_tokens": new, "temperature": 0.8, "top_k": 40, "seed": i, "stream": True}
            start = last = time.perf_counter()
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    if json.loads(line[6:])["choices"][0]["text"]:
                        tokens += 1
                        (gaps if last != start else ttft).append(now - last if last != start else now - start)
                        last = now

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return tokens, wall, ttft, gaps


def main():
    import palmcore  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415

    from palmcore.engine import on_passing_thread  # noqa: PLC0415
    from palmcore.serve import make_app  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--clients", default="1,8,16,32")
    p.add_argument("--sequential", type=int, default=16, help="requests run one after another by model.generate")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        palmcore.set_num_threads(args.threads)
    cfg = palmcore.PaLMConfig.preset(args.preset)
    model = on_passing_thread(palmcore.PaLM, cfg, 0, None, args.device)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(4, cfg.vocab_size, args.prompt)] for _ in range(64)]

    def sequential():
        start, tokens = time.perf_counter(), 0
        for i in range(args.sequential):
            tokens += len(model.generate([prompts[i]], max_new_tokens=args.new, temperature=0.8, top_k=40,
                                         top_p=1.0, seed=i)[0])
        return tokens / (time.perf_counter() - start)

    seq_rate = on_passing_thread(sequential)
    print(f"{args.preset} ({model.num_params() / 1e6:.1f}M parameters, random weights), {args.device}, "
          f"{palmcore.get_num_threads()} threads, prompt {args.prompt}, new {args.new}")
    print(f"sequential model.generate: {args.sequential} requests, {seq_rate:.0f} tokens/s")

    levels = [int(c) for c in args.clients.split(",")]
    app = make_app(model, IdTokenizer(cfg.vocab_size), "bench", slots=max(levels), queue=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    print(f"{'clients':>7} {'requests':>8} {'tokens/s':>9} {'vs seq':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'tok p50':>8} {'tok p99':>8}  (ms)")
    for c in levels:
        n = max(c, args.sequential)
        tokens, wall, ttft, gaps = asyncio.run(client_load(url, prompts[:n], c, args.new))
        rate = tokens / wall
        print(f"{c:>7} {n:>8} {rate:>9.0f} {rate / seq_rate:>6.1f}x {1e3 * statistics.median(ttft):>9.1f} "
              f"{1e3 * pct(ttft, 99):>9.1f} {1e3 * pct(gaps, 50):>8.1f} {1e3 * pct(gaps, 99):>8.1f}")
    server.should_exit = True
    thread.join()


if __name__ == "__main__":
    main()
