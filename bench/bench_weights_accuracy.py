"""How close the compact decode weights (PaLM.set_weights) stay to fp32 on a trained model: on
held-out text, the logits' distance (max |dz| and its size against max |z|), top-1 agreement of
the next-token predictions and the perplexity, per format, computed through the decode path (a
KV cache fed a token at a time, so that the compact kernels are the ones that run).

  python bench/bench_weights_accuracy.py runs/default [--files 8] [--tokens 1024]

The text: the files of Python's `email` and `json` packages (held out only for a run that did not
train on them: the default run trains on the whole standard library). The comparison between
formats is what this measures; the perplexity's level depends on the text.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

import palmcore
from palmcore.text import prompt_ids


def logits_of(model, ids):
    """Each position's logits from a cache fed one token at a time: every product a decode step's."""
    cache = model.kv_cache(slots=1, capacity=len(ids))
    return np.stack([cache.feed([t])[0] for t in ids])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per file (at most max_seq_len)")
    args = ap.parse_args()
    model, tokenizer = palmcore.load(args.run)
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "email", "*.py")) + glob.glob(os.path.join(stdlib, "json", "*.py")))
    files = files[:args.files]
    n = min(args.tokens, model.config.max_seq_len)
    texts = [prompt_ids(tokenizer, open(f, encoding="utf-8").read())[:n] for f in files]
    ref = {}
    rows = []
    for weights in ("fp32", "bf16", "int8"):
        model.set_weights(weights)
        nll, count, agree, dz, zmax = 0.0, 0, 0, 0.0, 0.0
        for i, ids in enumerate(texts):
            z = logits_of(model, ids).astype(np.float64)
            if weights == "fp32":
                ref[i] = z
            lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
            nll += float(np.sum(lse[:-1] - z[np.arange(len(ids) - 1), ids[1:]]))
            count += len(ids) - 1
            agree += int(np.sum(z.argmax(1) == ref[i].argmax(1)))
            dz = max(dz, float(np.abs(z - ref[i]).max()))
            zmax = max(zmax, float(np.abs(ref[i]).max()))
        total = sum(len(t) for t in texts)
        rows.append((weights, dz, dz / zmax, agree / total, float(np.exp(nll / count))))
    print(f"{args.run}: {len(texts)} held-out files, {sum(len(t) for t in texts)} positions")
    print("\n| weights | max |dz| | of max |z| | top-1 same as fp32 | perplexity |\n|---|---|---|---|---|")
    for w, dz, rel, agree, ppl in rows:
        print(f"| {w} | {dz:.3g} | {rel:.2e} | {agree:.2%} | {ppl:.4f} |")


if __name__ == "__main__":
    main()
