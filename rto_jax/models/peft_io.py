"""Adapters in and out in Hugging Face PEFT's LoRA format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores, per targeted `nn.Linear` (weight `[out, in]`), `lora_A.weight` `[r, in]` and `lora_B.weight`
`[out, r]` under `base_model.model.<module path>.`, and scales `B @ A` by `lora_alpha / r`. Ours are
`A` `[in, r]`, `B` `[r, out]` (x @ A @ B): the same numbers transposed. A merged export (the plain HF
model, `merge_adapters` then `save_pretrained`) is the other way out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from rto_jax.errors import ModelError
from rto_jax.files import publish_folder, temp_dir_for
from rto_jax.models.hf_io import _hf_names, _read_json
from rto_jax.models.lora import PROJECTIONS, LoraConfig
from rto_jax.models.transformer import CausalLM, ScalarHeadModel, with_adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# Fields whose non-default values change what an adapter computes and that we do not implement.
_UNSUPPORTED = {
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


def _adapter_names(model: nnx.Module) -> dict[tuple, list[str]]:
    """Flat key of each adapter array -> its PEFT tensor names (one per layer when layers are stacked)."""
    cfg = model.config
    out = {}
    for key, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        path = ".".join(str(k) for k in key)
        kernel_path = path.rsplit(".", 1)[0] + ".kernel"
        leaf = "lora_A" if key[-1] == "lora_a" else "lora_B"
        out[key] = [f"{_PEFT_PREFIX}{name[: -len('.weight')]}.{leaf}.weight" for name in _hf_names(kernel_path, cfg)]
    return out


def save_peft_adapter(model: CausalLM | ScalarHeadModel, folder: str | os.PathLike, base_model: str = "") -> Path:
    """Writes `model`'s adapters as a PEFT LoRA adapter folder (atomically: a temporary folder renamed into
    place). `base_model` goes into `base_model_name_or_path` (PEFT loads the adapter onto any base you give it)."""
    from safetensors.numpy import save_file

    cfg = model.config
    if cfg.lora is None:
        raise ValueError("the model has no adapters (ModelConfig.lora is None)")
    lora = cfg.lora
    tensors = {}
    adapters = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    for key, names in _adapter_names(model).items():
        value = np.asarray(jax.device_get(adapters[key][...]), np.float32)
        layers = value if len(names) > 1 else value[None]
        for name, layer in zip(names, layers):
            tensors[name] = np.ascontiguousarray(layer.T)  # ours [in, r] / [r, out]; PEFT's [r, in] / [out, r]
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if isinstance(model, ScalarHeadModel) else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.target_names(cfg.arch)),
        "inference_mode": True,
        **_UNSUPPORTED,
    }
    if isinstance(model, ScalarHeadModel):
        config["modules_to_save"] = ["score"]  # the scalar head is trained in full beside the adapters
        tensors[f"{_PEFT_PREFIX}score.weight"] = np.ascontiguousarray(np.asarray(model.head.kernel[...], np.float32).T)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(folder)
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    publish_folder(tmp, folder)
    return folder


def read_peft_config(folder: str | os.PathLike, arch: str) -> LoraConfig:
    """The LoraConfig of a PEFT LoRA adapter folder; a field we do not implement is a ModelError naming it."""
    path = Path(folder) / CONFIG_FILE
    config = _read_json(path)
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    for field, default in _UNSUPPORTED.items():
        value = config.get(field)
        if value is not None and value != default:
            raise ModelError(f"{path}: {field}={value!r} is not supported (only {default!r})")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ModelError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    valid = PROJECTIONS[arch]
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise ModelError(f"{path}: target_modules {unknown} are not projections of a {arch} model ({list(valid)})")
    try:
        return LoraConfig(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout", 0.0)),
            targets=tuple(t for t in valid if t in targets),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: {e}") from None


def read_peft_json(folder: str | os.PathLike) -> dict:
    """A PEFT adapter folder's `adapter_config.json` as it is (a bad file is a ModelError naming it)."""
    return _read_json(Path(folder) / CONFIG_FILE)


def load_peft_adapter(model: CausalLM | ScalarHeadModel, folder: str | os.PathLike) -> CausalLM | ScalarHeadModel:
    """`model` (the base, without adapters) with the adapters of a PEFT LoRA folder; checks every name and shape."""
    from safetensors import safe_open

    folder = Path(folder)
    lora = read_peft_config(folder, model.config.arch)
    adapted = with_adapters(model, lora, nnx.Rngs(0))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{folder}: {WEIGHTS_FILE} is missing")
    state = nnx.state(adapted, nnx.LoRAParam)
    flat = dict(nnx.to_flat_state(state))
    with safe_open(str(weights), "np") as f:
        available = set(f.keys())
        for key, names in _adapter_names(adapted).items():
            arrays = []
            for name in names:
                if name not in available:
                    raise ModelError(f"{weights}: tensor {name!r} is missing")
                arrays.append(np.asarray(f.get_tensor(name), np.float32).T)
            value = np.stack(arrays) if len(names) > 1 else arrays[0]
            if value.shape != flat[key].shape:
                raise ModelError(
                    f"{weights}: {names[0]!r} gives {value.shape} (ours, transposed), the model expects {flat[key].shape}"
                )
            flat[key] = flat[key].replace(jax.numpy.asarray(value))
        if isinstance(adapted, ScalarHeadModel) and f"{_PEFT_PREFIX}score.weight" in available:
            adapted.head.kernel[...] = jax.numpy.asarray(
                np.asarray(f.get_tensor(f"{_PEFT_PREFIX}score.weight"), np.float32).T
            )
    nnx.update(adapted, nnx.from_flat_state(flat))
    return adapted
