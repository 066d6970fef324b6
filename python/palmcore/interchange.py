"""Models that leave palmcore, and come back: the Hugging Face layout (PALM_SPEC.md "Interchange").

    palmcore.export_hf(model, tokenizer, "hf-model")          # a transformers CohereForCausalLM
    model, tokenizer = palmcore.import_hf("hf-model", out="runs/imported")

A palmcore model is exactly a transformers ``CohereForCausalLM``: parallel block, one bias-free
mean-centred LayerNorm per layer, SwiGLU, RoPE, tied embeddings and ``logit_scale = 1/sqrt(D)``.
The weights are transposed (palmcore keeps ``[in, out]``, torch's ``Linear`` ``[out, in]``), and
inside each head the columns of ``wq`` and ``wk`` are reordered from rotate-half RoPE (pairs
``(j, j + dh/2)``) to Cohere's interleaved RoPE (pairs ``(2j, 2j + 1)``): new column ``2j`` is old
column ``j``, ``2j + 1`` is ``j + dh/2``. q and k get the same reordering, so every q·k is unchanged.

An export directory holds ``config.json``, ``generation_config.json``, the weights
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json`` above ``max_shard_bytes``), and the tokenizer: ``tokenizer.json``
(the SentencePiece model as a Hugging Face ``tokenizers`` BPE with byte fallback),
``tokenizer_config.json``, ``special_tokens_map.json`` and the SentencePiece ``tokenizer.model``
itself. Directories are built under a hidden temporary name beside the target and renamed into
place, so a crash leaves the old directory or the new one, never half of one.

The tokenizer: palmcore's SentencePiece model keeps whitespace exactly, splits digits and falls
back to UTF-8 bytes; palmcore escapes U+2581 ("▁", SentencePiece's space) as U+E000 "s" and U+E000
as U+E000 "e" before encoding and restores them after decoding. ``tokenizer.json`` does the same
with ``tokenizers``' own parts: normalizer Replace(U+E000 → U+E000 e), Replace(▁ → U+E000 s),
Replace(" " → ▁); no pre-tokenizer (palmcore's pieces never cross a word boundary); a BPE model
whose merges are SentencePiece's pieces in score order, with byte fallback; decoder Replace(▁ → " "),
ByteFallback, Fuse, Replace(U+E000 s → ▁), Replace(U+E000 e → U+E000). The special tokens (pad 0,
``</s>`` 1, unk 2, ``<s>`` 3) are never read from text (``split_special_tokens``), as in SentencePiece.
With ``add_special_tokens`` (the default in transformers) a text is preceded by ``</s>``, the
end-of-document token, as ``palmcore generate`` feeds prompts; ``add_special_tokens=False`` gives
exactly ``palmcore.Tokenizer.encode``. So the BOS that every file declares (config.json,
generation_config.json, tokenizer_config.json) is ``</s>``, id 1: the token palmcore really puts
first, not the unused ``<s>``.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import shutil

import numpy as np

from palmcore import checkpoint
from palmcore.chat import DEFAULT_TEMPLATE, MAX_TEMPLATE_BYTES, RUN_TEMPLATE, ChatTemplate, run_template
from palmcore.config import PaLMConfig
from palmcore.files import publish_directory, read_json_object, recover_directory
from palmcore.tensorfile import load_file, read_header, save_file
from palmcore.tokenizer import BOS_ID, EOD_ID, PAD_ID, UNK_ID, Tokenizer

FORMAT = "palmcore-hf/1"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ESCAPE = "\ue000"  # as palmcore.tokenizer
_SPACE = "\u2581"
_SPECIALS = {PAD_ID: "<pad>", EOD_ID: "</s>", UNK_ID: "<unk>", BOS_ID: "<s>"}
# generation defaults: palmcore generate's
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}


# ----------------------------------------------------------------------------- the mapping

def rope_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Column order taking a rotate-half projection [D, n_heads·dh] to the interleaved one:
    ``interleaved = rotate_half[:, perm]`` (new column 2j of a head is old j, 2j+1 is j + dh/2)."""
    half = head_dim // 2
    within = np.empty(head_dim, np.int64)
    within[0::2] = np.arange(half)
    within[1::2] = np.arange(half) + half
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def _hf_names(i: int) -> dict[str, str]:
    p, h = f"layers.{i}.", f"model.layers.{i}."
    return {p + "norm.scale": h + "input_layernorm.weight",
            p + "attn.wq": h + "self_attn.q_proj.weight", p + "attn.wk": h + "self_attn.k_proj.weight",
            p + "attn.wv": h + "self_attn.v_proj.weight", p + "attn.wo": h + "self_attn.o_proj.weight",
            p + "mlp.w_gate": h + "mlp.gate_proj.weight", p + "mlp.w_up": h + "mlp.up_proj.weight",
            p + "mlp.w_down": h + "mlp.down_proj.weight"}


def name_map(config: PaLMConfig) -> dict[str, str]:
    """{palmcore spec name: Hugging Face tensor name}, in the spec's order."""
    names = {"embed": "model.embed_tokens.weight"}
    for i in range(config.n_layers):
        names.update(_hf_names(i))
    names["final_norm.scale"] = "model.norm.weight"
    return names


def to_hf_tensors(config: PaLMConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """palmcore parameters (spec names, [in, out]) as CohereForCausalLM tensors ([out, in],
    q and k columns reordered per head for interleaved RoPE). Exact: only copies."""
    q_perm = rope_permutation(config.n_heads, config.head_dim)
    k_perm = rope_permutation(config.n_kv_heads, config.head_dim)
    out = {}
    for name, hf in name_map(config).items():
        value = params[name]
        if name.endswith("attn.wq"):
            value = value[:, q_perm]
        elif name.endswith("attn.wk"):
            value = value[:, k_perm]
        if value.ndim == 2 and name != "embed":
            value = value.T
        out[hf] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def from_hf_tensors(config: PaLMConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_hf_tensors`."""
    q_inv = np.argsort(rope_permutation(config.n_heads, config.head_dim))
    k_inv = np.argsort(rope_permutation(config.n_kv_heads, config.head_dim))
    out = {}
    for name, hf in name_map(config).items():
        value = tensors[hf]
        if value.ndim == 2 and name != "embed":
            value = value.T
        if name.endswith("attn.wq"):
            value = value[:, q_inv]
        elif name.endswith("attn.wk"):
            value = value[:, k_inv]
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def hf_config(config: PaLMConfig, dtype: str = "float32") -> dict:
    """config.json of the CohereForCausalLM that ``config`` is (PALM_SPEC.md "Interchange")."""
    return {
        "architectures": ["CohereForCausalLM"],
        "model_type": "cohere",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "layer_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_scaling": None,
        "logit_scale": 1.0 / math.sqrt(config.d_model),
        "tie_word_embeddings": True,
        "use_qk_norm": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOD_ID,
        "bos_token_id": EOD_ID,  # what palmcore feeds first (PALM_SPEC "Tokenizer"), not the unused <s>
        "torch_dtype": dtype,
        "dtype": dtype,
        "palmcore": {"format": FORMAT, "config": config.to_dict()},
    }


# ----------------------------------------------------------------------------- export

_SPARSE_REFUSALS = {
    "hf": "the Hugging Face layout, since no transformers architecture matches PALM_SPEC's routing (softmax over "
          "all experts, top-k renormalized, dropless) yet",
    "gguf": "GGUF, since llama.cpp's command-r architecture, which the GGUF export writes, is dense",
}


def refuse_sparse(fields, where: str, target: str = "hf") -> None:
    """ValueError for a mixture-of-experts model (a PaLMConfig, or a checkpoint's config.json
    fields): no ``target`` format ("hf", "gguf") can hold one."""
    experts = fields.get("n_experts", 0) if isinstance(fields, dict) else getattr(fields, "n_experts", 0)
    if experts:
        raise ValueError(f"{where} is a mixture-of-experts model (n_experts={experts}): it does not export to "
                         f"{_SPARSE_REFUSALS[target]}; only dense models export")


def export_hf(model, tokenizer, out: str, dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False, chat_template: str | None = None) -> str:
    """Write ``model`` (a palmcore.PaLM) and ``tokenizer`` (a palmcore.Tokenizer, or None for the
    weights alone) to the directory ``out`` as a Hugging Face ``CohereForCausalLM`` that
    ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)`` load with no custom code. ``dtype``: "float32"
    (exact) or "bf16" (rounded to nearest even). Weights above ``max_shard_bytes`` are split
    into shards with an index. An existing non-empty ``out`` is refused unless ``overwrite``, and
    so is an ``out`` that is, contains or lies inside the run the tokenizer belongs to (or its
    file). ``chat_template``: the Jinja source stored as tokenizer_config.json's ``chat_template``
    (None: palmcore.chat's default). Returns ``out``."""
    from palmcore.model import PaLM  # noqa: PLC0415

    if not isinstance(model, PaLM):
        raise TypeError(f"model must be a palmcore.PaLM, got {type(model).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a palmcore.Tokenizer or None, got {type(tokenizer).__name__}")
    dtype = {"float32": "float32", "fp32": "float32", "f32": "float32",
             "bf16": "bfloat16", "bfloat16": "bfloat16"}.get(dtype)
    if dtype is None:
        raise ValueError("dtype must be 'float32' or 'bf16'")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    config = model.config
    refuse_sparse(config, "this model")
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    if tokenizer is not None:
        refuse_out_overlapping(out, *source_of(tokenizer.model_path))
    tensors = to_hf_tensors(config, model.state_dict())

    def write(tmp: str) -> None:
        _write_weights(tmp, tensors, dtype == "bfloat16", max_shard_bytes)
        _write_json(os.path.join(tmp, "config.json"), hf_config(config, dtype))
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": EOD_ID, "eos_token_id": EOD_ID, "pad_token_id": PAD_ID, **SAMPLING})
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp, config.max_seq_len, chat_template or DEFAULT_TEMPLATE)

    _write_directory(out, write, overwrite)
    return out


def export_checkpoint(path: str, out: str, dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      overwrite: bool = False) -> str:
    """:func:`export_hf` of a palmcore checkpoint (a run folder, its checkpoints folder or one
    checkpoint), with its tokenizer.model when it has one and its run's chat template. An ``out``
    that is, contains or lies inside the run (symlinks resolved) is refused: replacing it would
    delete the run."""
    model, tokenizer, template = load_for_export(path, out, "hf")
    return export_hf(model, tokenizer, out, dtype, max_shard_bytes, overwrite, template)


def load_for_export(path: str, out: str, target: str):
    """(model, tokenizer or None, chat template source or None) of the palmcore checkpoint at
    ``path`` (a run folder, its checkpoints folder or one checkpoint) that is to be exported to
    ``out`` as ``target`` ("hf", "gguf"): its tokenizer.model when it has one, its run's chat
    template when it has one. Refused first: an ``out`` that is, contains or lies inside the run
    (symlinks resolved), and a mixture-of-experts checkpoint."""
    found = _find_checkpoint(path)
    for source in (_run_of(found), path):
        refuse_out_overlapping(out, source, "the run being exported")
    fields = read_json_object(os.path.join(found, "config.json"))
    refuse_sparse(fields, f"checkpoint {found}", target)  # before PaLMConfig, which has no MoE fields yet
    ck = checkpoint.load(found, with_optimizer=False)
    tok_path = os.path.join(ck.path, "tokenizer.model")
    tokenizer = Tokenizer(tok_path) if os.path.exists(tok_path) else None
    template = run_template(ck.path)
    return ck.model, tokenizer, template and template.source


def _find_checkpoint(path: str) -> str:
    for candidate in (path, os.path.join(path, "checkpoints")):
        if checkpoint.is_checkpoint(candidate):
            return candidate
        if checkpoint.latest(candidate):
            return checkpoint.latest(candidate)
    if not os.path.exists(path):
        raise ValueError(f"no palmcore checkpoint at {path}: it does not exist")
    raise ValueError(f"no palmcore checkpoint in {path}")


def _run_of(found: str) -> str:
    """The run folder of a checkpoint: the folder holding its checkpoints folder (or, for
    checkpoints saved elsewhere, the folder holding the checkpoints)."""
    root = os.path.dirname(os.path.abspath(found))
    if os.path.basename(root).startswith(".old-step-"):  # a previous version waiting aside
        root = os.path.dirname(root)
    return os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root


def source_of(tokenizer_path: str) -> tuple[str, str]:
    """(path, what it is) that an export of a tokenizer must leave alone: the run it belongs
    to, else its file."""
    folder = os.path.dirname(os.path.abspath(tokenizer_path))
    if checkpoint.is_checkpoint(folder):
        return _run_of(folder), "the tokenizer's run"
    if os.path.isdir(os.path.join(folder, "checkpoints")):
        return folder, "the tokenizer's run"
    return tokenizer_path, "the tokenizer's file"


def refuse_out_overlapping(out: str, source: str, what: str) -> None:
    """Refuse an ``out`` that is, contains or lies inside ``source`` (symlinks resolved): replacing
    it would delete the source (or the runs beside it), and an export inside a run mixes with it."""
    o, s = os.path.realpath(out), os.path.realpath(source)
    common = os.path.commonpath([o, s])
    if common in (o, s):
        how = "is" if o == s else "contains" if common == o else "lies inside"
        raise ValueError(f"refusing to export to {out}: it {how} {what} ({source}), which the export must leave "
                         "as it is; choose a folder outside it")


def _write_weights(directory: str, tensors: dict, bf16: bool, max_shard_bytes: int) -> None:
    item = 2 if bf16 else 4
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        nbytes = value.size * item
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt", "producer": FORMAT}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE), metadata, bf16=bf16)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata, bf16=bf16)
        for name, value in shard.items():
            weight_map[name] = file
            total += value.size * item
    _write_json(os.path.join(directory, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_directory(out: str, write, overwrite: bool) -> None:
    """Build the directory ``out`` by ``write(tmp)`` in a hidden folder beside it, then rename it
    into place (an existing ``out`` is replaced only after the new one is complete). What an
    interrupted export to ``out`` left beside it goes first (an old version that was never
    replaced is put back)."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    tmp_prefix = f".tmp-{os.path.basename(out)}-"
    if os.path.isdir(parent):
        recover_directory(out, tmp_prefix, aside_name="old")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ValueError(f"{out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise ValueError(f"{out} exists and is not empty (overwrite=True / --force replaces it)")
    os.makedirs(parent, exist_ok=True)
    publish_directory(out, write, tmp_prefix=tmp_prefix, aside_name="old")


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """palmcore's SentencePiece model as a Hugging Face ``tokenizers`` tokenizer.json (see the
    module's docstring for how each part matches SentencePiece and palmcore's escape)."""
    sp = tokenizer._sp
    n = sp.GetPieceSize()
    pieces = [sp.IdToPiece(i) for i in range(n)]
    vocab = {}
    for i, piece in enumerate(pieces):
        if piece in vocab:
            raise ValueError(f"{tokenizer.model_path}: the piece {piece!r} appears twice (ids {vocab[piece]} and {i})")
        vocab[piece] = i
    for i, piece in _SPECIALS.items():
        if pieces[i] != piece:
            raise ValueError(f"{tokenizer.model_path}: id {i} is {pieces[i]!r}, expected {piece!r}")
    normal = {p: i for i, p in enumerate(pieces)
              if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i))}
    # SentencePiece's BPE merges the adjacent pair whose joined piece has the highest score;
    # as tokenizers ranks: every way of splitting a piece into two pieces, pieces by score.
    merges = []
    for piece, i in sorted(normal.items(), key=lambda item: (-sp.GetScore(item[1]), item[1])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in normal and piece[k:] in normal]
        merges.extend(sorted(splits, key=lambda lr: (normal[lr[0]], normal[lr[1]])))
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, p in sorted(_SPECIALS.items())]

    def replace(pattern, content):
        return {"type": "Replace", "pattern": {"String": pattern}, "content": content}

    eod = _SPECIALS[EOD_ID]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            replace(_ESCAPE, _ESCAPE + "e"), replace(_SPACE, _ESCAPE + "s"), replace(" ", _SPACE)]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": eod, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": eod, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eod, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {eod: {"id": eod, "ids": [EOD_ID], "tokens": [eod]}}},
        "decoder": {"type": "Sequence", "decoders": [
            replace(_SPACE, " "), {"type": "ByteFallback"}, {"type": "Fuse"},
            replace(_ESCAPE + "s", _SPACE), replace(_ESCAPE + "e", _ESCAPE)]},
        "model": {"type": "BPE", "dropout": None, "unk_token": _SPECIALS[UNK_ID], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def write_tokenizer(tokenizer: Tokenizer, directory: str, max_length: int, chat_template: str) -> None:
    """tokenizer.json, tokenizer_config.json (with ``chat_template``), special_tokens_map.json and
    tokenizer.model."""
    _write_json(os.path.join(directory, "tokenizer.json"), tokenizer_json(tokenizer))
    specials = {"bos_token": _SPECIALS[EOD_ID], "eos_token": _SPECIALS[EOD_ID], "unk_token": _SPECIALS[UNK_ID],
                "pad_token": _SPECIALS[PAD_ID]}
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,  # as tokenizer.json's post-processor does: </s> first
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": p, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, p in sorted(_SPECIALS.items())},
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "left",
        "chat_template": chat_template,
        "palmcore": {"format": FORMAT, "note": "SentencePiece (tokenizer.model) with palmcore's U+2581 escape; "
                                               "texts are preceded by </s> (end of document) when "
                                               "add_special_tokens is on"},
    })
    _write_json(os.path.join(directory, "special_tokens_map.json"), specials)
    shutil.copyfile(tokenizer.model_path, os.path.join(directory, "tokenizer.model"))


# ----------------------------------------------------------------------------- import

_SPARSE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "moe_layer_freq", "expert_interval", "moe_num_experts", "n_experts")


def _read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory" if os.path.exists(path) else f"{path} does not exist")
    if not os.path.exists(config_path):
        raise ValueError(f"{path} is not a Hugging Face model directory: config.json is missing")
    return read_json_object(config_path)


def config_from_hf(fields: dict, where: str = "config.json") -> tuple[PaLMConfig, float]:
    """(PaLMConfig, logit factor) of a CohereForCausalLM config.json; ValueError naming the
    field for anything palmcore cannot represent. The factor is ``logit_scale · sqrt(D)``: 1 for
    palmcore's own exports; otherwise it is folded into ``final_norm.scale`` on import."""
    model_type = fields.get("model_type")
    archs = fields.get("architectures") or []
    if model_type != "cohere" or (archs and "CohereForCausalLM" not in archs):
        raise ValueError(f"{where}: not a dense CohereForCausalLM (model_type {model_type!r}, architectures "
                         f"{archs!r}); palmcore imports only that architecture")

    def refuse(field, value, why):
        raise ValueError(f"{where}: palmcore cannot represent {field}={value!r} ({why})")

    for field in _SPARSE_FIELDS:
        value = fields.get(field)
        if value not in (None, 0, False, [], {}):
            refuse(field, value, "a sparse, mixture-of-experts model; palmcore imports dense models only")
    if fields.get("use_qk_norm"):
        refuse("use_qk_norm", fields["use_qk_norm"], "palmcore has no LayerNorm on queries and keys")
    for field in ("attention_bias", "mlp_bias", "bias"):
        if fields.get(field):
            refuse(field, fields[field], "palmcore has no biases")
    for field in ("sliding_window", "sliding_window_pattern"):
        if fields.get(field) not in (None, 0, False):
            refuse(field, fields[field], "palmcore attends to the whole causal context in every layer")
    layer_types = fields.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        refuse("layer_types", layer_types, "expected a list")
    if layer_types and any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "palmcore attends to the whole causal context in every layer")
    if fields.get("rope_scaling") not in (None, {}):
        refuse("rope_scaling", fields["rope_scaling"], "palmcore's RoPE is unscaled")
    rope = fields.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        refuse("rope_parameters", rope, "expected an object")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters.rope_type", rope.get("rope_type", rope.get("type")), "palmcore's RoPE is unscaled")
    partial = rope.get("partial_rotary_factor", fields.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        refuse("partial_rotary_factor", partial, "palmcore rotates every dimension of a head")
    if fields.get("tie_word_embeddings", True) is not True:
        refuse("tie_word_embeddings", fields.get("tie_word_embeddings"),
               "an untied output head; palmcore's output embedding is its input embedding")
    if fields.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", fields.get("hidden_act"), "palmcore's MLP is SwiGLU")

    def integer(field, default=None):
        value = fields.get(field)
        value = default if value is None else value
        if value is None:
            raise ValueError(f"{where}: the field {field} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refuse(field, value, "a positive integer is needed")
        return value

    def positive(field, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            refuse(field, value, "a positive number is needed")
        return float(value)

    d_model, n_heads = integer("hidden_size"), integer("num_attention_heads")
    palm = fields.get("palmcore", {}).get("config", {}) if isinstance(fields.get("palmcore"), dict) else {}
    try:
        config = PaLMConfig(
            vocab_size=integer("vocab_size"), d_model=d_model, n_layers=integer("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=integer("num_key_value_heads", n_heads),
            head_dim=integer("head_dim", d_model // n_heads), ffn_dim=integer("intermediate_size"),
            max_seq_len=integer("max_position_embeddings", 2048),
            rope_base=positive("rope_theta", rope.get("rope_theta", fields.get("rope_theta", 10000.0))),
            norm_eps=positive("layer_norm_eps", fields.get("layer_norm_eps", 1e-5)),
            **({"z_loss": palm["z_loss"]} if isinstance(palm, dict) and "z_loss" in palm else {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    scale = fields.get("logit_scale", 0.0625)
    scale = 1.0 if scale is None else positive("logit_scale", scale)
    factor = float(scale) * math.sqrt(d_model)
    return config, (1.0 if abs(factor - 1.0) <= 1e-12 else factor)


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face directory (model.safetensors, or the shards its
    model.safetensors.index.json names), as float32; F32, BF16 and F16 only."""
    index_path, single = os.path.join(path, INDEX), os.path.join(path, SINGLE)
    if os.path.exists(index_path):
        weight_map = _read_weight_map(index_path)
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        weight_map, files = None, [SINGLE]
    else:
        found = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"))]
        raise ValueError(f"{path} holds no safetensors weights (no {SINGLE} or {INDEX})"
                         + (f"; found {found[:3]}: convert them to safetensors first" if found else ""))
    tensors = {}
    for file in files:
        full = os.path.join(path, file)
        if not os.path.exists(full):
            raise ValueError(f"{index_path} names {file}, which is missing")
        for name, entry in read_header(full)[0].items():
            if entry.dtype not in ("F32", "BF16", "F16"):
                raise ValueError(f"{full}: tensor '{name}' is {entry.dtype}; palmcore imports F32, BF16 and F16 "
                                 "weights (a quantized model must be dequantized first)")
        part, _ = load_file(full)
        for name, value in part.items():
            if name in tensors:
                raise ValueError(f"{path}: tensor '{name}' appears in more than one file")
            if weight_map is not None and weight_map.get(name) != file:
                raise ValueError(f"{full} holds '{name}', which {INDEX} places in {weight_map.get(name)!r}")
            tensors[name] = value.astype(np.float32)
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise ValueError(f"{INDEX} names tensors that no file holds: {missing[:5]}")
    return tensors


def _read_weight_map(index_path: str) -> dict[str, str]:
    """{tensor name: shard file name} of a model.safetensors.index.json; ValueError naming the field."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} is damaged: weight_map must be an object of tensor names to file names, "
                         f"got {reprlib.repr(weight_map)}")
    for name, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise ValueError(f"{index_path} is damaged: weight_map[{reprlib.repr(name)}] must be a file name beside "
                             f"the index, got {reprlib.repr(file)}")
    return weight_map


def _check_hf_tensors(path: str, config: PaLMConfig, tensors: dict) -> None:
    names = name_map(config)
    expected = set(names.values())
    biases = sorted(n for n in tensors if n.endswith(".bias"))
    if biases:
        raise ValueError(f"{path}: palmcore cannot represent biases (tensor {biases[0]})")
    qk = sorted(n for n in tensors if ".q_norm." in n or ".k_norm." in n)
    if qk:
        raise ValueError(f"{path}: palmcore cannot represent use_qk_norm (tensor {qk[0]})")
    if "lm_head.weight" in tensors:
        embed = tensors.get("model.embed_tokens.weight")
        if embed is None or tensors["lm_head.weight"].shape != embed.shape or \
                not np.array_equal(tensors["lm_head.weight"], embed):
            raise ValueError(f"{path}: palmcore cannot represent an untied head (lm_head.weight differs from "
                             "model.embed_tokens.weight)")
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not match config.json (num_hidden_layers={config.n_layers}): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    V, D, F = config.vocab_size, config.d_model, config.ffn_dim
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"embed": (V, D), "norm.scale": (D,), "wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q),
              "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F)}
    for name, hf in names.items():
        want = shapes["norm.scale" if name.endswith("norm.scale") else name.rsplit(".", 1)[-1]]
        if tuple(tensors[hf].shape) != want:
            raise ValueError(f"{path}: tensor '{hf}' has shape {tuple(tensors[hf].shape)}, but config.json "
                             f"implies {want}")
        if not np.isfinite(tensors[hf]).all():
            raise ValueError(f"{path}: tensor '{hf}' holds a non-finite value")


def import_hf(path: str, out: str | None = None, tokenizer: str | None = None, optimizer: str = "adafactor",
              device: str = "cpu"):
    """(model, tokenizer) from a dense ``CohereForCausalLM`` directory in float32, bf16 or fp16
    safetensors (palmcore's own exports round-trip bit for bit). The tokenizer is the
    directory's SentencePiece ``tokenizer.model`` (or the one at ``tokenizer``); None if there
    is neither. Refuses, naming the field, what palmcore cannot represent (use_qk_norm, biases,
    sliding windows, a RoPE scaling, an untied head, sparse models). A ``logit_scale`` other than
    1/sqrt(D) is folded into ``final_norm.scale``.

    With ``out``, also writes a palmcore run folder there: ``checkpoints/step-00000000`` (weights,
    config, a fresh ``optimizer`` state, the tokenizer) and ``tokenizer.model``, so that
    ``palmcore generate --checkpoint out`` and ``palmcore train --out out --resume`` (fine-tuning)
    work on it. ``out`` must not exist or be empty; it is built aside and renamed into place."""
    from palmcore.model import PaLM  # noqa: PLC0415
    from palmcore.optim import Adafactor, AdamW  # noqa: PLC0415

    if optimizer not in ("adafactor", "adamw"):
        raise ValueError(f"optimizer must be 'adafactor' or 'adamw', got {optimizer!r}")
    fields = _read_hf_config(path)
    config, factor = config_from_hf(fields, os.path.join(path, "config.json"))
    if out is not None:
        out_abs = os.path.abspath(out)
        if os.path.exists(out_abs) and (not os.path.isdir(out_abs) or os.listdir(out_abs)):
            raise ValueError(f"{out} exists and is not an empty directory: import into a new run folder")
    tok_path = tokenizer or os.path.join(path, "tokenizer.model")
    tok = None
    if tokenizer is not None or os.path.exists(tok_path):
        tok = Tokenizer(tok_path)
        if tok.vocab_size != config.vocab_size:
            raise ValueError(f"the tokenizer {tok_path} has {tok.vocab_size} tokens but config.json's vocab_size "
                             f"is {config.vocab_size}")
    tensors = read_hf_tensors(path)
    _check_hf_tensors(path, config, tensors)
    params = from_hf_tensors(config, tensors)
    chat_template = _hf_chat_template(path) if out is not None else None
    if factor != 1.0:
        params["final_norm.scale"] = (params["final_norm.scale"].astype(np.float64) * factor).astype(np.float32)
    model = PaLM(config, seed=0, device=device)
    model.load_state_dict(params)
    if out is not None:
        opt = Adafactor(model) if optimizer == "adafactor" else AdamW(model)

        def write(tmp: str) -> None:
            trainer = {"step": 0, "data_step": 0, "loss_avg": None, "skipped": [], "settings": {},
                       "imported_from": os.path.abspath(path)}
            tok_copy = None
            if tok is not None:
                tok_copy = os.path.join(tmp, "tokenizer.model")
                shutil.copyfile(tok.model_path, tok_copy)
            checkpoint.save(os.path.join(tmp, "checkpoints"), model, opt, trainer, step=0, keep=1,
                            tokenizer_path=tok_copy)
            if chat_template is not None:
                with open(os.path.join(tmp, RUN_TEMPLATE), "w", encoding="utf-8") as f:
                    f.write(chat_template)

        _write_directory(out, write, overwrite=True)  # (an empty out only: checked above)
        if tok is not None:
            tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    return model, tok


def _hf_chat_template(path: str) -> str | None:
    """The chat template a Hugging Face directory holds (chat_template.jinja, or tokenizer_config.json's
    chat_template: a string, or the one named "default" of a list), verbatim; None if it has none."""
    jinja = os.path.join(path, RUN_TEMPLATE)
    if os.path.lexists(jinja):
        return ChatTemplate.from_file(jinja).source
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.lexists(config_path):
        return None
    if not os.path.isfile(config_path) or os.path.getsize(config_path) > 64 * MAX_TEMPLATE_BYTES:
        raise ValueError(f"{config_path} is not a regular file of at most {64 * MAX_TEMPLATE_BYTES} bytes")
    try:
        with open(config_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (ValueError, RecursionError, AttributeError) as e:
        raise ValueError(f"{config_path} is damaged: not a JSON object ({type(e).__name__})") from None
    if isinstance(template, list):  # transformers' named templates
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config_path}: chat_template must be a string or a list of named templates")
    return template


def finetune_command(config: PaLMConfig, out: str) -> str:
    """The ``palmcore train`` command that resumes (fine-tunes) an imported run: the config
    fields as ``--set`` (train rebuilds the config from a preset and checks it against the
    checkpoint's)."""
    import shlex  # noqa: PLC0415

    seed = PaLMConfig.preset("seed").to_dict()
    sets = [f"--set {k}={json.dumps(v)}" for k, v in config.to_dict().items()
            if k == "max_seq_len" or (k != "vocab_size" and v != seed.get(k))]
    return (f"palmcore train --out {shlex.quote(out)} --resume --corpus YOUR_FILES --seq-len "
            f"{min(256, config.max_seq_len)} " + " ".join(sets))
