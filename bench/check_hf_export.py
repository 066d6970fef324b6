"""Check `palmcore export --format hf` against the real transformers (CPU torch), as issue 14 asks:

- AutoModelForCausalLM.from_pretrained(DIR) loads the export with no custom code (CohereForCausalLM);
  its float32 logits equal palmcore's (relative error max|a - b| / max|b| <= 1e-5), for the eager
  and the default (sdpa) attention, for a sharded export, and for a bf16 export against palmcore
  running the same bf16-rounded weights;
- transformers' greedy `generate` makes palmcore's greedy tokens;
- AutoTokenizer.from_pretrained(DIR) encodes and decodes exactly as palmcore's tokenizer, on the
  default corpus (the standard library's sources, whole files) and on hostile strings;
- export -> import gives every tensor back bit for bit.

CI cannot install torch, so this is a script, not a test (tests/test_interchange.py checks the same
export against a NumPy transcription of CohereForCausalLM and the `tokenizers` library):

    pip install ".[bench]" transformers   # CPU torch is enough
    python bench/check_hf_export.py [--checkpoint RUN]

Without --checkpoint it trains a tokenizer on part of the standard library and builds a random
model of the `seed` preset's shape. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import palmcore
from palmcore.data import stdlib_files
from palmcore.interchange import export_hf, import_hf

HOSTILE = ["", " ", "  leading and trailing  ", "\t\n\r\n\x0b\x0c", "\u2581", "\u2581\u2581 \u2581x", "\ue000",
           "\ue000s", "\ue000e", "\ue000es\u2581\ue000\ue000", "a\u2581b \u2581 c", "</s>", "<s>x</s>", "<pad><unk>",
           "<0x41>", "\u2581<0x0A>", "0123456789 3.14159 1e-5", "数字 和 emoji 😀👍🏽 \u3000\u00a0\u200b",
           "\x00\x01\x7f", "\ud7ff\uffff\U0010ffff", "def f(x):\n\tif x:\n        return 'a  b'  # ▁\n", " " * 40,
           "\n" * 9, "e\u0301 \ufb01 \u2126"]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained run to export (default: a random seed-shaped model)")
    ap.add_argument("--vocab-size", type=int, default=4000)
    ap.add_argument("--corpus-files", type=int, default=400, help="stdlib files for the tokenizer and round trips")
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()

    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    torch.manual_seed(0)
    print(f"palmcore {palmcore.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    work = tempfile.mkdtemp(prefix="palmcore-hf-")
    files = stdlib_files()[:args.corpus_files]
    if args.checkpoint:
        model, tok = palmcore.load(args.checkpoint)
    else:
        t0 = time.perf_counter()
        tok = palmcore.Tokenizer.train_on_files(files, args.vocab_size, os.path.join(work, "tok.model"))
        print(f"tokenizer: {tok.vocab_size} tokens trained on {len(files)} stdlib files in "
              f"{time.perf_counter() - t0:.1f} s")
        cfg = palmcore.PaLMConfig.preset("seed", vocab_size=tok.vocab_size, max_seq_len=256)
        model = palmcore.PaLM(cfg, seed=7)
        # norm scales away from 1, so that a transposed or misplaced scale shows
        state = model.state_dict()
        rng = np.random.default_rng(7)
        for name in state:
            if name.endswith("norm.scale"):
                state[name] = (1 + 0.2 * rng.standard_normal(state[name].shape)).astype(np.float32)
        model.load_state_dict(state)
    cfg = model.config
    print(f"model: d_model {cfg.d_model}, n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, n_kv_heads "
          f"{cfg.n_kv_heads}, head_dim {cfg.head_dim}, ffn_dim {cfg.ffn_dim}, vocab {cfg.vocab_size}")

    out = os.path.join(work, "hf")
    t0 = time.perf_counter()
    export_hf(model, tok, out)
    print(f"export: {time.perf_counter() - t0:.2f} s, files {sorted(os.listdir(out))}")

    # ------------------------------------------------------------------ the model
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    check(type(hf).__name__ == "CohereForCausalLM", f"AutoModelForCausalLM loads it as {type(hf).__name__}")
    check(hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "lm_head is tied to the embedding")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(3, min(96, cfg.max_seq_len)))
    ours = model.forward(tokens)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
        eager = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        theirs_eager = eager(torch.from_numpy(tokens)).logits.numpy()
    e1, e2 = rel(theirs, ours), rel(theirs_eager, ours)
    check(e1 <= 1e-5, f"float32 logits [3, {tokens.shape[1]}, {cfg.vocab_size}], default attention "
                      f"({hf.config._attn_implementation}): relative error {e1:.2e} (<= 1e-5)")
    check(e2 <= 1e-5, f"float32 logits, eager attention: relative error {e2:.2e} (<= 1e-5)")

    # grouped-query attention, head_dim != d_model / n_heads, other RoPE base and epsilon
    other = palmcore.PaLM(palmcore.PaLMConfig(vocab_size=cfg.vocab_size, d_model=96, n_layers=3, n_heads=6,
                                              n_kv_heads=2, head_dim=20, ffn_dim=200, max_seq_len=128,
                                              rope_base=5000.0, norm_eps=1e-3), seed=3)
    export_hf(other, None, os.path.join(work, "hf-gqa"))
    with torch.no_grad():
        e6 = rel(AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf-gqa"), dtype=torch.float32)
                 (torch.from_numpy(tokens)).logits.numpy(), other.forward(tokens))
    check(e6 <= 1e-5, f"float32 logits, 6 query heads / 2 kv heads, head_dim 20 (d_model 96): relative error {e6:.2e}")

    sharded = os.path.join(work, "hf-sharded")
    export_hf(model, tok, sharded, max_shard_bytes=1 << 20)
    shards = sorted(n for n in os.listdir(sharded) if n.endswith(".safetensors"))
    with torch.no_grad():
        e3 = rel(AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)(torch.from_numpy(tokens))
                 .logits.numpy(), ours)
    check(len(shards) > 1 and e3 <= 1e-5, f"sharded export ({len(shards)} shards + index) loads: relative error {e3:.2e}")

    bf16_dir = os.path.join(work, "hf-bf16")
    export_hf(model, tok, bf16_dir, dtype="bf16")
    bf16_model, _ = import_hf(bf16_dir)  # palmcore with the same bf16-rounded weights (fp32 compute)
    with torch.no_grad():
        hf_bf16 = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
        e4 = rel(hf_bf16(torch.from_numpy(tokens)).logits.numpy(), bf16_model.forward(tokens))
        e5 = rel(hf_bf16(torch.from_numpy(tokens)).logits.numpy(), ours)
    check(e4 <= 1e-5, f"bf16 export, both computing in float32: relative error {e4:.2e} (<= 1e-5); "
                      f"vs the float32 model {e5:.2e} (bf16 rounding of the weights)")

    # greedy generation
    prompts = ["def fibonacci(", "import os\n", "class Foo:\n    def __init__(self"]
    ids = [[palmcore.tokenizer.EOD_ID] + tok.encode(p) for p in prompts]
    mine = model.generate(ids, max_new_tokens=args.new_tokens, temperature=0.0)
    same = 0
    for prompt_ids, expected in zip(ids, mine):
        with torch.no_grad():
            got = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=args.new_tokens, do_sample=False,
                              eos_token_id=palmcore.tokenizer.EOD_ID, pad_token_id=0)[0, len(prompt_ids):].tolist()
        same += got == expected
        if got != expected:
            print(f"      prompt {prompt_ids[:8]}: palmcore {expected[:16]}..., transformers {got[:16]}...")
    check(same == len(prompts), f"greedy generate: {same}/{len(prompts)} prompts give palmcore's "
                                f"{args.new_tokens} tokens exactly")

    # ------------------------------------------------------------------ the tokenizer
    hf_tok = AutoTokenizer.from_pretrained(out)
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    bad_ids = bad_text = bad_special = 0
    t0 = time.perf_counter()
    n_tokens = 0
    for text in texts + HOSTILE:
        want = tok.encode(text)
        n_tokens += len(want)
        got = hf_tok.encode(text, add_special_tokens=False)
        bad_ids += got != want
        bad_text += hf_tok.decode(got, skip_special_tokens=True) != text
        bad_special += hf_tok(text)["input_ids"] != [palmcore.tokenizer.EOD_ID] + want
    check(bad_ids == 0, f"AutoTokenizer ({type(hf_tok).__name__}) encodes {len(texts)} stdlib files "
                        f"({sum(map(len, texts)):,} characters, {n_tokens:,} tokens) and {len(HOSTILE)} hostile "
                        f"strings to palmcore's ids: {bad_ids} differ ({time.perf_counter() - t0:.1f} s)")
    check(bad_text == 0, f"AutoTokenizer decode(encode(s)) == s: {bad_text} differ")
    check(bad_special == 0, f"tokenizer(s).input_ids == [</s>] + palmcore ids (the prompt form): {bad_special} differ")
    check(hf_tok.eos_token_id == 1 and hf_tok.pad_token_id == 0 and hf_tok.bos_token_id == 1
          and hf_tok.unk_token_id == 2, "special ids: pad 0, eos 1, unk 2, bos 1 (</s>, what palmcore feeds first)")
    text = hf_tok.decode(hf.generate(**hf_tok("def fibonacci(", return_tensors="pt"), max_new_tokens=8,
                                     do_sample=False)[0], skip_special_tokens=True)
    check(text.startswith("def fibonacci("), f"tokenizer -> generate -> decode: {text!r}")

    # ------------------------------------------------------------------ round trip
    back, back_tok = import_hf(out, out=os.path.join(work, "imported"))
    a, b = model.state_dict(), back.state_dict()
    exact = all(np.array_equal(a[n].view(np.uint32), b[n].view(np.uint32)) for n in a)
    check(exact and back.config == cfg, f"export -> import: all {len(a)} tensors bit for bit, same config")
    check(back_tok is not None and back_tok.encode("x = 1") == tok.encode("x = 1"), "the tokenizer comes back")

    print(f"\n{len(failures)} failed" if failures else "\nall checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
