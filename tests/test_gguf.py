"""Export to GGUF, llama.cpp's format (issue 23; palmcore.gguf_export).

llama.cpp is not built in CI, so the file is read back with the gguf package's own reader and
checked three ways: every key and tensor against the model (f32 bit for bit after the q/k
permutation, f16 and bf16 within their rounding, q8_0 within its error bound);
tests/command_r_numpy.py, a float64 transcription of llama.cpp's command-r graph reading the file
on its own, against palmcore's logits; and tests/llama_spm.py, a transcription of llama.cpp's
SentencePiece tokenizer reading the file's vocabulary, against palmcore's ids on real files.
bench/check_gguf_llama_cpp.py runs the file in llama.cpp itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize

import palmcore
from command_r_numpy import CommandRNumpy
from helpers import norm_scales_off_one
from llama_spm import LlamaSPM
from palmcore import checkpoint, gguf_export
from palmcore.cli import main as cli
from palmcore.gguf_export import export_gguf
from palmcore.tensorfile import to_bf16_bits


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:40]]
    return palmcore.Tokenizer.train(texts, 1000, str(tmp_path_factory.mktemp("tok") / "t.model"))


def make_model(vocab=1000, seed=0, **fields) -> palmcore.PaLM:
    """A small model whose rows are multiples of 32 (q8_0 blocks), norm scales away from 1."""
    cfg = palmcore.PaLMConfig(**{**dict(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
                                        ffn_dim=96, max_seq_len=64), **fields})
    return norm_scales_off_one(palmcore.PaLM(cfg, seed=seed), seed)


def values(path) -> dict:
    """{key: value} of every key of a GGUF file but the header's."""
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def as_numpy(t) -> np.ndarray:
    """A reader tensor dequantized, in NumPy order (ggml's {ne0, ne1} is [ne1, ne0])."""
    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def interleaved(w: np.ndarray, heads: int, dh: int) -> np.ndarray:
    """Columns of a rotate-half projection [D, heads·dh] put in neighbouring-pair order: inside
    each head, new column 2j is old column j and 2j + 1 is old j + dh/2."""
    w = w.reshape(w.shape[0], heads, 2, dh // 2)  # [.., head, half, j]
    return w.transpose(0, 1, 3, 2).reshape(w.shape[0], heads * dh)


def expected_tensors(model) -> dict[str, np.ndarray]:
    """{GGUF name: float32 [out, in]} as llama.cpp's command-r loader names and shapes them."""
    cfg, p = model.config, model.state_dict()
    out = {"token_embd.weight": p["embed"]}
    for i in range(cfg.n_layers):
        layer = f"layers.{i}."
        out.update({f"blk.{i}.attn_norm.weight": p[layer + "norm.scale"],
                    f"blk.{i}.attn_q.weight": interleaved(p[layer + "attn.wq"], cfg.n_heads, cfg.head_dim).T,
                    f"blk.{i}.attn_k.weight": interleaved(p[layer + "attn.wk"], cfg.n_kv_heads, cfg.head_dim).T,
                    f"blk.{i}.attn_v.weight": p[layer + "attn.wv"].T,
                    f"blk.{i}.attn_output.weight": p[layer + "attn.wo"].T,
                    f"blk.{i}.ffn_gate.weight": p[layer + "mlp.w_gate"].T,
                    f"blk.{i}.ffn_up.weight": p[layer + "mlp.w_up"].T,
                    f"blk.{i}.ffn_down.weight": p[layer + "mlp.w_down"].T})
    out["output_norm.weight"] = p["final_norm.scale"]
    return out


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def tokens_for(cfg, B=2, T=24, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


# ----------------------------------------------------------------------------- keys and tensors


def test_every_key_is_the_models(tmp_path, tok):
    model = make_model(n_kv_heads=2, rope_base=5000.0, norm_eps=1e-4, max_seq_len=48)
    export_gguf(model, tok, str(tmp_path / "m.gguf"), chat_template="{{ messages[0].content }}")
    cfg, f32 = model.config, lambda x: float(np.float32(x))
    sp = tok._sp
    got = values(tmp_path / "m.gguf")
    want = {
        "general.architecture": "command-r", "general.file_type": 0, "general.quantization_version": 2,
        "command-r.context_length": 48, "command-r.embedding_length": 64, "command-r.block_count": 2,
        "command-r.feed_forward_length": 96, "command-r.attention.head_count": 4,
        "command-r.attention.head_count_kv": 2, "command-r.attention.key_length": 16,
        "command-r.attention.value_length": 16, "command-r.rope.dimension_count": 16,
        "command-r.rope.freq_base": 5000.0, "command-r.rope.scaling.type": "none",
        "command-r.attention.layer_norm_epsilon": f32(1e-4), "command-r.logit_scale": f32(1 / math.sqrt(64)),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(tok.vocab_size)],
        "tokenizer.ggml.scores": [f32(sp.GetScore(i)) for i in range(tok.vocab_size)],
        "tokenizer.ggml.token_type": got["tokenizer.ggml.token_type"],  # checked below
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": "{{ messages[0].content }}",
        "general.sampling.sequence": "temperature;top_k;top_p", "general.sampling.temp": f32(0.8),
        "general.sampling.top_k": 40, "general.sampling.top_p": f32(0.95),
    }
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key
    types = got["tokenizer.ggml.token_type"]
    assert types[:4] == [TokenType.CONTROL, TokenType.CONTROL, TokenType.UNKNOWN, TokenType.CONTROL]
    byte_ids = [i for i, t in enumerate(types) if t == TokenType.BYTE]
    assert [want["tokenizer.ggml.tokens"][i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[4:]) == {TokenType.BYTE, TokenType.NORMAL}


def test_the_default_chat_template_is_palmcore_serves(tmp_path, tok):
    from palmcore.chat import DEFAULT_TEMPLATE  # noqa: PLC0415

    export_gguf(make_model(), tok, str(tmp_path / "m.gguf"))
    assert values(tmp_path / "m.gguf")["tokenizer.chat_template"] == DEFAULT_TEMPLATE


def test_f32_tensors_are_the_permuted_weights_bit_for_bit(tmp_path, tok):
    model = make_model(n_kv_heads=2, n_layers=3)
    export_gguf(model, tok, str(tmp_path / "m.gguf"))
    got, want = tensors(tmp_path / "m.gguf"), expected_tensors(model)
    assert list(got) == list(want)  # no output.weight: llama.cpp reuses token_embd (tied)
    for name, value in want.items():
        t = got[name]
        assert t.tensor_type == Q.F32 and t.shape.tolist() == list(reversed(value.shape)), name  # ggml order
        assert np.array_equal(as_numpy(t).view(np.uint32), np.ascontiguousarray(value).view(np.uint32)), name


@pytest.mark.parametrize("shape", [dict(n_heads=4, n_kv_heads=1), dict(n_heads=2, n_kv_heads=2, n_layers=3),
                                   dict(n_heads=4, n_kv_heads=2, rope_base=500.0, norm_eps=1e-3)],
                         ids=["mqa", "mha", "gqa-options"])
def test_llama_cpp_command_r_graph_gives_palmcore_logits(tmp_path, tok, shape):
    model = make_model(**shape)
    export_gguf(model, tok, str(tmp_path / "m.gguf"))
    tokens = tokens_for(model.config)
    assert rel(model.forward(tokens), CommandRNumpy(str(tmp_path / "m.gguf"))(tokens)) <= 1e-5


def test_the_permutation_is_what_makes_it_match(tmp_path, tok, monkeypatch):
    """The oracle's RoPE pairs neighbours: the rotate-half columns as they are give other logits."""
    from palmcore import interchange  # noqa: PLC0415

    model = make_model()
    monkeypatch.setattr(interchange, "rope_permutation", lambda h, dh: np.arange(h * dh))
    export_gguf(model, tok, str(tmp_path / "m.gguf"))
    tokens = tokens_for(model.config)
    assert rel(model.forward(tokens), CommandRNumpy(str(tmp_path / "m.gguf"))(tokens)) > 1e-2


def test_greedy_tokens_match(tmp_path, tok):
    model = make_model(seed=3)
    export_gguf(model, tok, str(tmp_path / "m.gguf"))
    oracle = CommandRNumpy(str(tmp_path / "m.gguf"))
    for prompt in ([1, 17, 42, 5], [1, 300]):
        ids, want = list(prompt), model.generate([prompt], max_new_tokens=10, temperature=0.0)[0]
        for _ in range(10):
            ids.append(int(np.argmax(oracle([ids])[0, -1])))
        assert ids[len(prompt):] == want


def test_f16_and_bf16_are_the_weights_rounded(tmp_path, tok):
    model = make_model()
    want = expected_tensors(model)
    for dtype, kind in (("f16", Q.F16), ("bf16", Q.BF16)):
        export_gguf(model, tok, str(tmp_path / f"{dtype}.gguf"), dtype=dtype)
        assert values(tmp_path / f"{dtype}.gguf")["general.file_type"] == {"f16": 1, "bf16": 32}[dtype]
        for name, t in tensors(tmp_path / f"{dtype}.gguf").items():
            w = want[name].astype(np.float32)
            if w.ndim == 1:
                assert t.tensor_type == Q.F32 and np.array_equal(as_numpy(t), w), name  # norm scales stay f32
                continue
            assert t.tensor_type == kind, name
            got = as_numpy(t)
            if dtype == "bf16":  # palmcore's own round-to-nearest-even
                assert np.array_equal(got.view(np.uint32) >> 16, to_bf16_bits(w).reshape(w.shape)), name
            assert (np.abs(got - w) <= np.abs(w) * (2.0**-11 if dtype == "f16" else 2.0**-8) + 2.0**-25).all(), name
        tokens = tokens_for(model.config)
        assert rel(model.forward(tokens), CommandRNumpy(str(tmp_path / f"{dtype}.gguf"))(tokens)) <= 2e-2


def test_q8_0_is_within_its_error_bound(tmp_path, tok):
    """Q8_0 (ggml's): per block of 32 along a row, scale d = max|w| / 127 stored in float16, values
    round(w / d) in int8. So |w - q·fp16(d)| <= d/2 + 127·|d - fp16(d)| <= max|w|·(1/254 + 2^-11)."""
    model = make_model(ffn_dim=80)  # ffn_down's rows are 80 long: not 32-blocks, so f16 as llama.cpp's converter
    export_gguf(model, tok, str(tmp_path / "q.gguf"), dtype="q8_0")
    assert values(tmp_path / "q.gguf")["general.file_type"] == 7
    want = expected_tensors(model)
    for name, t in tensors(tmp_path / "q.gguf").items():
        w = want[name].astype(np.float32)
        if w.ndim == 1:
            assert t.tensor_type == Q.F32 and np.array_equal(as_numpy(t), w), name
        elif w.shape[1] % 32:
            assert t.tensor_type == Q.F16 and name.endswith("ffn_down.weight"), name
        else:
            assert t.tensor_type == Q.Q8_0, name
            blocks, err = w.reshape(-1, 32), (as_numpy(t) - w).reshape(-1, 32)
            amax = np.abs(blocks).max(1, keepdims=True)
            assert (np.abs(err) <= amax * (1 / 254 + 2.0**-11) * (1 + 1e-6)).all(), name
            assert np.abs(err).max() > 0  # it is quantized
    tokens = tokens_for(model.config)
    assert rel(model.forward(tokens), CommandRNumpy(str(tmp_path / "q.gguf"))(tokens)) <= 5e-2


def test_f16_refuses_weights_beyond_its_range(tmp_path, tok):
    model = make_model()
    state = model.state_dict()
    state["layers.0.mlp.w_up"][0, 0] = 1e5
    model.load_state_dict(state)
    for dtype in ("f16", "q8_0"):
        with pytest.raises(ValueError, match=r"blk.0.ffn_up.weight holds values beyond float16's range"):
            export_gguf(model, tok, str(tmp_path / "m.gguf"), dtype=dtype)
    export_gguf(model, tok, str(tmp_path / "m.gguf"), dtype="bf16")


# ----------------------------------------------------------------------------- the tokenizer


@pytest.fixture(scope="module")
def spm(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_gguf(make_model(vocab=tok.vocab_size), tok, str(path))
    return LlamaSPM(str(path))


def test_llama_cpp_tokenizes_the_default_corpus_as_palmcore(tok, spm):
    """60 whole standard-library files: llama.cpp's SPM rules on the GGUF's vocabulary give
    </s> followed by palmcore's ids, every one."""
    from palmcore.data import stdlib_files  # noqa: PLC0415

    files = stdlib_files()
    checked = 0
    for path in files[::max(1, len(files) // 60)]:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if "\u2581" in text or "\ue000" in text:  # palmcore's escape: a documented limit
            continue
        assert spm.encode(text) == [1] + tok.encode(text), path
        checked += 1
    assert checked >= 50


TEXTS = ["", " ", "  a  b  ", "\t\n\r\n\x0b\x0c", "0123456789 3.14159 1e-5", "数字 和 emoji 😀👍🏽 \u3000\u00a0\u200b",
         "\x00\x01\x7f", "\ud7ff\uffff\U0010ffff", "def f(x):\n\tif x:\n        return 'a  b'\n", " " * 40, "\n" * 9,
         "e\u0301 \ufb01 \u2126", "<s", "s>", "</", "<0x4"]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_llama_cpp_tokenizes_hostile_text_as_palmcore(tok, spm, text):
    assert spm.encode(text) == [1] + tok.encode(text)
    assert spm.encode(text, add_special=False) == tok.encode(text)


def test_the_limits_are_as_documented(tok, spm):
    """U+2581 is a space to llama.cpp (palmcore escapes it), and its tools read a special
    token's text in a prompt as that token (palmcore reads characters)."""
    assert spm.encode("a\u2581b") != [1] + tok.encode("a\u2581b")
    assert spm.encode("a\u2581b") == spm.encode("a b")
    assert spm.encode("\ue000") != [1] + tok.encode("\ue000")
    assert spm.encode("x</s>y", parse_special=True) == [1] + tok.encode("x") + [1] + tok.encode("y")
    assert spm.encode("x</s>y") == [1] + tok.encode("x</s>y")  # without parse_special, characters


def test_a_tokenizer_without_byte_fallback_is_refused(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(tok._sp, "IsByte", lambda i: False, raising=False)
    with pytest.raises(ValueError, match=r"lacks the byte-fallback pieces \['<0x00>', '<0x01>', '<0x02>'\] "
                                         r"\(of 256\): llama.cpp's SentencePiece tokenizer needs"):
        export_gguf(make_model(), tok, str(tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------- what it refuses


@pytest.mark.parametrize("fields, match", [
    (dict(n_heads=4, head_dim=8), r"n_heads \* head_dim = 4 \* 8 = 32 is not d_model \(64\): llama.cpp's command-r"),
    (dict(n_layers=64, d_model=32, n_heads=2, ffn_dim=32), r"n_layers = 64: llama.cpp's command-r architecture "
                                                           r"requires LayerNorms on q and k from 64 layers on"),
])
def test_shapes_command_r_cannot_hold_are_refused(tmp_path, tok, fields, match):
    with pytest.raises(ValueError, match=match):
        export_gguf(make_model(**fields), tok, str(tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists()


def test_sparse_models_wrong_arguments_and_existing_files_are_refused(tmp_path, tok):
    model, out = make_model(), tmp_path / "m.gguf"
    model.config.n_experts = 4  # (PaLMConfig has no MoE fields yet; PALM_SPEC "Sparse activation" does)
    try:
        with pytest.raises(ValueError, match=r"mixture-of-experts model \(n_experts=4\): it does not export to GGUF"):
            export_gguf(model, tok, str(out))
    finally:
        del model.config.n_experts
    with pytest.raises(TypeError, match=r"tokenizer must be a palmcore.Tokenizer \(a GGUF file holds its vocab"):
        export_gguf(model, None, str(out))
    with pytest.raises(ValueError, match=r"dtype must be one of f32, f16, bf16, q8_0 for a GGUF export, got 'q4_0'"):
        export_gguf(model, tok, str(out), dtype="q4_0")
    with pytest.raises(ValueError, match=r"the tokenizer has 1000 tokens but the model's vocab_size is 700"):
        export_gguf(make_model(vocab=700), tok, str(out))
    with pytest.raises(ValueError, match=r"is a directory: the GGUF export writes one file"):
        export_gguf(model, tok, str(tmp_path))
    assert not out.exists()
    out.write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"m.gguf exists \(overwrite=True / --force replaces it\)"):
        export_gguf(model, tok, str(out))
    assert out.read_bytes() == b"mine"
    export_gguf(model, tok, str(out), dtype="float16", overwrite=True)
    assert values(out)["general.file_type"] == 1


def test_an_out_over_the_tokenizers_run_is_refused(tmp_path, tok):
    model = make_model(vocab=tok.vocab_size)
    checkpoint.save(str(tmp_path / "run" / "checkpoints"), model, step=1, tokenizer_path=tok.model_path)
    loaded, tokenizer = palmcore.load(str(tmp_path / "run"))
    for out, how in ((tmp_path / "run" / "m.gguf", "lies inside"), (tmp_path / "run", "is")):
        with pytest.raises(ValueError, match=rf"refusing to export to .*: it {how} the tokenizer's run"):
            export_gguf(loaded, tokenizer, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]


# ----------------------------------------------------------------------------- writing


def test_a_failed_export_leaves_no_file_and_the_old_one_whole(tmp_path, tok, monkeypatch):
    model, out = make_model(), tmp_path / "m.gguf"
    export_gguf(model, tok, str(out))
    before = out.read_bytes()
    real = gguf_export._write

    def crash(path, *args):
        real(path, *args)
        with open(path, "r+b") as f:  # the file is complete, then the disk fills
            f.truncate(1000)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gguf_export, "_write", crash)
    with pytest.raises(OSError, match="simulated"):
        export_gguf(make_model(seed=1), tok, str(out), overwrite=True)
    assert os.listdir(tmp_path) == ["m.gguf"] and out.read_bytes() == before
    with pytest.raises(OSError, match="simulated"):
        export_gguf(model, tok, str(tmp_path / "new.gguf"))
    assert os.listdir(tmp_path) == ["m.gguf"]


_KILLED_EXPORT = """
import os, sys
import numpy as np
import palmcore
from palmcore import gguf_export
real = gguf_export._write
def killed(path, *args):
    real(path, *args)
    os._exit(9)  # as kill -9 after the hidden file is written, before it is renamed: no cleanup runs
gguf_export._write = killed
cfg = palmcore.PaLMConfig(vocab_size=1000, d_model=32, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16)
gguf_export.export_gguf(palmcore.PaLM(cfg, seed=1), palmcore.Tokenizer(sys.argv[2]), sys.argv[1], overwrite=True)
"""


def test_a_killed_export_leaves_the_old_file_and_the_next_tidies(tmp_path, tok):
    cfg = palmcore.PaLMConfig(vocab_size=1000, d_model=32, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16)
    out = tmp_path / "m.gguf"
    export_gguf(palmcore.PaLM(cfg, seed=0), tok, str(out))
    before = out.read_bytes()
    done = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(out), tok.model_path], timeout=120)
    assert done.returncode == 9
    left = sorted(os.listdir(tmp_path))
    assert out.read_bytes() == before and len(left) == 2 and left[0].startswith(".tmp-m.gguf-")
    (tmp_path / ".tmp-m.gguf-notmine").write_text("other")
    export_gguf(palmcore.PaLM(cfg, seed=1), tok, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [".tmp-m.gguf-notmine", "m.gguf"] and out.read_bytes() != before


# ----------------------------------------------------------------------------- the command


def test_export_format_gguf_from_the_command_line(tmp_path, tok, capsys):
    model = make_model(vocab=tok.vocab_size)
    checkpoint.save(str(tmp_path / "run" / "checkpoints"), model, tokenizer_path=tok.model_path)
    (tmp_path / "run" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    out = tmp_path / "gguf" / "m.gguf"
    assert cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(out),
                "--dtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and "q8_0" in printed and "llama-completion -m" in printed
    got = values(out)
    assert got["general.file_type"] == 7 and got["tokenizer.chat_template"] == "{{ messages[0].content }}"
    with pytest.raises(SystemExit):
        cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(out)])
    assert "exists (overwrite=True / --force replaces it)" in capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(out),
                "--force"]) == 0
    assert values(out)["general.file_type"] == 0  # f32 by default
    for flags, message in ((["--format", "gguf", "--max-shard-size", "2G"], "--max-shard-size is for --format hf"),
                           (["--format", "hf", "--dtype", "q8_0"], "--dtype q8_0 is not a --format hf dtype"),
                           (["--format", "gguf", "--dtype", "float32", "--out", str(tmp_path / "run" / "x.gguf")],
                            "it lies inside the run being exported")):
        with pytest.raises(SystemExit) as e:
            cli(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "other.gguf"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_checkpoint_without_tokenizer_or_sparse_does_not_export(tmp_path, capsys):
    path = checkpoint.save(str(tmp_path / "run" / "checkpoints"), make_model())
    with pytest.raises(SystemExit):
        cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert "holds no tokenizer.model: a GGUF file holds the vocabulary" in capsys.readouterr().err
    config = json.loads(Path(path, "config.json").read_text())
    Path(path, "config.json").write_text(json.dumps({**config, "n_experts": 8, "expert_top_k": 2}))
    with pytest.raises(SystemExit):
        cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert "mixture-of-experts model (n_experts=8): it does not export to GGUF" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["run"]
