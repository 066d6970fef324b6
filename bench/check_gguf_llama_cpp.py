"""Run palmcore's GGUF export in llama.cpp itself and compare it with palmcore (issue 23).

    pip install ".[gguf]" && python bench/check_gguf_llama_cpp.py [--checkpoint runs/default]

Outside CI (it builds llama.cpp): llama.cpp's source comes from the llama-cpp-python source
package on PyPI (its vendor/llama.cpp), is built for the CPU only (libllama, no tools) into
build/llama.cpp/ (git-ignored, reused by the next run), and bench/gguf_probe.cpp is compiled
against it. Building takes 10-20 minutes on 2 cores; later runs take a few minutes.

Without --checkpoint a small model is trained first (the seed preset on the Python standard
library for --train-seconds, its last --held-out files kept out of training). Then, for each
dtype, the checkpoint is exported with ``palmcore export --format gguf`` and read by llama.cpp:

- tokens: llama.cpp's tokenizer (llama_tokenize, as its tools call it) against ``</s>`` +
  palmcore's ids, on the held-out files (those holding U+2581 or U+E000 are counted apart: the
  documented limit);
- logits: every position of --windows windows of --n-ctx held-out tokens, each from an empty
  cache, with flash attention off and a float32 KV cache, against palmcore's float32 forward;
- perplexity of those tokens from either's logits;
- greedy: --prompts prompts (the start of held-out files), --new-tokens tokens by llama.cpp's
  greedy sampler against palmcore's ``generate(temperature=0)``;
- the same logits and greedy tokens against palmcore running the file's own weights (read back
  with the gguf package and dequantized), which leaves llama.cpp's arithmetic alone (for q8_0 it
  also rounds the activations to 8 bits inside its matrix products).

It prints one table. PROBE_NO_REPACK=1 runs llama.cpp without weight repacking (its -nr; needed
on AMX CPUs, where llama.cpp's Q8_0 repacking crashes).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

import palmcore
from palmcore.data import stdlib_files
from palmcore.gguf_export import export_checkpoint_gguf, gguf_names
from palmcore.interchange import from_hf_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_SOURCE = os.path.join(ROOT, "bench", "gguf_probe.cpp")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_OPENSSL=OFF"]


def run(command: list[str], **kwargs) -> None:
    print("  $ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def build_llama_cpp(cache: str, jobs: int) -> str:
    """The gguf_probe binary, built against llama.cpp's libllama in ``cache`` (each step skipped
    when its result is already there)."""
    src, build = os.path.join(cache, "src"), os.path.join(cache, "build")
    if not os.path.exists(os.path.join(src, "CMakeLists.txt")):
        os.makedirs(cache, exist_ok=True)
        if not glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz")):
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
                 "-d", cache])
        sdist = sorted(glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz")))[-1]
        print(f"extracting vendor/llama.cpp from {sdist}", flush=True)
        with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory(dir=cache) as tmp:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
            os.rename(os.path.join(tmp, prefix), src)
    library = os.path.join(build, "bin", "libllama.so")
    if not os.path.exists(library):
        run(["cmake", "-S", src, "-B", build, *CMAKE_FLAGS])
        run(["nice", "-n", "10", "cmake", "--build", build, "--target", "llama", "-j", str(jobs)])
    probe = os.path.join(cache, "gguf_probe")
    if not os.path.exists(probe) or os.path.getmtime(probe) < os.path.getmtime(PROBE_SOURCE):
        lib = os.path.join(build, "bin")
        run(["g++", "-O2", "-std=c++17", "-I", os.path.join(src, "include"), "-I", os.path.join(src, "ggml", "include"),
             PROBE_SOURCE, "-o", probe, "-L", lib, "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"])
    return probe


def probe(binary: str, *args: str) -> None:
    subprocess.run([binary, *args], check=True, stderr=subprocess.DEVNULL if os.environ.get("PROBE_QUIET") else None)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(targets)), targets]


def model_of(path: str, config: palmcore.PaLMConfig) -> palmcore.PaLM:
    """A palmcore model holding the weights of a GGUF export, dequantized (the export's mapping
    undone)."""
    hf_name = {g: hf for hf, g in gguf_names(config).items()}
    tensors = {hf_name[t.name]: dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
               for t in GGUFReader(path).tensors}
    model = palmcore.PaLM(config, seed=0)
    model.load_state_dict(from_hf_tensors(config, tensors))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a palmcore run (default: train a small one first)")
    parser.add_argument("--cache", default=os.path.join(ROOT, "build", "llama.cpp"), help="llama.cpp's build folder")
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "gguf-check"), help="the model and GGUF files")
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"])
    parser.add_argument("--train-seconds", type=float, default=300.0)
    parser.add_argument("--held-out", type=int, default=30, help="standard-library files kept out of training")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp")
    args = parser.parse_args()

    t0 = time.perf_counter()
    binary = build_llama_cpp(args.cache, args.jobs)
    print(f"llama.cpp ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    os.makedirs(args.work, exist_ok=True)
    files = stdlib_files()
    held_out = files[-args.held_out:]
    run_dir = args.checkpoint or os.path.join(args.work, "run")
    if args.checkpoint is None and not os.path.isdir(run_dir):
        t0 = time.perf_counter()
        print(f"training the seed preset for {args.train_seconds:.0f} s on {len(files) - args.held_out} "
              "standard-library files", flush=True)
        palmcore.train(files[:-args.held_out], out=run_dir, time_budget=args.train_seconds, progress=False,
                       sample_tokens=0)
        print(f"  trained ({time.perf_counter() - t0:.0f} s)", flush=True)
    model, tok = palmcore.load(run_dir)
    cfg = model.config
    print(f"model: {run_dir} ({model.num_params() / 1e6:.1f}M parameters, d_model {cfg.d_model}, {cfg.n_layers} "
          f"layers, {cfg.n_heads} heads, {cfg.n_kv_heads} kv heads, vocab {cfg.vocab_size})", flush=True)

    texts = [open(p, encoding="utf-8", errors="replace").read() for p in held_out]
    stream = np.concatenate([[1] + tok.encode(t) for t in texts]).astype(np.int32)
    ids = stream[:args.windows * args.n_ctx]
    ids_path = os.path.join(args.work, "ids.i32")
    ids.tofile(ids_path)
    windows = [ids[s:s + args.n_ctx] for s in range(0, len(ids), args.n_ctx)]
    ours = [model.forward(w[None].astype(np.int64))[0] for w in windows]
    ours_nll = np.concatenate([nll(z[:-1], w[1:]) for z, w in zip(ours, windows)])
    prompts = [[1] + tok.encode(t)[:16] for t in texts[:args.prompts]]
    prompts_path = os.path.join(args.work, "prompts.txt")
    with open(prompts_path, "w") as f:
        f.writelines(" ".join(map(str, p)) + "\n" for p in prompts)
    ours_greedy = [model.generate([p], max_new_tokens=args.new_tokens, temperature=0.0)[0] for p in prompts]

    rows = []
    for dtype in args.dtypes:
        gguf_path = os.path.join(args.work, f"model-{dtype}.gguf")
        export_checkpoint_gguf(run_dir, gguf_path, dtype=dtype, overwrite=True)
        same_files = escaped = 0
        if dtype == args.dtypes[0]:  # the vocabulary is the same in every file
            for path, text in zip(held_out, texts):
                out = os.path.join(args.work, "tokens.i32")
                probe(binary, gguf_path, "tokenize", path, out)
                if "\u2581" in text or "\ue000" in text:
                    escaped += 1
                else:
                    same_files += np.array_equal(np.fromfile(out, np.int32), [1] + tok.encode(text))
            tokens_line = (f"llama.cpp's tokenizer: {same_files} of {len(texts) - escaped} held-out files give </s> + "
                           f"palmcore's ids ({escaped} holding U+2581/U+E000 left out), {len(stream):,} tokens")
        logits_path = os.path.join(args.work, f"logits-{dtype}.f32")
        probe(binary, gguf_path, "logits", ids_path, str(args.n_ctx), logits_path)
        theirs = np.fromfile(logits_path, np.float32).reshape(len(ids), cfg.vocab_size)
        ours_all = np.concatenate(ours)
        diff = np.abs(theirs - ours_all)
        theirs_nll = np.concatenate([nll(theirs[s:s + len(w) - 1], w[1:])
                                     for s, w in zip(range(0, len(ids), args.n_ctx), windows)])
        greedy_path = os.path.join(args.work, f"greedy-{dtype}.txt")
        probe(binary, gguf_path, "greedy", prompts_path, str(args.new_tokens), greedy_path)
        with open(greedy_path) as f:
            theirs_greedy = [[int(x) for x in line.split()] for line in f]
        same = sum(a == b for a, b in zip(ours_greedy, theirs_greedy))
        own = model_of(gguf_path, cfg)
        own_diff = max(float(np.abs(theirs[s:s + len(w)] - own.forward(w[None].astype(np.int64))[0]).max())
                       for s, w in zip(range(0, len(ids), args.n_ctx), windows))
        own_same = sum(own.generate([p], max_new_tokens=args.new_tokens, temperature=0.0)[0] == b
                       for p, b in zip(prompts, theirs_greedy))
        rows.append((dtype, os.path.getsize(gguf_path) / 2**20, diff.max(), diff.max() / np.abs(ours_all).max(),
                     float(np.exp(theirs_nll.mean())), float(np.exp(ours_nll.mean())), same, own_diff, own_same))

    print(f"\n{tokens_line}")
    print(f"logits: {len(windows)} windows of {args.n_ctx} held-out tokens; greedy: {len(prompts)} prompts, "
          f"{args.new_tokens} new tokens\n")
    print(f"{'':<14} {'llama.cpp against palmcore (float32 weights)':<69} {'against palmcore on the file':<28}")
    print(f"{'dtype':<6} {'MiB':>7} {'max|dlogit|':>12} {'rel':>9} {'ppl llama.cpp':>14} {'ppl palmcore':>13} "
          f"{'greedy same':>12}   {'max|dlogit|':>12} {'greedy same':>12}")
    for dtype, mib, d, r, ppl_theirs, ppl_ours, same, own_diff, own_same in rows:
        print(f"{dtype:<6} {mib:>7.1f} {d:>12.3g} {r:>9.2g} {ppl_theirs:>14.4f} {ppl_ours:>13.4f} "
              f"{same:>5} of {len(prompts)}   {own_diff:>12.3g} {own_same:>5} of {len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
