"""Weights in and out: HF folders (config.json + safetensors, sharded or not) and GGUF files.

HF tensor names and layouts are the exchange format. `load_pretrained` builds the NNX model
abstractly (no random init) and fills every parameter from the file, checking names and shapes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rto_jax.errors import ModelError
from rto_jax.files import publish_folder, temp_dir_for
from rto_jax.models.config import ModelConfig, check_supported, from_hf_config, to_hf_config
from rto_jax.models.transformer import CausalLM, ScalarHeadModel

log = logging.getLogger(__name__)

_PREFIX = {"llama": "model", "gpt_neox": "gpt_neox"}
_TOP = {  # our path -> HF name, per architecture
    "llama": {
        "decoder.embed.embedding": "model.embed_tokens.weight",
        "decoder.final_norm.scale": "model.norm.weight",
        "lm_head.kernel": "lm_head.weight",
        "head.kernel": "score.weight",
        "head.bias": "score.bias",  # only a head made with `ScalarHeadModel.with_affine_output` has one
    },
    "gpt_neox": {
        "decoder.embed.embedding": "gpt_neox.embed_in.weight",
        "decoder.final_norm.scale": "gpt_neox.final_layer_norm.weight",
        "decoder.final_norm.bias": "gpt_neox.final_layer_norm.bias",
        "lm_head.kernel": "embed_out.weight",
        "head.kernel": "score.weight",
        "head.bias": "score.bias",  # only a head made with `ScalarHeadModel.with_affine_output` has one
    },
}
_BLOCK = {  # our module inside a block -> HF module inside `layers.{i}`
    "llama": {
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    },
    "gpt_neox": {
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
        "query_key_value": "attention.query_key_value",
        "dense": "attention.dense",
        "dense_h_to_4h": "mlp.dense_h_to_4h",
        "dense_4h_to_h": "mlp.dense_4h_to_h",
    },
}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Non-parameter buffers that some checkpoints carry.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


def _hf_names(path: str, cfg: ModelConfig) -> list[str]:
    """HF names of our parameter `path` (several when layers are stacked: one per layer)."""
    if path in _TOP[cfg.arch]:
        return [_TOP[cfg.arch][path]]
    parts = path.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise KeyError(path)
    if cfg.scan_layers:
        module, leaf, layers = parts[2], parts[3], range(cfg.num_layers)
    else:
        module, leaf, layers = parts[3], parts[4], [int(parts[2])]
    return [f"{_PREFIX[cfg.arch]}.layers.{i}.{_BLOCK[cfg.arch][module]}.{_LEAF[leaf]}" for i in layers]


def _is_stacked(path: str, cfg: ModelConfig) -> bool:
    return cfg.scan_layers and path.startswith("decoder.layers.")


def _to_hf(path: str, value: np.ndarray) -> np.ndarray:
    return value.T if path.endswith("kernel") else value  # HF Linear weights are [out, in].


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    state = nnx.state(model, nnx.Param)
    return {".".join(str(k) for k in key): var for key, var in nnx.to_flat_state(state)}


def _new_model(cfg: ModelConfig, kind: str, head_bias: bool = False) -> nnx.Module:
    if kind == "scalar":
        return ScalarHeadModel(cfg, nnx.Rngs(0), head_bias=head_bias)
    return CausalLM(cfg, nnx.Rngs(0))


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    # Each device (of this process) receives only its slice; no device ever holds the whole tensor.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _fill(
    cfg: ModelConfig,
    kind: str,
    get: Callable[[str], np.ndarray | None],
    source: str,
    shardings: Callable[[nnx.State], nnx.State] | None = None,
    head_bias: bool = False,
) -> nnx.Module:
    """Builds the model abstractly and fills each parameter with `get(hf_name)` (None if absent),
    one tensor at a time, placed by `shardings(abstract_state)` when given."""
    abstract = nnx.eval_shape(lambda: _new_model(cfg, kind, head_bias))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    placement = dict(nnx.to_flat_state(shardings(state))) if shardings is not None else {}
    filled = {}
    for key, var in flat.items():
        path = ".".join(str(k) for k in key)
        stacked = _is_stacked(path, cfg)
        expected = _to_hf(path, np.empty(var.shape[1:] if stacked else var.shape, np.float32)).shape
        arrays = []
        for name in _hf_names(path, cfg):
            tensor = get(name)
            if tensor is None:
                raise ModelError(f"{source}: tensor {name!r} (for {path}) is missing")
            if tuple(tensor.shape) != expected:
                raise ModelError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {expected}"
                )
            arrays.append(_to_hf(path, np.asarray(tensor, np.float32)))
        sharding = placement[key].get_value() if key in placement else None
        filled[key] = var.replace(_place(np.stack(arrays) if stacked else arrays[0], sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Float32 numpy arrays under HF names and layouts."""
    cfg = model.config
    if cfg.lora is not None:
        raise ValueError(
            "the model has low-rank adapters, which HF's plain architecture cannot hold: export them with "
            "rto_jax.models.peft_io.save_peft_adapter, or merge_adapters(model) first for full weights"
        )
    out = {}
    for path, var in _flat_params(model).items():
        value = np.asarray(jax.device_get(var[...]), np.float32)
        stacked = _is_stacked(path, cfg)
        for i, name in enumerate(_hf_names(path, cfg)):
            out[name] = np.ascontiguousarray(_to_hf(path, value[i] if stacked else value))
    return out


class _SafetensorsFolder:
    """Name -> tensor lookup over a folder's `model.safetensors` or sharded `*.index.json`."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if not (index.exists() or single.exists()):
            raise FileNotFoundError(
                f"{folder}: no model.safetensors or model.safetensors.index.json "
                f"(PyTorch .bin checkpoints must be converted to safetensors first)"
            )
        self.source = str(index if index.exists() else single)
        files, weight_map = _weight_files(folder)
        self.handles = {}
        for file in files:
            try:
                self.handles[file.name] = safe_open(str(file), framework="flax")
            except Exception as e:  # noqa: BLE001 (safetensors' errors name no file)
                raise ModelError(f"{file}: cannot be read as safetensors ({e})") from None
        first = files[0].name
        self.weight_map = weight_map or {k: first for k in self.handles[first].keys()}  # noqa: SIM118 (not a dict)

    def get(self, name: str):
        shard = self.weight_map.get(name)
        if shard is None:
            return None
        return np.asarray(self.handles[shard].get_tensor(name).astype(jnp.float32))

    def names(self):
        return set(self.weight_map)


def _kind_from_architectures(hf_config: dict) -> str:
    arch = (hf_config.get("architectures") or [""])[0]
    return "scalar" if arch.endswith("ForSequenceClassification") else "lm"


def load_pretrained(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    shardings: Callable[[nnx.State], nnx.State] | None = None,
    max_sequence_len: int | None = None,
    **config_overrides,
):
    """Loads an HF model folder (safetensors) or a `.gguf` file into our NNX model.

    kind: "lm" (CausalLM), "scalar" (ScalarHeadModel) or None to follow config.json's
    `architectures`. A "scalar" model from a causal-LM checkpoint gets a fresh head.
    shardings: abstract model state -> the same tree of `jax.sharding.Sharding`s (e.g.
    `functools.partial(rto_jax.train.sharding.tree_shardings, mesh=mesh)`): every tensor is read on
    the host and sent in slices straight to its devices, so no device holds the whole model. In a
    multi-process run every process reads the file and builds only its own devices' slices.
    max_sequence_len: the longest sequence the caller will run; refused (ModelError) when the checkpoint's
    sliding window or max_position_embeddings is shorter (see `rto_jax.models.config.check_supported`).
    config_overrides: execution switches such as dtype="bfloat16" or scan_layers=True.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or .gguf file")
    if path.suffix == ".gguf":
        from rto_jax.models.gguf_import import _open, read_gguf_config, read_gguf_tensors

        reader = _open(path)
        source = str(path)
        hf_config = read_gguf_config(path, reader)
        # Every config check before the (slow) dequantization of the tensors.
        cfg = check_supported(from_hf_config(hf_config, source=source, **config_overrides), max_sequence_len, source)
        tensors = read_gguf_tensors(path, hf_config, reader)
        get, names = tensors.get, set(tensors)
    else:
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file}: missing (an HF model folder needs config.json)")
        hf_config = _read_json(config_file)
        folder = _SafetensorsFolder(path)  # opens the files' headers only
        cfg = from_hf_config(hf_config, source=str(config_file), **config_overrides)
        cfg = check_supported(cfg, max_sequence_len, str(config_file))
        get, names, source = folder.get, folder.names(), folder.source
    stored_kind = _kind_from_architectures(hf_config)
    kind = kind or stored_kind
    if kind == "scalar" and stored_kind == "lm":
        model = ScalarHeadModel.from_causal_lm(_fill(cfg, "lm", get, source, shardings), nnx.Rngs(0))
    else:
        model = _fill(cfg, kind, get, source, shardings, head_bias=kind == "scalar" and "score.bias" in names)
    used = set(hf_state_dict_names(model))
    unused = sorted(
        n for n in names - used if not _IGNORED.match(n) and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    )
    if unused and not (kind == "scalar" and stored_kind == "lm"):
        log.warning("%s: %d tensors not used by the model, e.g. %s", source, len(unused), unused[:3])
    return model


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file}: cannot be read as JSON ({type(e).__name__}: {e})") from e
    if not isinstance(value, dict):
        raise ModelError(f"{file}: expected a JSON object, found {type(value).__name__}")
    return value


def inspect_model_source(path: str | os.PathLike, max_sequence_len: int | None = None) -> ModelConfig:
    """The ModelConfig of an HF model folder or `.gguf` file, read cheaply before any work.

    Reads only config.json (HF folder; the weight files must exist but are not opened) or the GGUF metadata
    and tensor list (no tensor data, except llama.cpp's tiny `rope_freqs` vector when present), and runs every
    check of `from_hf_config` and `check_supported`: a field the decoders do not implement, or a sliding window
    or max_position_embeddings shorter than `max_sequence_len` (the longest prompt + response the run will
    feed the model), is a ModelError naming the file and the field. `vocab_size` etc. can be read off the result.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model folder or .gguf file")
    if path.suffix == ".gguf":
        from rto_jax.models.gguf_import import read_gguf_config

        return check_supported(read_gguf_config(path), max_sequence_len, str(path))
    if not path.is_dir():
        raise ModelError(f"{path}: expected an HF model folder (config.json + safetensors) or a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{config_file}: missing (an HF model folder needs config.json)")
    cfg = check_supported(_read_json(config_file), max_sequence_len, str(config_file))
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise ModelError(
            f"{path}: no model.safetensors or model.safetensors.index.json "
            f"(PyTorch .bin checkpoints must be converted to safetensors first)"
        )
    for file in _weight_files(path)[0]:
        check_safetensors(file)
    return cfg


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(the safetensors files of an HF folder, the index's {tensor: file} or None for a single file);
    a ModelError names a shard the index lists but the folder lacks."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return [folder / "model.safetensors"], None
    try:
        weight_map = _read_json(index)["weight_map"]
    except KeyError:
        raise ModelError(f"{index}: no 'weight_map'") from None
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise ModelError(f"{file}: missing (listed in {index})")
    return files, weight_map


def check_safetensors(file: Path) -> None:
    """A ModelError naming `file` unless its header parses and its tensors' data ends where the file
    does (a truncated or damaged download); reads the header only."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= size - 8:
            raise ModelError(f"{file}: not a safetensors file (its {size} bytes hold no valid header)")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise ModelError(f"{file}: damaged safetensors header ({e})") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise ModelError(
            f"{file}: {size} bytes, but its header describes {expected}: the file is truncated or damaged "
            "(download or export it again)"
        )


def hf_state_dict_names(model: nnx.Module) -> list[str]:
    return [n for path in _flat_params(model) for n in _hf_names(path, model.config)]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored with a model: AutoTokenizer for an HF folder, the embedded BPE for a GGUF."""
    path = Path(path)
    if path.suffix == ".gguf":
        from rto_jax.models.gguf_import import read_gguf

        return read_gguf(path)[2]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _architecture_name(model: nnx.Module) -> str:
    cfg = model.config
    family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt_neox": "GPTNeoX"}[cfg.model_type]
    return family + ("ForSequenceClassification" if isinstance(model, ScalarHeadModel) else "ForCausalLM")


def _check_token_id(name: str, value: int | None, vocab_size: int) -> int | None:
    if value is None:
        return None
    if not 0 <= int(value) < vocab_size:
        raise ValueError(f"save_pretrained: {name}={value} is outside the vocabulary [0, {vocab_size})")
    return int(value)


def _export_tokenizer(tokenizer, pad_token_id: int | None, eos_token_id: int | None):
    """A copy of `tokenizer` whose pad and eos tokens are those of the exported ids (the caller's is untouched)."""
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    for attr, token_id in (("pad_token", pad_token_id), ("eos_token", eos_token_id)):
        if token_id is None:
            continue
        if token_id >= len(tok):
            raise ValueError(f"save_pretrained: {attr} id {token_id} is not in the tokenizer ({len(tok)} tokens)")
        setattr(tok, attr, tok.convert_ids_to_tokens(token_id))
        if getattr(tok, attr + "_id") != token_id:
            raise ValueError(
                f"save_pretrained: token {getattr(tok, attr)!r} of {attr} id {token_id} maps back to id "
                f"{getattr(tok, attr + '_id')}"
            )
    return tok


def save_pretrained(
    model: nnx.Module,
    folder: str | os.PathLike,
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
    *,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Writes HF-format safetensors (sharded past `max_shard_bytes`) and config.json, atomically.

    pad_token_id / eos_token_id (default: the model config's) go into config.json and, for a causal LM,
    generation_config.json (with bos); transformers needs the pad id to score a padded batch with a
    `*ForSequenceClassification` model. `tokenizer` (optional) is saved as a copy whose pad and eos tokens
    are the tokens of those ids, so `AutoTokenizer.from_pretrained(folder).pad_token_id` equals config.json's.
    Pick pad != eos: transformers' sequence classifiers read the score at the last token that is not pad.
    """
    from safetensors.numpy import save_file

    cfg = model.config
    pad = _check_token_id("pad_token_id", cfg.pad_token_id if pad_token_id is None else pad_token_id, cfg.vocab_size)
    eos = _check_token_id("eos_token_id", cfg.eos_token_id if eos_token_id is None else eos_token_id, cfg.vocab_size)
    if pad is None:
        log.warning("save_pretrained(%s): no pad_token_id; transformers cannot score padded batches", folder)
    elif pad == eos:
        log.warning("save_pretrained(%s): pad_token_id == eos_token_id == %d", folder, pad)
    cfg = cfg.replace(pad_token_id=pad, eos_token_id=eos)
    tokenizer = None if tokenizer is None else _export_tokenizer(tokenizer, pad, eos)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(folder)
    try:
        hf_config = to_hf_config(cfg, _architecture_name(model))
        if isinstance(model, ScalarHeadModel):
            hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        else:
            generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        tensors = hf_state_dict(model)
        shards, current, size = [], {}, 0
        for name, value in tensors.items():
            if current and size + value.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name], size = value, size + value.nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        publish_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
