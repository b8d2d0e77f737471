"""Model configuration shared by every architecture, and its mapping to/from HF `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = ("llama", "gpt_neox")
# HF `model_type`s that our Llama-family decoder implements exactly.
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Execution switches, not part of the checkpoint.
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; params stay float32.
    scan_layers: bool = False  # stack layers and lax.scan over them (flat compile time in depth).
    remat: str = "none"  # rematerialization per block: "none", "full" or "dots".

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

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)


def _rope_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Reads RoPE settings from either the v5 `rope_parameters` dict or the legacy top-level keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    fields = dict(rope_theta=float(theta), rope_type=rope_type, rope_factor=float(params.get("factor", 1.0)))
    if rope_type == "llama3":
        fields.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position=int(params["original_max_position_embeddings"]),
        )
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct")))
    if fraction is not None:
        fields["rotary_fraction"] = float(fraction)
    return fields


def _single_id(value):
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """Builds a ModelConfig from a HF config dict. `source` names the file in error messages."""
    model_type = hf.get("model_type")
    common = dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
        pad_token_id=_single_id(hf.get("pad_token_id")),
        **_rope_fields(hf, source),
    )
    if model_type in LLAMA_MODEL_TYPES:
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=True is not supported")
        # Mistral's sliding window is not implemented: attention is full, which is exact for sequences
        # no longer than the window (4096 tokens in Mistral 7B v0.1), far beyond RLHF lengths.
        cfg = dict(
            arch="llama",
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            # Qwen2 always has q/k/v biases and no o_proj bias; HF Llama's attention_bias sets all four.
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            attention_out_bias=False if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        )
    elif model_type == "gpt_neox":
        cfg = dict(
            arch="gpt_neox",
            num_kv_heads=int(hf["num_attention_heads"]),
            head_dim=int(hf["hidden_size"]) // int(hf["num_attention_heads"]),
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            attention_bias=bool(hf.get("attention_bias", True)),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
        )
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: GPT-NeoX hidden_act={hf.get('hidden_act')!r} is not supported (only 'gelu')")
    else:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; supported: {LLAMA_MODEL_TYPES + ('gpt_neox',)}"
        )
    common.setdefault("rotary_fraction", 1.0)
    return ModelConfig(**{**common, **cfg, **overrides})


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
