"""Export to and import from the Hugging Face layout (issue 14; PALM_SPEC.md "Interchange").

transformers needs torch, which CI does not install, so the exported model is checked against
tests/cohere_numpy.py, a float64 NumPy transcription of transformers' CohereForCausalLM that reads
the exported files on its own; the tokenizer is checked with the Hugging Face ``tokenizers``
library itself (a test dependency). bench/check_hf_export.py runs the same checks against the
real transformers where torch is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import palmcore
from cohere_numpy import CohereNumpy, read_safetensors
from helpers import norm_scales_off_one
from palmcore import checkpoint, interchange
from palmcore.cli import main as cli
from palmcore.interchange import export_hf, import_hf
from palmcore.tensorfile import to_bf16_bits

TOL = 1e-5  # float32 logits against the float64 transcription: max|a - b| / max|b|


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:30]]
    texts.append("数字 1234567890 和 emoji 😀 ▁ \ue000 tabs\tand  spaces")
    return palmcore.Tokenizer.train(texts, 600, str(tmp_path_factory.mktemp("tok") / "t.model"))


def make_model(vocab=600, seed=0, **fields) -> palmcore.PaLM:
    """A tiny model whose norm scales are away from 1 (a misplaced scale shows)."""
    cfg = palmcore.PaLMConfig(**{**dict(vocab_size=vocab, d_model=48, n_layers=2, n_heads=4, n_kv_heads=1,
                                        ffn_dim=80, max_seq_len=64), **fields})
    return norm_scales_off_one(palmcore.PaLM(cfg, seed=seed), seed)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def tokens_for(cfg, B=2, T=24, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# ----------------------------------------------------------------------------- the model


SHAPES = {
    "mqa": dict(n_heads=4, n_kv_heads=1),                               # PaLM's multi-query
    "gqa-head_dim": dict(n_heads=4, n_kv_heads=2, head_dim=10),         # head_dim != d_model / n_heads
    "mha-options": dict(n_heads=2, n_kv_heads=2, rope_base=500.0, norm_eps=1e-3, n_layers=3),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exported_logits_are_cohere_for_causal_lm(tmp_path, shape):
    model = make_model(**SHAPES[shape])
    export_hf(model, None, str(tmp_path / "hf"))
    tokens = tokens_for(model.config)
    err = rel(model.forward(tokens), CohereNumpy(str(tmp_path / "hf"))(tokens))
    assert err <= TOL, err


def test_the_permutation_is_what_makes_it_match(tmp_path, monkeypatch):
    """The oracle is sensitive to RoPE's pairing: without the per-head column reordering (or with
    rotate-half read as interleaved) the logits are far off."""
    model = make_model()
    tokens = tokens_for(model.config)
    monkeypatch.setattr(interchange, "rope_permutation", lambda h, dh: np.arange(h * dh))
    export_hf(model, None, str(tmp_path / "hf"))
    assert rel(model.forward(tokens), CohereNumpy(str(tmp_path / "hf"))(tokens)) > 1e-2


def test_greedy_tokens_match(tmp_path):
    model = make_model(seed=3)
    export_hf(model, None, str(tmp_path / "hf"))
    oracle = CohereNumpy(str(tmp_path / "hf"))
    for prompt in ([1, 17, 42, 5], [1, 300]):
        assert model.generate([prompt], max_new_tokens=12, temperature=0.0)[0] == oracle.greedy(prompt, 12, eos=1)


def test_config_and_generation_config(tmp_path, tok):
    model = make_model(n_kv_heads=2, z_loss=3e-4, max_seq_len=40)
    export_hf(model, tok, str(tmp_path / "hf"))
    cfg, c = model.config, json.loads((tmp_path / "hf" / "config.json").read_text())
    assert c["architectures"] == ["CohereForCausalLM"] and c["model_type"] == "cohere"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"], c["head_dim"], c["max_position_embeddings"], c["vocab_size"]) == \
        (cfg.d_model, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 40, cfg.vocab_size)
    assert c["logit_scale"] == 1 / np.sqrt(cfg.d_model) and c["tie_word_embeddings"] is True
    assert c["use_qk_norm"] is False and c["attention_bias"] is False and c["rope_scaling"] is None
    assert c["rope_theta"] == cfg.rope_base == c["rope_parameters"]["rope_theta"]
    assert c["layer_norm_eps"] == cfg.norm_eps and c["hidden_act"] == "silu"
    # BOS is </s> (1): the token palmcore feeds before a prompt, so converters put it first too
    assert (c["pad_token_id"], c["eos_token_id"], c["bos_token_id"]) == (0, 1, 1)
    g = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (g["pad_token_id"], g["eos_token_id"], g["bos_token_id"]) == (0, 1, 1)
    names = read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in names and len(names) == 2 + 8 * cfg.n_layers
    header = (tmp_path / "hf" / "model.safetensors").read_bytes()
    meta = json.loads(header[8:8 + int.from_bytes(header[:8], "little")])["__metadata__"]
    assert meta["format"] == "pt"  # transformers refuses safetensors without it


def test_round_trip_is_bit_for_bit(tmp_path, tok):
    model = make_model(n_kv_heads=2, head_dim=10, z_loss=2e-4, rope_base=1234.5, norm_eps=1e-4)
    export_hf(model, tok, str(tmp_path / "hf"))
    back, back_tok = import_hf(str(tmp_path / "hf"))
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert all(np.array_equal(bits(a[n]), bits(b[n])) for n in a)
    assert back_tok.encode("def f(): return 1") == tok.encode("def f(): return 1")


def test_bf16_export(tmp_path):
    model = make_model(n_kv_heads=2)
    export_hf(model, None, str(tmp_path / "hf"), dtype="bf16")
    raw = (tmp_path / "hf" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size < model.num_params() * 2 + 8192
    back, _ = import_hf(str(tmp_path / "hf"))  # the rounded weights, as float32
    original = model.state_dict()
    for name, value in back.state_dict().items():
        assert np.array_equal(bits(value) >> 16, to_bf16_bits(original[name])) and not (bits(value) & 0xFFFF).any()
    tokens = tokens_for(model.config)
    assert rel(back.forward(tokens), CohereNumpy(str(tmp_path / "hf"))(tokens)) <= TOL
    export_hf(back, None, str(tmp_path / "again"), dtype="bf16")  # bf16 -> bf16 is exact
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == raw


def test_bf16_rounding_is_nearest_even():
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -3.4e38, np.inf, -0.0, 1e-40],
                      np.float32)
    got = (to_bf16_bits(values).astype(np.uint32) << 16).view(np.float32)
    assert got.tolist()[:4] == [1.0, 1.0, 1 + 2**-6, 1 + 2**-7]
    assert got[4] == -np.inf and got[5] == np.inf and np.signbit(got[6])
    assert np.isnan((to_bf16_bits(np.array([np.nan], np.float32)).astype(np.uint32) << 16).view(np.float32)).all()


def test_sharded_export_has_an_index_and_loads(tmp_path, tok):
    model = make_model()
    export_hf(model, tok, str(tmp_path / "hf"), max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "hf"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == 4 * model.num_params()
    tokens = tokens_for(model.config)
    assert rel(model.forward(tokens), CohereNumpy(str(tmp_path / "hf"))(tokens)) <= TOL
    back, _ = import_hf(str(tmp_path / "hf"))
    a, b = model.state_dict(), back.state_dict()
    assert all(np.array_equal(bits(a[n]), bits(b[n])) for n in a)


def test_a_foreign_logit_scale_is_folded_into_the_final_norm(tmp_path):
    model = make_model()
    export_hf(model, None, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["logit_scale"] = 0.0625  # Command-R's, not 1/sqrt(48)
    del config["palmcore"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    back, _ = import_hf(str(tmp_path / "hf"))
    tokens = tokens_for(model.config)
    assert rel(back.forward(tokens), CohereNumpy(str(tmp_path / "hf"))(tokens)) <= TOL


# ----------------------------------------------------------------------------- the tokenizer

HOSTILE = ["", " ", "  a  b  ", "\t\n\r\n\x0b\x0c", "\u2581", "\u2581\u2581 \u2581x", "\ue000", "\ue000s", "\ue000e",
           "\ue000es\u2581\ue000\ue000", "a\u2581b \u2581 c", "</s>", "<s>x</s>", "<pad><unk>", "<0x41>", "\u2581<0x0A>",
           "0123456789 3.14159 1e-5", "数字 和 emoji 😀👍🏽 \u3000\u00a0\u200b", "\x00\x01\x7f", "\ud7ff\uffff\U0010ffff",
           "def f(x):\n\tif x:\n        return 'a  b'  # ▁\n", " " * 40, "\n" * 9, "e\u0301 \ufb01 \u2126"]


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    """The exported tokenizer.json, loaded by the Hugging Face ``tokenizers`` library (a test
    dependency: its absence is an error, not a skip), with special tokens never read from text
    as transformers does with the exported ``split_special_tokens``."""
    import tokenizers  # noqa: PLC0415

    out = tmp_path_factory.mktemp("hf-tok") / "hf"
    export_hf(make_model(vocab=tok.vocab_size), tok, str(out))
    loaded = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    loaded.encode_special_tokens = True
    return loaded


def roundtrip(tok, hf_tok, text):
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False).ids == ids, text
    assert hf_tok.encode(text).ids == [1] + ids  # the prompt form: end-of-document first
    assert hf_tok.decode(ids) == text
    assert hf_tok.decode([1] + ids, skip_special_tokens=True) == text


def test_tokenizer_matches_on_the_default_corpus(tok, hf_tok):
    from palmcore.data import stdlib_files  # noqa: PLC0415

    files = stdlib_files()
    for path in files[::max(1, len(files) // 60)]:  # 60 whole files across the default corpus
        roundtrip(tok, hf_tok, Path(path).read_text(encoding="utf-8", errors="replace"))


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_tokenizer_matches_on_hostile_strings(tok, hf_tok, text):
    roundtrip(tok, hf_tok, text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120) | st.text(alphabet=st.sampled_from(list(" \t\n▁\ue000es1a<>/")), max_size=60))
def test_tokenizer_matches_on_any_string(tok, hf_tok, text):
    roundtrip(tok, hf_tok, text)


def test_tokenizer_files(tmp_path, tok):
    export_hf(make_model(), tok, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["split_special_tokens"] is True
    assert (config["pad_token"], config["eos_token"], config["unk_token"], config["bos_token"]) == \
        ("<pad>", "</s>", "<unk>", "</s>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text())["bos_token"] == "</s>"
    assert config["clean_up_tokenization_spaces"] is False and config["model_max_length"] == 64
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == Path(tok.model_path).read_bytes()
    t = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    assert t["model"]["type"] == "BPE" and t["model"]["byte_fallback"] is True
    assert {a["id"]: a["content"] for a in t["added_tokens"]} == {0: "<pad>", 1: "</s>", 2: "<unk>", 3: "<s>"}
    assert len(t["model"]["vocab"]) == tok.vocab_size


def test_export_refuses_a_tokenizer_of_another_size(tmp_path, tok):
    with pytest.raises(ValueError, match=r"the tokenizer has 600 tokens but the model's vocab_size is 700"):
        export_hf(make_model(vocab=700), tok, str(tmp_path / "hf"))


# ----------------------------------------------------------------------------- what import refuses


@pytest.fixture()
def exported(tmp_path):
    model = make_model()
    path = tmp_path / "hf"
    export_hf(model, None, str(path))
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, change):
    tensors = read_safetensors(str(path / "model.safetensors"))
    change(tensors)
    palmcore.tensorfile.save_file({k: v.astype(np.float32) for k, v in tensors.items()},
                                  str(path / "model.safetensors"), {"format": "pt"})


@pytest.mark.parametrize("changes, match", [
    ({"use_qk_norm": True}, r"use_qk_norm=True"),
    ({"attention_bias": True}, r"attention_bias=True \(palmcore has no biases\)"),
    ({"sliding_window": 4096}, r"sliding_window=4096"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, r"layer_types="),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling="),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4}}, r"rope_parameters.rope_type='yarn'"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings=False \(an untied output head"),
    ({"num_local_experts": 8}, r"num_local_experts=8 \(a sparse, mixture-of-experts model"),
    ({"num_experts": 4}, r"num_experts=4 \(a sparse"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, r"not a dense CohereForCausalLM \(model_type 'llama'"),
    ({"model_type": "cohere2"}, r"model_type 'cohere2'"),
    ({"head_dim": 7}, r"head_dim must be even"),
    ({"num_key_value_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    ({"logit_scale": -1.0}, r"logit_scale=-1.0"),
])
def test_import_refuses_what_palmcore_cannot_represent(exported, changes, match):
    edit_config(exported, **changes)
    with pytest.raises(ValueError, match=match):
        import_hf(str(exported))


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(48)}),
     r"cannot represent biases \(tensor model.layers.0.self_attn.q_proj.bias\)"),
    (lambda t: t.update({"model.layers.1.self_attn.q_norm.weight": np.ones((4, 12))}),
     r"cannot represent use_qk_norm \(tensor model.layers.1.self_attn.q_norm.weight\)"),
    (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] * 2}), r"cannot represent an untied head"),
    (lambda t: t.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.ones((80, 48))}),
     r"unexpected \['model.layers.2.mlp.up_proj.weight'\]"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.ones((48, 80))}),
     r"tensor 'model.layers.0.mlp.up_proj.weight' has shape \(48, 80\), but config.json implies \(80, 48\)"),
    (lambda t: t["model.norm.weight"].__setitem__(0, np.nan), r"'model.norm.weight' holds a non-finite value"),
])
def test_import_refuses_weights_it_cannot_represent(exported, change, match):
    edit_weights(exported, change)
    with pytest.raises(ValueError, match=match):
        import_hf(str(exported))


def test_a_tied_copy_of_the_head_is_accepted(exported):
    edit_weights(exported, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    import_hf(str(exported))


def test_corrupt_and_foreign_directories_are_named(tmp_path, exported):
    with pytest.raises(ValueError, match=r"does not exist"):
        import_hf(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a Hugging Face model directory: config.json is missing"):
        import_hf(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is damaged: not valid JSON"):
        import_hf(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"a JSON object was expected, got list"):
        import_hf(str(tmp_path / "empty"))
    config = json.loads((exported / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the field hidden_size is missing"):
        import_hf(str(tmp_path / "empty"))
    weights = (exported / "model.safetensors").read_bytes()
    os.rename(exported / "model.safetensors", exported / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds no safetensors weights .*pytorch_model.bin.*convert them"):
        import_hf(str(exported))
    (exported / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated"):
        import_hf(str(exported))
    (exported / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match=r"truncated"):
        import_hf(str(exported))


def test_sharded_damage_is_named(tmp_path):
    path = tmp_path / "hf"
    export_hf(make_model(), None, str(path), max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    os.unlink(path / sorted(set(index["weight_map"].values()))[1])
    with pytest.raises(ValueError, match=r"model.safetensors.index.json names model-0000\d-of-\d+.safetensors, which "
                                         r"is missing"):
        import_hf(str(path))
    (path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(ValueError, match=r"index.json is damaged"):
        import_hf(str(path))


def test_quantized_weights_are_named(exported):
    raw = (exported / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.embed_tokens.weight"].update(dtype="I8", shape=[600, 4 * 48])  # the same bytes, as int8
    encoded = json.dumps(header).encode()
    (exported / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n:])
    with pytest.raises(ValueError, match=r"is I8; palmcore imports F32, BF16 and F16 weights"):
        import_hf(str(exported))


# ----------------------------------------------------------------------------- mixture of experts


def test_a_sparse_model_does_not_export(tmp_path):
    model = make_model()
    model.config.n_experts = 4  # (PaLMConfig has no MoE fields yet; PALM_SPEC "Sparse activation" does)
    try:
        with pytest.raises(ValueError, match=r"mixture-of-experts model \(n_experts=4\): it does not export"):
            export_hf(model, None, str(tmp_path / "hf"))
    finally:
        del model.config.n_experts
    assert not (tmp_path / "hf").exists()


def test_a_sparse_checkpoint_does_not_export(tmp_path, capsys):
    path = checkpoint.save(str(tmp_path / "run" / "checkpoints"), make_model())
    config = json.loads(Path(path, "config.json").read_text())
    Path(path, "config.json").write_text(json.dumps({**config, "n_experts": 8, "expert_top_k": 2}))
    with pytest.raises(SystemExit) as e:
        cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert e.value.code == 2
    assert "mixture-of-experts model (n_experts=8): it does not export" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- writing


def test_writes_are_atomic_and_never_clobber(tmp_path, monkeypatch):
    model = make_model()
    out = tmp_path / "hf"
    (out).mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"exists and is not empty"):
        export_hf(model, None, str(out))
    real = interchange._write_json

    def crash(path, value):
        if path.endswith("generation_config.json"):
            raise OSError("disk full (simulated)")
        return real(path, value)

    monkeypatch.setattr(interchange, "_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        export_hf(model, None, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["hf"] and os.listdir(out) == ["keep.txt"]  # untouched, no leftovers
    monkeypatch.undo()
    export_hf(model, None, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["hf"]
    with pytest.raises(ValueError, match=r"exists and is not an empty directory"):
        import_hf(str(out), out=str(out))


# ----------------------------------------------------------------------------- the commands


def test_export_import_generate_and_fine_tune_from_the_command_line(tmp_path, tok, capsys):
    """palmcore export -> palmcore import -> generate (same tokens as the original) -> train
    --resume on the imported run."""
    from palmcore.cli import config_overrides  # noqa: PLC0415
    from palmcore.text import generate  # noqa: PLC0415
    from palmcore.training import TrainSettings, run  # noqa: PLC0415

    model = make_model(vocab=tok.vocab_size, n_kv_heads=2)
    checkpoint.save(str(tmp_path / "run" / "checkpoints"), model, tokenizer_path=tok.model_path)
    assert cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf"),
                "--max-shard-size", "30K"]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors.index.json" in printed and "tokenizer.json" in printed
    assert cli(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    printed = capsys.readouterr().out
    assert "palmcore generate --checkpoint" in printed
    kwargs = dict(max_new_tokens=10, temperature=0.0)
    assert generate(str(tmp_path / "imported"), "def f(x):", **kwargs) == \
        generate(str(tmp_path / "run"), "def f(x):", **kwargs)
    # fine-tuning: the printed command's --set values rebuild the same config
    command = printed.split("fine-tune: ", 1)[1].split()
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    seq_len = int(command[command.index("--seq-len") + 1])
    summary = run(TrainSettings(corpus=[str(corpus)], out=str(tmp_path / "imported"), overrides=config_overrides(sets),
                                batch_size=2, seq_len=min(seq_len, 32), steps=2, eval_every=1, eval_batches=1,
                                progress=False, sample_tokens=0), resume=True, log=lambda _: None)
    assert summary["steps"] == 2
    tuned = checkpoint.load(str(tmp_path / "imported" / "checkpoints"))
    assert tuned.trainer["step"] == 2 and tuned.model.config == model.config


def test_import_without_a_tokenizer_says_so(tmp_path, capsys):
    export_hf(make_model(), None, str(tmp_path / "hf"))
    assert cli(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "no SentencePiece tokenizer.model came with it" in capsys.readouterr().out
    assert checkpoint.latest(str(tmp_path / "run" / "checkpoints"))
    with pytest.raises(SystemExit):
        cli(["import", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "run2")])
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what an export leaves alone


def tree(root) -> dict:
    """{relative path: contents} of everything under ``root`` (a link: where it points)."""
    found = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            found[key] = ("-> " + os.readlink(path) if os.path.islink(path) else
                          None if os.path.isdir(path) else Path(path).read_bytes())
    return found


@pytest.fixture()
def runs(tmp_path, tok):
    """Two runs side by side, runs/x and runs/y, and runs/link -> runs/x."""
    model = make_model(vocab=tok.vocab_size)
    for name in ("x", "y"):
        checkpoint.save(str(tmp_path / "runs" / name / "checkpoints"), model, step=1, tokenizer_path=tok.model_path)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "runs" / "x")
    return tmp_path / "runs"


@pytest.mark.parametrize("source, out, how", [
    ("x", "x", "is"),
    ("x", ".", "contains"),
    ("x", "x/checkpoints", "lies inside"),
    ("x", "x/hf", "lies inside"),
    ("x/checkpoints", "x", "is"),
    ("x/checkpoints/step-00000001", "x", "is"),
    ("x/checkpoints/step-00000001", ".", "contains"),
    ("x", "link", "is"),
    ("link", "x", "is"),
    ("x", "y/../x", "is"),
])
def test_export_refuses_an_out_that_is_contains_or_lies_inside_the_source_run(runs, capsys, source, out, how):
    before = tree(runs.parent)
    with pytest.raises(SystemExit) as e:
        cli(["export", "--checkpoint", str(runs / source), "--out", str(runs / out), "--force"])
    assert e.value.code == 2
    assert f"refusing to export to {runs / out}: it {how} the run being exported" in capsys.readouterr().err
    assert tree(runs.parent) == before  # nothing deleted, nothing added


def test_export_hf_refuses_an_out_over_the_tokenizers_run(runs):
    model, tokenizer = palmcore.load(str(runs / "x"))
    before = tree(runs.parent)
    for out, how in ((runs / "x", "is"), (runs, "contains"), (runs / "x" / "hf", "lies inside")):
        with pytest.raises(ValueError, match=rf"refusing to export to .*: it {how} the tokenizer's run"):
            export_hf(model, tokenizer, str(out), overwrite=True)
    assert tree(runs.parent) == before
    export_hf(model, tokenizer, str(runs.parent / "hf"))  # beside the runs: fine
    assert tree(runs) == {k[len("runs/"):]: v for k, v in before.items() if k.startswith("runs/")}


def test_an_interrupted_export_is_tidied_by_the_next(tmp_path):
    """What publish_directory leaves when killed (a half-written .tmp-hf-*, an .old-hf-* copy,
    an empty one) goes at the next export to the same place; nothing else does."""
    model, out = make_model(), tmp_path / "hf"
    export_hf(model, None, str(out))
    shutil.copytree(out, tmp_path / ".old-hf-abcd1234" / "old")
    (tmp_path / ".tmp-hf-efgh_678").mkdir()
    (tmp_path / ".tmp-hf-efgh_678" / "config.json").write_text("{")
    (tmp_path / ".old-hf-ijkl9012").mkdir()
    others = {".old-hf-mine": None, ".old-hfx-abcd1234": None, ".tmp-hf-abcd12345": None, ".old-hf-zzzz9999": "notes",
              ".old-hf-qqqq1111": "a file", ".tmp-other-abcd1234": None}
    for name, content in others.items():
        if content == "a file":
            (tmp_path / name).write_text(content)
        else:
            (tmp_path / name / "old").mkdir(parents=True)
            if content:
                (tmp_path / name / content).write_text(content)
    export_hf(model, None, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["hf", *others])
    assert os.listdir(tmp_path / ".old-hf-zzzz9999") != []
    # killed between its two renames: the previous export waits aside and is put back
    os.rename(out, tmp_path / "aside")
    os.makedirs(tmp_path / ".old-hf-abcd1234")
    os.rename(tmp_path / "aside", tmp_path / ".old-hf-abcd1234" / "old")
    with pytest.raises(ValueError, match=r"exists and is not empty"):
        export_hf(model, None, str(out))
    assert sorted(os.listdir(tmp_path)) == sorted(["hf", *others])
    import_hf(str(out))


_KILLED_EXPORT = """
import os, shutil, sys
import palmcore
from palmcore import interchange
kill_at, calls = int(sys.argv[1]), [0]
def killed_at_call(function):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(9)  # as kill -9: no cleanup runs
        return function(*args, **kwargs)
    return call
os.rename, shutil.rmtree = killed_at_call(os.rename), killed_at_call(shutil.rmtree)
interchange.save_file, interchange._write_json = killed_at_call(interchange.save_file), killed_at_call(interchange._write_json)
cfg = palmcore.PaLMConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16)
palmcore.export_hf(palmcore.PaLM(cfg, seed=int(sys.argv[3])), None, sys.argv[2], overwrite=True)
"""


def test_a_kill_at_any_point_of_an_export_leaves_a_whole_one(tmp_path):
    """export --force killed at each of its writes, renames and removals: a whole export (the
    old or the new) remains, and the next export puts it in place with no leftovers."""
    cfg = palmcore.PaLMConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16)
    old, new = (palmcore.PaLM(cfg, seed=seed).state_dict()["embed"] for seed in (0, 1))
    for kill_at in range(1, 20):
        folder = tmp_path / str(kill_at)
        folder.mkdir()
        out = folder / "hf"
        export_hf(palmcore.PaLM(cfg, seed=0), None, str(out))
        done = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(kill_at), str(out), "1"], timeout=120)
        if done.returncode == 0:
            break
        assert done.returncode == 9
        asides = [folder / n / "old" for n in os.listdir(folder) if n.startswith(".old-hf-")]
        whole = out if out.exists() else asides[0]  # killed between the renames: the old one waits aside
        embed = import_hf(str(whole))[0].state_dict()["embed"]
        assert np.array_equal(embed, old) or np.array_equal(embed, new)
        with pytest.raises(ValueError, match=r"exists and is not empty"):  # (tidies first)
            export_hf(palmcore.PaLM(cfg, seed=1), None, str(out))
        assert os.listdir(folder) == ["hf"]
        assert np.array_equal(import_hf(str(out))[0].state_dict()["embed"], embed)
    assert kill_at > 6  # a kill at each: 3 writes, 2 renames, the removal of the old copy
