"""Reference models from HuggingFace transformers (PyTorch) for our parity tests.

Builds and runs transformers' own PyTorch models so tests can compare our Flax decoders, our safetensors
export and our GGUF import against them. Every function calls the installed `transformers` / `torch`;
arrays go in and come out as numpy. Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

__all__ = [
    "causal_lm_logits",
    "gguf_config_via_transformers",
    "gguf_tensors_via_transformers",
    "gguf_tokenizer_via_transformers",
    "greedy_chat_completion",
    "llama_from_tensors",
    "load_causal_lm",
    "load_sequence_classifier",
    "random_causal_lm",
    "sequence_classifier_scores",
]


# ------------------------------------------------------------------------------------------
# safetensors models (tests/test_models.py)
# ------------------------------------------------------------------------------------------


def random_causal_lm(hf_config, save_dir, *, pad_token_id=0, seed=0, auto_class=None):
    """A randomly initialised transformers PyTorch model for `hf_config`, saved to `save_dir`.

    Seeds torch with `seed`, sets `hf_config.pad_token_id`, builds `auto_class.from_config(hf_config)`
    (default `AutoModelForCausalLM`) in float32 eval mode, then adds N(0, 0.1^2) noise to every bias and
    norm weight so a dropped or transposed tensor cannot hide behind zeros/ones. Writes
    `config.json` + `model.safetensors` with `save_pretrained`, which our `load_pretrained` reads.

    Returns the torch model (the reference to compare against).
    """
    torch.manual_seed(seed)
    hf_config.pad_token_id = pad_token_id
    cls = transformers.AutoModelForCausalLM if auto_class is None else auto_class
    model = cls.from_config(hf_config).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "layernorm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(save_dir, safe_serialization=True)
    return model


def load_causal_lm(path):
    """transformers' `AutoModelForCausalLM.from_pretrained(path)` in float32 eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()


def load_sequence_classifier(path):
    """transformers' `AutoModelForSequenceClassification.from_pretrained(path)` in float32 eval mode."""
    return transformers.AutoModelForSequenceClassification.from_pretrained(path).float().eval()


def _forward(model, input_ids, attention_mask, position_ids):
    kwargs = {"input_ids": torch.tensor(np.asarray(input_ids))}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(position_ids))
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def causal_lm_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """Logits ``[B, T, V]`` (float32) of a transformers causal LM, under `torch.no_grad`.

    Args:
      model: a transformers PyTorch causal LM (e.g. from `random_causal_lm` or `load_causal_lm`).
      input_ids: ``[B, T]`` integer token ids (numpy or array-like).
      attention_mask: optional ``[B, T]`` 1 for real tokens, 0 for (left) padding.
      position_ids: optional ``[B, T]`` positions (``cumsum(mask) - 1`` for left padding).
    """
    return _forward(model, input_ids, attention_mask, position_ids)


def sequence_classifier_scores(model, input_ids) -> np.ndarray:
    """Scores ``[B]`` of a transformers sequence classifier with one label, read at each row's last token.

    `input_ids` is ``[B, T]`` without padding (transformers picks the last non-pad token).
    """
    return _forward(model, input_ids, None, None)[:, 0]


# ------------------------------------------------------------------------------------------
# GGUF (tests/test_gguf.py)
# ------------------------------------------------------------------------------------------


def gguf_config_via_transformers(path) -> dict:
    """The HF config dict that transformers' own GGUF reader derives from the file at `path`.

    Raises ImportError when this transformers has no GGUF reader.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path), return_tensors=False)["config"]


def gguf_tensors_via_transformers(path, config: dict) -> dict[str, np.ndarray]:
    """HF-named float32 tensors as transformers' GGUF reader dequantizes (and q/k un-permutes) them.

    `config` is the dict from `gguf_config_via_transformers`; transformers' weight-name map needs a
    `LlamaForCausalLM` instance, built on the meta device (its values are never used). Returns
    ``{hf_name: array}`` with the HF shapes, e.g. ``model.embed_tokens.weight`` ``[V, D]``.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
        )
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return {k: v.float().numpy() for k, v in tensors.items()}


def gguf_tokenizer_via_transformers(path):
    """transformers' tokenizer read from the GGUF file at `path` (`AutoTokenizer(..., gguf_file=...)`)."""
    path = Path(path)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def llama_from_tensors(config: dict, tensors: dict[str, np.ndarray], *, seed=0):
    """transformers' `LlamaForCausalLM(LlamaConfig(**config))` in eval mode holding `tensors`.

    `tensors` are HF-named numpy arrays (e.g. from our `read_gguf`), loaded non-strictly so a tied
    `lm_head.weight` may be absent. Returns ``(model, missing_keys, unexpected_keys)``.
    """
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    return model, missing, unexpected


def greedy_chat_completion(model, tokenizer, messages, *, max_new_tokens, eos_token_id) -> str:
    """Greedy `model.generate` on the chat template of `messages`; returns the decoded completion only.

    `messages` is a list of ``{"role", "content"}``; the prompt ends with the generation prompt;
    `eos_token_id` also serves as the pad id; special tokens are skipped in the decoded text.
    """
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
