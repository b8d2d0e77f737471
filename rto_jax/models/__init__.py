"""Flax NNX decoders (Llama family, GPT-NeoX), scalar heads, and HF/GGUF weight import and export."""

from rto_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from rto_jax.models.hf_io import hf_state_dict, load_pretrained, load_tokenizer, save_pretrained
from rto_jax.models.transformer import CausalLM, Decoder, ScalarHeadModel, default_positions

__all__ = [
    "ModelConfig",
    "from_hf_config",
    "to_hf_config",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "hf_state_dict",
    "CausalLM",
    "Decoder",
    "ScalarHeadModel",
    "default_positions",
]
