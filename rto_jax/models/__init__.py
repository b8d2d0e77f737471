"""Flax NNX decoders (Llama family, GPT-NeoX), scalar heads, and HF/GGUF weight import and export."""

from rto_jax.models import lora
from rto_jax.models.config import ModelConfig, check_supported, from_hf_config, to_hf_config
from rto_jax.models.hf_io import hf_state_dict, inspect_model_source, load_pretrained, load_tokenizer, save_pretrained
from rto_jax.models.lora import LoraConfig
from rto_jax.models.transformer import (
    CausalLM,
    Decoder,
    ScalarHeadModel,
    default_positions,
    merge_adapters,
    with_adapters,
)

__all__ = [
    "CausalLM",
    "Decoder",
    "LoraConfig",
    "ModelConfig",
    "ScalarHeadModel",
    "check_supported",
    "default_positions",
    "from_hf_config",
    "hf_state_dict",
    "inspect_model_source",
    "load_pretrained",
    "load_tokenizer",
    "lora",
    "merge_adapters",
    "save_pretrained",
    "to_hf_config",
    "with_adapters",
]
