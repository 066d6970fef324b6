"""Models that leave palmcore for llama.cpp: one GGUF file (PALM_SPEC.md "Interchange").

    palmcore.export_gguf(model, tokenizer, "model.gguf", dtype="q8_0")
    palmcore export --checkpoint runs/default --format gguf --out model.gguf --dtype q8_0

A dense palmcore model is llama.cpp's ``command-r`` architecture (Cohere's, as llama.cpp's loader
src/models/command-r.cpp builds it): one LayerNorm without bias (``ggml_norm``, then the scale)
feeds attention and the SwiGLU MLP, whose outputs are both added to the residual (the parallel
block); RoPE rotates neighbouring pairs (llama.cpp's "normal" RoPE, which is Hugging Face Cohere's
interleaved one); attention is scaled by 1/sqrt(dh) over ``head_count_kv`` key/value heads; the
output head is ``token_embd`` itself (the file holds no ``output.weight``); the logits are
multiplied by ``logit_scale`` = 1/sqrt(D). So the tensors are the Hugging Face export's
(:func:`palmcore.interchange.to_hf_tensors`: [out, in], and inside each head the columns of q
and k reordered from rotate-half to neighbouring pairs) under llama.cpp's names; GGUF lists
dimensions in the reverse of NumPy's order, so an [out, in] array is the ggml tensor {in, out}
that the loader asks for.

The same loader fixes two things palmcore leaves free, so such models are refused: q and the
attention output are [D, D] (n_heads · head_dim must be d_model), and from 64 layers on it
requires LayerNorms on q and k (Command R+), which palmcore has not.

Weights: ``f32`` (exact), ``f16`` and ``bf16`` (rounded to nearest even), or ``q8_0`` (the
``gguf`` package's quantizer, ggml's reference Q8_0: blocks of 32 along a row, each stored as
a float16 scale d = max|w| / 127 and 32 int8 values round(w / d)). The norm scales stay f32 in
every file, and a q8_0 tensor whose rows are not a multiple of 32 long is f16, as llama.cpp's
own converter does.

The vocabulary is the SentencePiece model's, as llama.cpp's "llama" (SPM) tokenizer reads it:
every piece with its score and type (normal, control, unknown, and byte for the 256 ``<0xNN>``
fallback pieces); ``add_space_prefix`` false (palmcore adds no dummy prefix); BOS ``</s>`` (1),
added before every text, as palmcore feeds prompts; EOS ``</s>``, unk 2, pad 0. That tokenizer
merges the neighbouring pair whose piece scores highest, as SentencePiece's BPE does, and falls
back to bytes likewise, so it gives palmcore's ids, except for text holding U+2581 or U+E000
(palmcore escapes them, llama.cpp reads U+2581 as a space) and text spelling a control or byte
piece (``</s>``, ``<s>``, ``<0x41>``): llama.cpp's tools read those as the token, palmcore as
characters. The chat template is the run's, else palmcore serve's default, and the sampling
defaults are ``palmcore generate``'s, in its order (temperature before top-k and top-p).
"""

from __future__ import annotations

import math
import os

import numpy as np

from palmcore.chat import DEFAULT_TEMPLATE
from palmcore.config import PaLMConfig
from palmcore.files import publish_file
from palmcore.interchange import SAMPLING, load_for_export, refuse_out_overlapping, refuse_sparse, source_of, \
    to_hf_tensors
from palmcore.tokenizer import EOD_ID, PAD_ID, UNK_ID, Tokenizer

ARCH = "command-r"
DTYPES = ("f32", "f16", "bf16", "q8_0")
_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16"}
MAX_LAYERS = 63  # command-r requires LayerNorms on q and k from 64 layers on
F16_MAX = 65504.0
# palmcore generate's sampler (PALM_SPEC "Sampling"): temperature, then top-k, then top-p
SAMPLING_SEQUENCE = "temperature;top_k;top_p"
_LAYER_TENSORS = {"input_layernorm": "ATTN_NORM", "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
                  "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT", "mlp.gate_proj": "FFN_GATE",
                  "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN"}


def _gguf():
    try:
        import gguf  # noqa: PLC0415
    except ImportError:
        raise ValueError("the GGUF export needs the gguf package (ggml's own writer, NumPy only): "
                         "pip install 'palmcore[gguf]' (or pip install gguf)") from None
    return gguf


def check_dtype(dtype: str) -> str:
    """``dtype`` as one of :data:`DTYPES` (float32, fp32, float16, fp16 and bfloat16 are taken too)."""
    name = _ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} for a GGUF export, got {dtype!r}")
    return name


def check_shape(config: PaLMConfig) -> None:
    """ValueError for a shape llama.cpp's command-r loader cannot hold (see the module's docstring)."""
    refuse_sparse(config, "this model", "gguf")
    if config.n_heads * config.head_dim != config.d_model:
        raise ValueError(f"n_heads * head_dim = {config.n_heads} * {config.head_dim} = "
                         f"{config.n_heads * config.head_dim} is not d_model ({config.d_model}): llama.cpp's "
                         "command-r architecture makes q and the attention output [d_model, d_model], so this "
                         "model does not export to GGUF (the Hugging Face export holds it)")
    if config.n_layers > MAX_LAYERS:
        raise ValueError(f"n_layers = {config.n_layers}: llama.cpp's command-r architecture requires LayerNorms on "
                         f"q and k from 64 layers on, which palmcore has not, so models of more than {MAX_LAYERS} "
                         "layers do not export to GGUF (the Hugging Face export holds them)")


def gguf_names(config: PaLMConfig) -> dict[str, str]:
    """{Hugging Face tensor name: GGUF tensor name}, llama.cpp's command-r names as the gguf
    package spells them."""
    gguf = _gguf()
    name = gguf.TENSOR_NAMES
    tensor = gguf.MODEL_TENSOR
    names = {"model.embed_tokens.weight": name[tensor.TOKEN_EMBD] + ".weight"}
    for i in range(config.n_layers):
        for hf, kind in _LAYER_TENSORS.items():
            names[f"model.layers.{i}.{hf}.weight"] = name[tensor[kind]].format(bid=i) + ".weight"
    names["model.norm.weight"] = name[tensor.OUTPUT_NORM] + ".weight"
    return names


def gguf_tensors(config: PaLMConfig, params: dict[str, np.ndarray], dtype: str) -> list[tuple[str, np.ndarray, object]]:
    """[(GGUF name, data, ggml type)] of palmcore parameters: the Hugging Face export's tensors
    (transposed, q and k reordered) as ``dtype``, norm scales in f32."""
    gguf = _gguf()
    kind = gguf.GGMLQuantizationType
    names, out = gguf_names(config), []
    for hf, value in to_hf_tensors(config, params).items():
        name = names[hf]
        if value.ndim == 1 or dtype == "f32":
            qtype = kind.F32
        elif dtype == "q8_0" and value.shape[-1] % gguf.GGML_QUANT_SIZES[kind.Q8_0][0] == 0:
            qtype = kind.Q8_0
        else:
            qtype = kind.BF16 if dtype == "bf16" else kind.F16
        if qtype in (kind.F16, kind.Q8_0) and np.abs(value).max() > F16_MAX:
            raise ValueError(f"tensor {name} holds values beyond float16's range (|w| > {F16_MAX:g}), which "
                             f"{dtype} stores in float16: export it as bf16 or f32")
        out.append((name, gguf.quants.quantize(value, qtype), qtype))
    return out


def vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, GGUF token types) of the SentencePiece model, by id; ValueError if it
    lacks any of the 256 byte pieces that llama.cpp's SPM tokenizer falls back to."""
    token_type = _gguf().TokenType
    sp = tokenizer._sp
    pieces, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        pieces.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(token_type.UNKNOWN if sp.IsUnknown(i) else token_type.CONTROL if sp.IsControl(i) else
                     token_type.BYTE if sp.IsByte(i) else token_type.UNUSED if sp.IsUnused(i) else token_type.NORMAL)
    byte_pieces = {p for p, t in zip(pieces, types) if t == token_type.BYTE}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in byte_pieces]
    if missing:
        raise ValueError(f"{tokenizer.model_path} lacks the byte-fallback pieces {missing[:3]} (of {len(missing)}): "
                         "llama.cpp's SentencePiece tokenizer needs all 256 <0xNN> pieces to encode what its "
                         "vocabulary does not hold")
    return pieces, scores, types


def _write(path: str, config: PaLMConfig, dtype: str, tensors, vocab, chat_template: str) -> None:
    gguf = _gguf()
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w = gguf.GGUFWriter(path, ARCH)
    w.add_file_type(file_types[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)  # every dimension of a head rotates
    w.add_rope_freq_base(config.rope_base)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_layer_norm_eps(config.norm_eps)
    w.add_logit_scale(1.0 / math.sqrt(config.d_model))
    pieces, scores, types = vocab
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(EOD_ID)  # palmcore feeds </s> (end of document) before a prompt
    w.add_eos_token_id(EOD_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(chat_template)
    w.add_sampling_sequence(SAMPLING_SEQUENCE)
    w.add_sampling_temp(SAMPLING["temperature"])
    w.add_sampling_top_k(SAMPLING["top_k"])
    w.add_sampling_top_p(SAMPLING["top_p"])
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(model, tokenizer, out: str, dtype: str = "f32", overwrite: bool = False,
                chat_template: str | None = None) -> str:
    """Write ``model`` (a palmcore.PaLM) and ``tokenizer`` (its palmcore.Tokenizer: a GGUF always
    holds its vocabulary) to the file ``out`` as llama.cpp's ``command-r`` architecture (the
    module's docstring says how). ``dtype``: "f32" (exact), "f16", "bf16" or "q8_0". The file is
    written beside ``out`` under a hidden name and renamed into place. Refused: an existing ``out``
    unless ``overwrite``, a directory, an ``out`` that is, contains or lies inside the
    tokenizer's run, mixture-of-experts models and shapes command-r cannot hold
    (:func:`check_shape`). ``chat_template``: the Jinja source stored as
    ``tokenizer.chat_template`` (None: palmcore.chat's default). Returns ``out``."""
    from palmcore.model import PaLM  # noqa: PLC0415

    if not isinstance(model, PaLM):
        raise TypeError(f"model must be a palmcore.PaLM, got {type(model).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a palmcore.Tokenizer (a GGUF file holds its vocabulary), got "
                        f"{type(tokenizer).__name__}")
    dtype = check_dtype(dtype)
    config = model.config
    check_shape(config)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    refuse_out_overlapping(out, *source_of(tokenizer.model_path))
    path = os.path.abspath(out)
    if os.path.isdir(path):
        raise ValueError(f"{out} is a directory: the GGUF export writes one file (name it, e.g. {out}/model.gguf)")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{out} exists (overwrite=True / --force replaces it)")
    vocab = vocabulary(tokenizer)
    tensors = gguf_tensors(config, model.state_dict(), dtype)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    publish_file(path, lambda tmp: _write(tmp, config, dtype, tensors, vocab, chat_template or DEFAULT_TEMPLATE))
    return out


def export_checkpoint_gguf(path: str, out: str, dtype: str = "f32", overwrite: bool = False) -> str:
    """:func:`export_gguf` of a palmcore checkpoint (a run folder, its checkpoints folder or one
    checkpoint) with its tokenizer.model and its run's chat template. An ``out`` that is,
    contains or lies inside the run (symlinks resolved) is refused, and so is a checkpoint
    without a tokenizer."""
    model, tokenizer, template = load_for_export(path, out, "gguf")
    if tokenizer is None:
        raise ValueError(f"{path} holds no tokenizer.model: a GGUF file holds the vocabulary, so the GGUF export "
                         "needs the checkpoint's tokenizer")
    return export_gguf(model, tokenizer, out, dtype, overwrite, template)
