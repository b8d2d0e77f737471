"""Small helpers the stages share: model paths (local or hub), model creation and export, optimizers,
stage folders and the NaN/inf guard."""

from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from rto_jax.distributed import is_main_process, sync, to_host
from rto_jax.errors import ConfigError, ModelError
from rto_jax.models import (
    CausalLM,
    LoraConfig,
    ModelConfig,
    load_pretrained,
    lora,
    merge_adapters,
    peft_io,
    save_pretrained,
    with_adapters,
)
from rto_jax.pipeline.config import looks_local
from rto_jax.pipeline.logging import write_json_atomic
from rto_jax.train import OptimizerConfig, TrainState, make_optimizer
from rto_jax.train.sharding import mesh_from_config, shard_tree, step_shardings, tree_shardings


class NonFiniteError(FloatingPointError):
    """A loss, metric or parameter became NaN/inf; the message names the step and the last checkpoint."""


def resolve_model_path(name: str) -> Path:
    """A local model folder / .gguf as is; a hub id 'owner/name[@revision]' downloaded (safetensors only)."""
    path, _, revision = name.partition("@")
    local = Path(path).expanduser()
    if local.exists():
        return local
    if looks_local(path):
        raise FileNotFoundError(f"{name}: no such model folder or .gguf file")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
    return Path(snapshot_download(path, revision=revision or None, allow_patterns=patterns))


def execution_overrides(config) -> dict:
    return dict(
        dtype=config.model.dtype,
        scan_layers=config.model.scan_layers,
        remat=config.model.remat,
        attention=config.model.attention,
    )


def load_model(name: str, kind: str, config, mesh=None):
    """kind 'lm' (CausalLM) or 'scalar' (ScalarHeadModel; a fresh head on a causal LM's backbone).

    mesh: load straight into the sharding rules' layout on it (no device holds the whole model).
    """
    path = resolve_model_path(name)
    if (path / peft_io.CONFIG_FILE).is_file():
        return _load_peft_folder(path, kind, config, mesh)
    shardings = None if mesh is None else functools.partial(tree_shardings, mesh=mesh)
    return load_pretrained(path, kind=kind, shardings=shardings, **execution_overrides(config))


def _load_peft_folder(folder: Path, kind: str, config, mesh):
    """A PEFT LoRA adapter folder as a model: its base (`base_model_name_or_path`, a folder or hub id) with
    the adapters merged in, so it serves wherever a model path does (any stage's init_from)."""
    base = peft_io.read_peft_json(folder).get("base_model_name_or_path") or ""
    if not base:
        raise ModelError(
            f"{folder / peft_io.CONFIG_FILE}: base_model_name_or_path is empty; the adapter needs its base"
        )
    base_path = resolve_model_path(base)
    if (base_path / peft_io.CONFIG_FILE).is_file():
        raise ModelError(f"{folder / peft_io.CONFIG_FILE}: the base {base} is itself an adapter; merge it first")
    return merge_adapters(peft_io.load_peft_adapter(load_model(str(base_path), kind, config, mesh), folder))


def init_base_model(config, task, mesh=None) -> CausalLM:
    """SFT's starting point: config.model.init_from (loaded onto `mesh` when given), or a random model
    sized by config.model (`random_base_model`)."""
    if config.model.init_from:
        return load_model(config.model.init_from, "lm", config, mesh)
    return random_base_model(config, task)


def random_base_model(config, task) -> CausalLM:
    """A randomly initialized CausalLM sized by config.model (seed config.seed)."""
    m = config.model
    cfg = ModelConfig(
        arch=m.arch,
        model_type="llama" if m.arch == "llama" else "gpt_neox",
        vocab_size=task.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads if m.arch == "llama" else m.num_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings,
        attention_bias=m.arch == "gpt_neox",
        eos_token_id=task.eos_id,
        pad_token_id=task.pad_id,
        **execution_overrides(config),
    )
    return CausalLM(cfg, nnx.Rngs(config.seed))


def export(model, folder: Path, task) -> str:
    """HF-format export (safetensors + config.json with the run's pad / EOS ids, + the tokenizer when
    there is one), atomic.

    Every process calls it (parameters split across processes are gathered); process 0 writes, and
    the others wait until the folder is complete, since the next stage loads it on every process.
    """
    graphdef, params = nnx.split(model)
    model = nnx.merge(graphdef, to_host(params))
    if is_main_process():
        tokenizer = task.tokenizer if hasattr(task.tokenizer, "save_pretrained") else None
        # The run's pad and EOS (pad chosen != EOS by the task) go into config.json and the saved
        # tokenizer, so transformers can batch (left-pad) the exported model.
        save_pretrained(model, folder, tokenizer=tokenizer, pad_token_id=task.pad_id, eos_token_id=task.eos_id)
    sync(f"export {folder}")
    return str(folder)


def export_trained(model, folder: Path, task, base_model: str = "", name: str = "model") -> str:
    """Exports a stage's trained model to `folder/name`: the plain model, or for an adapter model the
    adapters merged into the base (what the next stages load), with the adapters themselves in PEFT's
    format beside it (`adapter_folder`; `base_model`: the model they were trained on)."""
    if model.config.lora is None:
        return export(model, folder / name, task)
    path = export(merge_adapters(model), folder / name, task)
    graphdef, params = nnx.split(model)
    host_model = nnx.merge(graphdef, to_host(params))
    adapter = _adapter_name(folder / name)
    if is_main_process():
        peft_io.save_peft_adapter(host_model, adapter, base_model=base_model)
    sync(f"export {adapter}")
    return path


def _adapter_name(model_folder: Path) -> Path:
    return model_folder.parent / ("adapter" if model_folder.name == "model" else f"{model_folder.name}_adapter")


def adapter_folder(model_path: str) -> Path | None:
    """The PEFT adapter behind a model path: the path itself when it is an adapter folder, the adapter
    exported beside a stage's merged model (`export_trained`), or None."""
    path = Path(model_path.split("@")[0]).expanduser()
    for folder in (path, _adapter_name(path)):
        if (folder / peft_io.CONFIG_FILE).is_file():
            return folder
    return None


def write_json(path, obj) -> None:
    """`write_json_atomic` on process 0 only (results, done markers, caches: nothing is written twice)."""
    if is_main_process():
        write_json_atomic(path, obj)


# One optax object per OptimizerConfig: TrainState keeps `tx` as static pytree metadata, so an equal
# but new object would make every jitted step compile again in a process that runs several pipelines.
_make_optimizer = functools.lru_cache(maxsize=None)(make_optimizer)


def optimizer(stage_config, total_steps: int, learning_rate: float | None = None):
    return _make_optimizer(
        OptimizerConfig(
            learning_rate=stage_config.lr if learning_rate is None else learning_rate,
            schedule=stage_config.schedule,
            warmup_steps=stage_config.warmup_steps,
            total_steps=total_steps,
            weight_decay=stage_config.weight_decay,
            b1=stage_config.b1,
            b2=stage_config.b2,
            eps=stage_config.adam_eps,
            max_grad_norm=stage_config.max_grad_norm,
        )
    )


def lora_config(stage_config) -> LoraConfig | None:
    """The stage's `lora.*` fields as a LoraConfig; None when `lora.rank` is 0 (full fine-tuning)."""
    fields = stage_config.lora
    if fields.rank == 0:
        return None
    return LoraConfig(
        rank=fields.rank, alpha=fields.alpha, dropout=fields.dropout, targets=lora.parse_targets(fields.targets)
    )


def check_lora_targets(stage: str, adapters: LoraConfig, model) -> None:
    """A ConfigError naming `<stage>.lora.targets` when the loaded model's architecture lacks a target
    (`validate` knows the architecture only of a random-init model)."""
    try:
        adapters.target_names(model.config.arch)
    except ValueError as e:
        raise ConfigError(f"{stage}.lora.targets", str(e)) from None


def train_state(config, stage: str, model, tx, mesh):
    """(TrainState of `model` placed on `mesh`, its StepShardings). With `config.<stage>.lora.rank` > 0, fresh
    adapters are added and only they (and a scalar head) are trained; the frozen base is stored in the
    compute dtype (bfloat16 halves it; the forward casts the weights to it anyway)."""
    adapters = lora_config(config[stage])
    if adapters is None:
        return shard_state(TrainState.create(model, tx), mesh)
    check_lora_targets(stage, adapters, model)
    model = with_adapters(model, adapters, nnx.Rngs(params=stage_key(config.seed, f"{stage}/lora")))
    state = TrainState.create(model, tx, trainable=lora.TRAINABLE, base_dtype=base_dtype(config))
    return shard_state(state, mesh)


def base_dtype(config):
    """How an adapter run stores its frozen base: in the compute dtype (bfloat16 halves it, and the forward
    casts the weights to it anyway); None keeps float32."""
    return jnp.bfloat16 if config.model.dtype == "bfloat16" else None


def stage_dir(workdir, stage: str) -> Path:
    path = Path(workdir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating leaf of `tree` is finite (one fused reduction, one host sync)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_finite(stage: str, step: int, values: dict, params, manager) -> None:
    """Stops the stage (NonFiniteError) on a NaN/inf metric (loss, gradient norm, ...) or parameter.

    The bad state is never saved, so the last checkpoint stays the last good one.
    """
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if not bad and bool(all_finite(params)):
        return
    last = manager.latest_step()
    where = f"{manager.directory / str(last)} (step {last})" if last is not None else "none yet (nothing was saved)"
    what = ", ".join(bad) if bad else "parameters (a non-finite gradient)"
    raise NonFiniteError(f"{stage}: non-finite {what} at step {step}; stopped. Last good checkpoint: {where}, intact.")


def stage_key(seed: int, stage: str) -> jax.Array:
    """A stage's base PRNG key (distinct per stage name, fixed by the seed)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.encode()) & 0x7FFFFFFF)


def device_mesh(config):
    """The mesh of `config.mesh`, or None on a single device (the unsharded path, exactly as before)."""
    if jax.device_count() == 1:
        return None
    return mesh_from_config(config)


def shard_state(state, mesh):
    """(state placed on `mesh` by the sharding rules, its StepShardings); (state, None) without a mesh."""
    if mesh is None:
        return state, None
    state = shard_tree(state, mesh)
    return state, step_shardings(state, mesh)
