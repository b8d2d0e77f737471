"""Import a llama.cpp GGUF checkpoint into HF-format config, float32 tensors and a tokenizer.

HF parameter names and layouts are our import/export format (see CONTRACT.md), so this module
turns a GGUF file into exactly what an HF ``safetensors`` checkpoint would give us:

    hf_config, tensors, tokenizer = read_gguf(path)

* ``hf_config``: a transformers-style config dict (``model_type``, ``architectures``,
  ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``,
  ``rope_theta``, ``rope_scaling`` (only if the file has one), ``max_position_embeddings``,
  ``tie_word_embeddings``, ``bos/eos/pad_token_id``, ``attention_bias``, ``qkv_bias``).
  ``transformers.LlamaConfig(**hf_config)`` accepts it for ``model_type == "llama"``.
  ``attention_bias`` has HF Llama's meaning (q, k, v *and* o projections carry a bias);
  ``qkv_bias`` says whether q/k/v carry one (True for Qwen2, whose o_proj has none).
* ``tensors``: ``{hf_name: np.float32 array}`` in HF layout (``nn.Linear`` weights are
  ``[out_features, in_features]``), e.g. ``model.embed_tokens.weight [V, D]``,
  ``model.layers.{i}.self_attn.q_proj.weight [H*hd, D]``, ``model.norm.weight [D]``;
  ``lm_head.weight`` only when the file has an untied ``output.weight``.
* ``tokenizer``: a ``transformers.PreTrainedTokenizerFast`` over a ``tokenizers`` byte-level BPE
  rebuilt from ``tokenizer.ggml.*`` (ids identical to the GGUF vocabulary), with the file's
  ``tokenizer.chat_template``.

Supported architectures: ``llama`` (also used by SmolLM2 / Mistral GGUFs) and ``qwen2``. Anything
in the file that changes the forward pass and that our decoders do not implement is a ``ModelError``
naming the file and the metadata key (or tensor): RoPE scaling other than linear, llama.cpp's
``rope_freqs`` per-frequency scaling (Llama 3.x), soft-capping, experts, non-causal attention,
attention/logit/embedding/residual scales, extra tensors (qk-norm, MLP biases, ...). A sliding window
(``{arch}.attention.sliding_window``) becomes ``sliding_window`` in the config, which
``rto_jax.models.config.check_supported`` compares with the run's sequence length.

Details worth knowing:

* GGUF stores tensor dims in ggml ``ne`` order (fastest-varying first), i.e. reversed w.r.t.
  numpy. ``gguf.quants.dequantize`` returns the numpy (row-major) view, so a linear weight with
  ``ne = [in, out]`` comes back as ``[out, in]`` -- already the HF layout; we check every shape
  against the one the config implies.
* llama.cpp's HF->GGUF converter (``LlamaModel.permute``) reorders the rows of ``q_proj`` /
  ``k_proj`` (weights and biases) of ``llama`` models from HF's "rotate_half" layout (per head: the
  first half of the head dims, then the second half) to GPT-J's interleaved pair layout. Its
  forward map is ``w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)``; we apply the inverse,
  ``w.reshape(n_head, hd // 2, 2, ...).swapaxes(1, 2)``, using ``num_attention_heads`` for q and
  ``num_key_value_heads`` for k. Qwen2 GGUFs are written unpermuted (llama.cpp uses NeoX-style
  rope for them), so nothing is undone there.
* Pad token: when the file has no pad id, or pad id == eos id (SmolLM2's case: both are 2),
  ``hf_config["pad_token_id"]`` is ``None`` and the tokenizer's ``pad_token`` is left unset. The
  data pipeline requires pad != eos (CONTRACT.md) and picks its own pad id.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from rto_jax.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "read_gguf",
    "read_gguf_config",
    "read_gguf_metadata",
    "read_gguf_tensors",
    "read_gguf_tokenizer",
    "unpermute_rotary_rows",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_HF_ARCH = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}

# ggml token types (llama.cpp `llama_token_type`).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------


def _open(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # any reader failure: re-raised with the file name
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field_value(field) -> Any:
    """Python value of a GGUFReader field (string, number, bool or list of those)."""
    if hasattr(field, "contents"):
        return field.contents()
    # Fallback for old `gguf` versions without ReaderField.contents().
    import gguf

    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def read_gguf_metadata(path: str | os.PathLike, reader=None) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values."""
    reader = reader if reader is not None else _open(path)
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _architecture(path, meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _require(path, meta, key):
    if key not in meta:
        raise ModelError(f"{path}: GGUF metadata key {key!r} is missing")
    return meta[key]


def read_gguf_config(path: str | os.PathLike, reader=None, tensor_names=None, meta=None) -> dict[str, Any]:
    """Transformers-style config dict from the GGUF metadata (see module docstring)."""
    reader = reader if reader is not None else _open(path)
    if meta is None:
        meta = read_gguf_metadata(path, reader)
    arch = _architecture(path, meta)
    if tensor_names is None:
        tensor_names = {t.name for t in reader.tensors}
    p = f"{arch}."

    hidden = int(_require(path, meta, p + "embedding_length"))
    n_heads = int(_require(path, meta, p + "attention.head_count"))
    n_kv = meta.get(p + "attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer head counts: not a plain llama/qwen2 model
        if len(set(n_kv)) != 1:
            raise ModelError(f"{path}: per-layer {p}attention.head_count_kv is not supported")
        n_kv = n_kv[0]
    n_kv = int(n_kv)
    head_dim = int(meta.get(p + "attention.key_length", hidden // n_heads))
    v_dim = int(meta.get(p + "attention.value_length", head_dim))
    if v_dim != head_dim:
        raise ModelError(f"{path}: key_length {head_dim} != value_length {v_dim} is not supported")

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = meta.get(p + "vocab_size")
    if vocab_size is None:
        if tokens is None:
            raise ModelError(f"{path}: cannot determine vocab size (no {p}vocab_size, no tokens)")
        vocab_size = len(tokens)

    model_type, hf_arch = _HF_ARCH[arch]
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(_require(path, meta, p + "feed_forward_length")),
        "num_hidden_layers": int(_require(path, meta, p + "block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    rot_dim = meta.get(p + "rope.dimension_count")
    if rot_dim is not None and int(rot_dim) != head_dim:
        raise ModelError(
            f"{path}: partial rotary ({p}rope.dimension_count={rot_dim}, head_dim={head_dim}) is not supported"
        )

    # RoPE scaling: linear is implemented; any other type is refused (by name of the GGUF key) here.
    stype = meta.get(p + "rope.scaling.type")
    if stype is not None and stype != "none":
        if stype != "linear":
            raise ModelError(
                f"{path}: {p}rope.scaling.type={stype!r} is not implemented (implemented: 'none', 'linear')"
            )
        factor = meta.get(p + "rope.scaling.factor")
        if factor is None:
            raise ModelError(f"{path}: {p}rope.scaling.type='linear' without {p}rope.scaling.factor")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    _check_unimplemented_metadata(path, meta, p)
    _check_rope_freqs(path, reader, tensor_names)
    _check_tensor_names(path, tensor_names)
    window = meta.get(p + "attention.sliding_window")
    if window is not None and int(window) > 0:
        # llama.cpp windows every layer of such a file; say so in transformers' terms, so that the
        # sequence-length check (rto_jax.models.config.check_supported) applies.
        cfg["sliding_window"] = int(window)
        if arch == "qwen2":
            cfg["use_sliding_window"], cfg["max_window_layers"] = True, 0

    # Biases.
    def has(name):
        return f"blk.0.{name}" in tensor_names

    qkv_bias = all(has(f"attn_{x}.bias") for x in "qkv")
    if any(has(f"attn_{x}.bias") for x in "qkv") and not qkv_bias:
        raise ModelError(f"{path}: only some of the q/k/v projections have a bias")
    o_bias = has("attn_output.bias")
    if arch == "llama":
        if o_bias != qkv_bias:
            raise ModelError(
                f"{path}: llama GGUF with bias on {'o_proj only' if o_bias else 'q/k/v only'} "
                "cannot be expressed with HF Llama's attention_bias"
            )
        cfg["attention_bias"] = qkv_bias
    else:  # qwen2: q/k/v bias, o_proj none (HF Qwen2Attention hardcodes this)
        if not qkv_bias or o_bias:
            raise ModelError(f"{path}: qwen2 GGUF must have q/k/v biases and no o_proj bias")
        cfg["attention_bias"] = False
    cfg["qkv_bias"] = qkv_bias
    cfg["mlp_bias"] = False

    # Special token ids. pad is None when absent or equal to eos (see module docstring).
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        cfg[name] = None if v is None else int(v)
    pad = meta.get("tokenizer.ggml.padding_token_id")
    cfg["pad_token_id"] = None if pad is None or pad == cfg["eos_token_id"] else int(pad)
    if arch == "qwen2":
        cfg.setdefault("use_sliding_window", False)
    return cfg


# GGUF metadata keys (llama.cpp's LLM_KV names, after the `{arch}.` prefix) of forward-pass features our
# decoders do not implement, each with the values that mean "off".
_UNIMPLEMENTED_KEYS: dict[str, tuple[Any, ...]] = {
    "attn_logit_softcapping": (0.0,),
    "final_logit_softcapping": (0.0,),
    "expert_count": (0, 1),
    "attention.causal": (True,),
    "attention.scale": (),  # an attention scale other than 1/sqrt(head_dim)
    "attention.clamp_kqv": (0.0,),
    "logit_scale": (1.0,),
    "embedding_scale": (1.0,),
    "residual_scale": (1.0,),
}


def _check_unimplemented_metadata(path, meta: dict[str, Any], prefix: str) -> None:
    for key, off in _UNIMPLEMENTED_KEYS.items():
        value = meta.get(prefix + key)
        if value is not None and value not in off:
            raise ModelError(f"{path}: {prefix}{key}={value!r} is not implemented")


def _check_rope_freqs(path, reader, tensor_names) -> None:
    """llama.cpp writes Llama-3.x RoPE scaling as per-frequency divisors (tensor `rope_freqs.weight`), not as
    metadata. They change every rotation angle (at every position), and our RoPE cannot take them: refused,
    unless they are all 1."""
    if "rope_freqs.weight" not in tensor_names:
        return
    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    values = np.asarray(_dequantize(tensor), np.float64).ravel()
    if not np.all(values == 1.0):
        raise ModelError(
            f"{path}: tensor 'rope_freqs.weight' (llama.cpp's per-frequency RoPE scaling, e.g. Llama 3.1's; values "
            f"{values.min():g}..{values.max():g}) is not implemented; load the model's HF safetensors instead"
        )


def _check_tensor_names(path, tensor_names) -> None:
    """Every tensor must be one our decoders use: an extra one (qk-norm, MLP bias, experts, post-norms)
    is a feature we do not implement."""
    unknown = sorted(n for n in tensor_names if _hf_name(n) is None and not _IGNORED.match(n))
    if unknown:
        raise ModelError(
            f"{path}: tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} belong to a feature that is "
            "not implemented (only plain llama/qwen2 blocks are)"
        )


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp may write that carry nothing we need.
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a model with this config must have."""
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, H, K = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (D,),
                p + "post_attention_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (H * hd, D),
                p + "self_attn.k_proj.weight": (K * hd, D),
                p + "self_attn.v_proj.weight": (K * hd, D),
                p + "self_attn.o_proj.weight": (D, H * hd),
                p + "mlp.gate_proj.weight": (F, D),
                p + "mlp.up_proj.weight": (F, D),
                p + "mlp.down_proj.weight": (D, F),
            }
        )
        if cfg.get("qkv_bias"):
            out[p + "self_attn.q_proj.bias"] = (H * hd,)
            out[p + "self_attn.k_proj.bias"] = (K * hd,)
            out[p + "self_attn.v_proj.bias"] = (K * hd,)
        if cfg.get("attention_bias"):
            out[p + "self_attn.o_proj.bias"] = (D,)
    return out


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF rotate_half halves).

    llama.cpp: ``w.reshape(n_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)``, i.e.
    GGUF row ``h*hd + 2*j + s`` holds HF row ``h*hd + s*hd//2 + j``. Works for weights
    ``[n_heads*hd, in]`` and biases ``[n_heads*hd]``.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
    hd = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type)
    # numpy shape = reversed ggml ne (see module docstring)
    want = tuple(int(n) for n in reversed([int(x) for x in t.shape]))
    if arr.size != int(np.prod(want)):
        raise ValueError(f"tensor {t.name}: {arr.size} elements dequantized, expected shape {want}")
    return np.array(arr.reshape(want), dtype=np.float32, copy=True)


def read_gguf_tensors(path: str | os.PathLike, cfg: dict[str, Any] | None = None, reader=None) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under HF names and layouts (see module docstring)."""
    reader = reader if reader is not None else _open(path)
    if cfg is None:
        cfg = read_gguf_config(path, reader)
    want = expected_shapes(cfg)
    permute = cfg["model_type"] == "llama"
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if _IGNORED.match(t.name):
                continue
            raise ModelError(f"{path}: unexpected GGUF tensor {t.name!r} for {cfg['model_type']}")
        if name not in want:
            raise ModelError(f"{path}: GGUF tensor {t.name!r} ({name}) does not fit the config")
        try:
            arr = _dequantize(t)
        except NotImplementedError as e:
            raise ModelError(f"{path}: tensor {t.name!r}: {e}") from e
        if arr.shape != want[name]:
            raise ModelError(
                f"{path}: tensor {t.name!r} -> {name} has shape {arr.shape}, "
                f"expected {want[name]} (ggml ne={[int(x) for x in t.shape]})"
            )
        if permute and (".q_proj." in name or ".k_proj." in name):
            n = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            arr = unpermute_rotary_rows(arr, n)
        out[name] = arr
    missing = sorted(set(want) - set(out))
    if missing:
        raise ModelError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

# Pre-tokenizer split regexes, following llama.cpp's `llama_vocab` per `tokenizer.ggml.pre`.
_GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais", "trillion", "granite-docling")
_DIGITS_THEN_GPT2_PRE = (
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {
    **{k: _LLAMA3_REGEX for k in ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral")},
    **{k: _QWEN2_REGEX for k in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
}


def _pre_tokenizer(path, pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    pre = pre or "default"
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRE:
        logger.warning("%s: unknown tokenizer.ggml.pre %r; using the GPT-2 split", path, pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def read_gguf_tokenizer(path: str | os.PathLike, reader=None, meta=None):
    """``PreTrainedTokenizerFast`` rebuilt from the GGUF vocabulary (byte-level BPE only).

    Token ids equal GGUF ids; CONTROL tokens become special added tokens, USER_DEFINED ones
    non-special added tokens. ``pad_token`` is left unset when the file has none or pad == eos.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    if meta is None:
        meta = read_gguf_metadata(path, reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = _require(path, meta, "tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    merges_raw = _require(path, meta, "tokenizer.ggml.merges")

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            logger.warning("%s: duplicate token %r at ids %d and %d", path, tok, vocab[tok], i)
            continue
        vocab[tok] = i
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ModelError(f"{path}: malformed merge {m!r}")
        merges.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(path, meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()

    special = [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def tok_str(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos, eos, unk = tok_str("bos"), tok_str("eos"), tok_str("unknown")
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    pad = None if pad_id is None or pad_id == eos_id else tok_str("padding")

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    byte_pp = processors.ByteLevel(trim_offsets=False)
    if add_bos or add_eos:
        spec = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        single = " ".join(([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else []))
        pair = " ".join(
            ([bos] if add_bos else [])
            + ["$A"]
            + ([eos] if add_eos else [])
            + ([bos] if add_bos else [])
            + ["$B:1"]
            + ([eos] if add_eos else [])
        )
        tok.post_processor = processors.Sequence(
            [
                byte_pp,
                processors.TemplateProcessing(single=single, pair=pair, special_tokens=spec),
            ]
        )
    else:
        tok.post_processor = byte_pp

    kwargs: dict[str, Any] = {}
    for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if v is not None:
            kwargs[k] = v
    if special:  # so all_special_ids / skip_special_tokens know every CONTROL token
        kwargs["additional_special_tokens"] = [t.content for t in special]
    if (tmpl := meta.get("tokenizer.chat_template")) is not None:
        kwargs["chat_template"] = tmpl
    arch = meta.get("general.architecture")
    if (ctx := meta.get(f"{arch}.context_length")) is not None:
        kwargs["model_max_length"] = int(ctx)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)


# --------------------------------------------------------------------------------------------
# all together
# --------------------------------------------------------------------------------------------


def read_gguf(path: str | os.PathLike):
    """``(hf_config, tensors, tokenizer)`` from a llama/qwen2 GGUF file (see module docstring)."""
    reader = _open(path)
    meta = read_gguf_metadata(path, reader)
    _architecture(path, meta)
    names = {t.name for t in reader.tensors}
    cfg = read_gguf_config(path, reader, tensor_names=names, meta=meta)
    tensors = read_gguf_tensors(path, cfg, reader)
    tokenizer = read_gguf_tokenizer(path, reader, meta)
    if len(tokenizer) != cfg["vocab_size"]:
        logger.warning(
            "%s: tokenizer has %d tokens, config vocab_size is %d",
            path,
            len(tokenizer),
            cfg["vocab_size"],
        )
    return cfg, tensors, tokenizer
