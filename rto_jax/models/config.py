"""Model configuration shared by every architecture, and its mapping to/from HF `config.json`.

`from_hf_config` accepts only configs whose forward pass our decoders compute exactly: every field
that changes the forward pass is either implemented, known to be harmless, or a `ModelError` naming
the field and the source file (see `_FIELDS_CHECKED` below for the list and the reasons).
`check_supported` adds the checks that depend on the sequence length a run will use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rto_jax.errors import ModelError
from rto_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from rto_jax.models.lora import LoraConfig

ARCHITECTURES = ("llama", "gpt_neox")
# HF `model_type`s that our Llama-family decoder implements exactly.
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = LLAMA_MODEL_TYPES + ("gpt_neox",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The HF `hidden_act` names (transformers.activations.ACT2FN) of exactly the function each block computes:
# SwiGLU with SiLU ('swish' is the same torch.nn.SiLU), GPT-NeoX's MLP with the exact erf GELU
# (`jax.nn.gelu(approximate=False)`; 'gelu_python' is the same formula). The tanh/sigmoid approximations
# 'gelu_new', 'gelu_fast', 'gelu_pytorch_tanh', 'quick_gelu' differ by up to ~1e-3 per unit: errors.
SUPPORTED_ACTIVATIONS = {"llama": ("silu", "swish"), "gpt_neox": ("gelu", "gelu_python")}
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

# transformers' class defaults (transformers 5.x configuration_*.py) of the fields that change the forward
# pass, used when config.json leaves a field out, as transformers itself does.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "attention_bias": False},
    "mistral": {
        "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    },
    "qwen2": {
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "num_key_value_heads": 32,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "gpt_neox": {
        "hidden_act": "gelu",
        "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000.0,
        "attention_bias": True,
        "use_parallel_residual": True,
    },
}

# Fields of other model families that change the forward pass when set; none is implemented. Each maps to
# the values that mean "off". transformers' Llama/Mistral/Qwen2/GPT-NeoX classes ignore most of them, but a
# config that sets one describes a model other than the one we would compute.
_UNIMPLEMENTED_FEATURES: dict[str, tuple[Any, ...]] = {
    "mlp_bias": (None, False),  # biases on gate/up/down projections
    "attn_logit_softcapping": (None,),  # Gemma-2 style tanh capping of attention logits
    "final_logit_softcapping": (None,),  # ... and of the output logits
    "query_pre_attn_scalar": (None,),  # attention scale other than 1/sqrt(head_dim)
    "qk_norm": (None, False),  # norms on queries and keys (OLMo-2, Qwen3, ...)
    "use_qk_norm": (None, False),
    "qk_layernorm": (None, False),
    "num_local_experts": (None, 0, 1),  # mixture of experts
    "num_experts": (None, 0, 1),
    "is_causal": (None, True),  # bidirectional attention
    "quantization_config": (None, {}),  # packed (bitsandbytes/GPTQ/AWQ) weights
}

# Every field of transformers' LlamaConfig, MistralConfig, Qwen2Config and GPTNeoXConfig (5.x) that the
# forward pass reads, and what we do with it. Documentation for readers and for the tests.
_FIELDS_CHECKED = {
    "vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads": "implemented",
    "num_key_value_heads, head_dim": "implemented (Llama family; GPT-NeoX head_dim must be hidden/heads)",
    "rms_norm_eps, layer_norm_eps, tie_word_embeddings, use_parallel_residual": "implemented",
    "attention_bias": "implemented (Llama: q/k/v/o biases; Qwen2: always q/k/v; GPT-NeoX: all)",
    "hidden_act": "implemented for the exact function only (SUPPORTED_ACTIVATIONS), else error",
    "rope_parameters / rope_scaling, rope_theta, rotary_emb_base": "default, linear, llama3 implemented; "
    "dynamic, yarn, longrope, proportional and per-layer-type RoPE are errors",
    "partial_rotary_factor / rotary_pct": "implemented for GPT-NeoX; error != 1 for the Llama family "
    "(transformers' Llama rotates the whole head by default)",
    "sliding_window, use_sliding_window, max_window_layers, layer_types": "our attention is full: exact while "
    "the sequence is no longer than the window; check_supported raises when the run's sequences are longer",
    "max_position_embeddings": "check_supported raises when the run's sequences are longer",
    "mlp_bias, soft-capping, qk-norm, query_pre_attn_scalar, experts, is_causal=False, quantization_config": "error",
    "attention_dropout, hidden_dropout, classifier_dropout": "harmless: dropout is off at evaluation and our "
    "decoders never apply it",
    "initializer_range, use_cache, pretraining_tp, torch_dtype/dtype, is_decoder": "harmless (init, caching, "
    "storage or a numerically equivalent matmul split)",
    "num_labels (sequence classification)": "must be 1 (one scalar head), else error",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder. Hashable, so it can sit in jit's static arguments."""

    arch: str = "llama"  # "llama" (Llama 3, SmolLM2, Qwen2, Mistral) or "gpt_neox" (Pythia).
    model_type: str = "llama"  # HF model_type written back on export.
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3".
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling only.
    rope_high_freq_factor: float = 4.0  # llama3 scaling only.
    rope_original_max_position: int = 8192  # llama3 scaling only.
    rotary_fraction: float = 1.0  # GPT-NeoX rotary_pct: the share of head_dim that is rotated.
    attention_bias: bool = False  # q/k/v biases (Qwen2, Llama with attention_bias; always on for GPT-NeoX).
    attention_out_bias: bool = False  # o_proj bias (HF Llama's attention_bias covers it; Qwen2 has none).
    tie_word_embeddings: bool = False
    use_parallel_residual: bool = True  # GPT-NeoX only.
    # The source checkpoint's attention window (None: full attention). Our attention is always full, which
    # equals windowed attention for sequences no longer than the window: `check_supported` enforces that.
    # Not exported: an export describes what our model computes (full attention).
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Execution switches, not part of the checkpoint.
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; params stay float32.
    scan_layers: bool = False  # stack layers and lax.scan over them (flat compile time in depth).
    remat: str = "none"  # rematerialization per block: "none", "full" or "dots".
    # Attention implementation (rto_jax.models.attention): "auto", "xla", "blockwise", "cudnn" or "splash".
    attention: str = "auto"
    # Low-rank adapters on the projections (rto_jax.models.lora); None: none. Not part of the base checkpoint:
    # adapters are exported in PEFT's format, or merged.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch={self.arch!r}: expected one of {ARCHITECTURES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: supported are {SUPPORTED_ROPE_TYPES}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"ModelConfig.remat={self.remat!r}: expected 'none', 'full' or 'dots'")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
        if self.lora is not None:
            self.lora.target_names(self.arch)  # raises on a projection this architecture does not have

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)


def _default(hf: dict[str, Any], key: str):
    """`hf[key]`, or transformers' class default for this model_type when config.json leaves it out."""
    if key in hf:
        return hf[key]
    return _HF_DEFAULTS.get(hf.get("model_type"), {}).get(key)


def _required(hf: dict[str, Any], key: str, source: str):
    if hf.get(key) is None:
        raise ModelError(f"{source}: field {key!r} is missing")
    return hf[key]


def _rope_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Reads RoPE settings from the legacy `rope_scaling` or the v5 `rope_parameters` dict (transformers gives
    `rope_scaling` precedence) and the legacy top-level keys."""
    raw = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if not isinstance(raw, dict):
        raise ModelError(f"{source}: {key}={raw!r} is not a dict")
    if any(isinstance(v, dict) for v in raw.values()):
        raise ModelError(f"{source}: {key} with one RoPE per layer type ({sorted(raw)}) is not supported")
    params = dict(raw)
    theta = params.get("rope_theta", hf.get("rope_theta", _default(hf, "rotary_emb_base") or 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{source}: {key}.rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    fields = {"rope_theta": float(theta), "rope_type": rope_type, "rope_factor": 1.0}
    if rope_type != "default":
        if params.get("factor") is None:
            raise ModelError(f"{source}: {key}.factor is missing (rope_type {rope_type!r})")
        fields["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            if params.get(name) is None:
                raise ModelError(f"{source}: {key}.{name} is missing (rope_type 'llama3')")
        original = params.get("original_max_position_embeddings", _default(hf, "max_position_embeddings"))
        fields.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position=int(original),
        )
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", _default(hf, "rotary_pct")))
    fields["rotary_fraction"] = 1.0 if fraction is None else float(fraction)
    return fields


def _single_id(value):
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _sliding_window(hf: dict[str, Any], model_type: str, num_layers: int, source: str) -> int | None:
    """The attention window transformers would apply to some layer of this model (None: full attention)."""
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        unknown = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
        if unknown:
            raise ModelError(f"{source}: layer_types has {unknown}, not implemented (only full attention)")
    window = _default(hf, "sliding_window")
    if model_type == "mistral":
        # MistralModel windows every layer whenever sliding_window is set; it has no switch and ignores
        # use_sliding_window / layer_types.
        return None if window is None else int(window)
    if model_type == "qwen2":
        if not _default(hf, "use_sliding_window"):
            if layer_types is not None and "sliding_attention" in layer_types:
                raise ModelError(
                    f"{source}: layer_types has 'sliding_attention' layers but use_sliding_window is false "
                    "(transformers cannot run this config either)"
                )
            return None
        if layer_types is not None:
            windowed = "sliding_attention" in layer_types
        else:  # Qwen2Config: layers from max_window_layers on are windowed
            windowed = num_layers > int(_default(hf, "max_window_layers"))
        return int(window) if windowed and window is not None else None
    # Llama and GPT-NeoX have no sliding window in transformers; a config that sets one anyway describes a
    # windowed model, so we take it at its word (unless it switches the window off).
    if window is None or hf.get("use_sliding_window") is False:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _feature_problems(hf: dict[str, Any]) -> list[str]:
    problems = []
    for key, off in _UNIMPLEMENTED_FEATURES.items():
        if key in hf and not any(hf[key] is o or hf[key] == o for o in off):
            problems.append(f"{key}={hf[key]!r} is not implemented")
    return problems


def from_hf_config(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """Builds a ModelConfig from a HF config dict. `source` names the file in error messages.

    Raises ModelError (naming `source` and the field) for any field value our decoders do not compute
    exactly. The checks that depend on a run's sequence length are `check_supported`'s.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{source}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    arch = "gpt_neox" if model_type == "gpt_neox" else "llama"
    problems = _feature_problems(hf)
    act = _default(hf, "hidden_act")
    if act not in SUPPORTED_ACTIVATIONS[arch]:
        problems.append(
            f"hidden_act={act!r} is not implemented for {model_type} (implemented: {SUPPORTED_ACTIVATIONS[arch]})"
        )
    architectures = hf.get("architectures") or [""]
    if architectures[0].endswith("ForSequenceClassification"):
        labels = hf.get("num_labels", len(hf.get("id2label") or {0: ""}))
        if labels != 1:
            problems.append(f"num_labels={labels} is not supported (our scalar head has one output)")
    if problems:
        raise ModelError(f"{source}: " + "; ".join(problems))

    num_heads = int(_required(hf, "num_attention_heads", source))
    hidden = int(_required(hf, "hidden_size", source))
    num_layers = int(_required(hf, "num_hidden_layers", source))
    rope = _rope_fields(hf, source)
    common = dict(
        model_type=model_type,
        vocab_size=int(_required(hf, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_required(hf, "intermediate_size", source)),
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=int(_default(hf, "max_position_embeddings")),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window(hf, model_type, num_layers, source),
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
        pad_token_id=_single_id(hf.get("pad_token_id")),
        **rope,
    )
    if arch == "llama":
        if rope["rotary_fraction"] != 1.0:
            raise ModelError(
                f"{source}: partial_rotary_factor={rope['rotary_fraction']} is not supported for {model_type} "
                "(transformers' Llama-family RoPE rotates the whole head)"
            )
        num_kv = _default(hf, "num_key_value_heads")
        cfg = {
            "arch": "llama",
            "num_kv_heads": int(num_kv if num_kv is not None else num_heads),
            "head_dim": int(hf.get("head_dim") or hidden // num_heads),
            "norm_eps": float(_default(hf, "rms_norm_eps")),
            # Qwen2 always has q/k/v biases and no o_proj bias; HF Llama's attention_bias sets all four.
            # (MistralModel has no biases; its config has no attention_bias.)
            "attention_bias": True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            "attention_out_bias": False if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        }
        if model_type == "mistral" and hf.get("attention_bias"):
            raise ModelError(f"{source}: attention_bias=True is not supported for mistral (MistralModel has none)")
    else:
        if hidden % num_heads or (hf.get("head_dim") is not None and int(hf["head_dim"]) != hidden // num_heads):
            raise ModelError(
                f"{source}: GPT-NeoX needs hidden_size={hidden} = num_attention_heads={num_heads} x head_dim"
                + (f" (head_dim={hf['head_dim']})" if hf.get("head_dim") is not None else "")
            )
        cfg = {
            "arch": "gpt_neox",
            "num_kv_heads": num_heads,
            "head_dim": hidden // num_heads,
            "norm_eps": float(_default(hf, "layer_norm_eps")),
            "attention_bias": bool(_default(hf, "attention_bias")),
            "use_parallel_residual": bool(_default(hf, "use_parallel_residual")),
        }
    try:
        return ModelConfig(**{**common, **cfg, **overrides})
    except ValueError as e:
        raise ModelError(f"{source}: {e}") from e


def check_supported(
    cfg_or_hf: ModelConfig | dict[str, Any], max_sequence_len: int | None, source: str = "config.json"
) -> ModelConfig:
    """The ModelConfig of `cfg_or_hf` (a ModelConfig or an HF config dict), after every check of
    `from_hf_config` and those that depend on the longest sequence (prompt + response, padding included)
    the run will feed the model: a sliding attention window shorter than that (ours is full attention), or
    `max_position_embeddings` shorter than that. Raises ModelError naming `source` and the field.
    """
    cfg = from_hf_config(cfg_or_hf, source) if isinstance(cfg_or_hf, dict) else cfg_or_hf
    if max_sequence_len is None:
        return cfg
    n = int(max_sequence_len)
    if cfg.sliding_window is not None and cfg.sliding_window < n:
        switch = " (with use_sliding_window=true)" if cfg.model_type == "qwen2" else ""
        raise ModelError(
            f"{source}: sliding_window={cfg.sliding_window}{switch} is shorter than the sequences of this run "
            f"(up to {n} tokens); sliding-window attention is not implemented (ours is full attention, exact only "
            f"up to the window)"
        )
    if cfg.max_position_embeddings < n:
        raise ModelError(
            f"{source}: max_position_embeddings={cfg.max_position_embeddings} is shorter than the sequences of this "
            f"run (up to {n} tokens)"
        )
    return cfg


def to_hf_config(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """The HF config dict for `cfg`; `architecture` is e.g. 'LlamaForCausalLM'."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
    }
    if cfg.arch == "llama":
        hf.update(
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.norm_eps,
            attention_bias=cfg.attention_bias,
            hidden_act="silu",
            mlp_bias=False,
        )
        if cfg.model_type == "qwen2":
            hf.pop("attention_bias")  # Qwen2 always has q/k/v biases.
            hf["use_sliding_window"] = False  # our attention is full (see ModelConfig.sliding_window)
        if cfg.model_type == "mistral":
            hf["sliding_window"] = None  # MistralConfig's default is a 4096 window; ours is full attention
    else:
        rope["partial_rotary_factor"] = cfg.rotary_fraction
        hf.update(
            layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.use_parallel_residual,
            hidden_act="gelu",
            rotary_pct=cfg.rotary_fraction,
            rotary_emb_base=cfg.rope_theta,
            attention_bias=cfg.attention_bias,
        )
    return hf
