"""Memory planner: per-device bytes of each stage for a model, a mesh and batch sizes, and which real
presets fit on which TPU / GPU slices.

    python -m rto_jax.tools.plan --config=configs/rto_tldr.py:2.8b [--num_devices=8] [--mesh=1,8,1]
    python -m rto_jax.tools.plan --model=llama3_8b --mesh=1,8,1 --num_devices=8
    python -m rto_jax.tools.plan --table_only [--lora_rank=16]   (0: no adapter columns)

Config fields read (all optional, so configs of other layouts work too):
  model       `preset` (a PRESETS name), `init_from` (a hub id of a preset, e.g. EleutherAI/pythia-1b-deduped),
              or random-init dims `arch, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
              head_dim, tie_word_embeddings, vocab_size` (else `tokenizer.bpe_vocab_size`); `dtype`, `remat`,
              `attention`
  mesh        `data` (-1: the remaining devices), `fsdp`, `tensor`
  data        `max_prompt_len` P, `max_response_len` R
  sft, reward_model, dpo   `batch_size`, `grad_accum_steps`
  ppo         `rollout_batch_size`, `num_minibatches`

Exact parts: parameter and optimizer-state bytes per device are computed from the models' abstract
parameters (`jax.eval_shape`), the optimizer's abstract state and the sharding rules, the same way the
sharded steps place them (tests/test_sharding.py checks them against measured shards); so is the
sampler's KV cache. Activations are an estimate (the largest per-device micro-batch of a stage, per
layer: the tensors its remat policy keeps, plus the float32 logits), good to a small factor.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from rto_jax.models import CausalLM, LoraConfig, ModelConfig, ScalarHeadModel, attention, lora
from rto_jax.objectives.advantages import needs_critic
from rto_jax.train import sharding
from rto_jax.train.ppo import PPOConfig
from rto_jax.train.state import OptimizerConfig, make_optimizer

GIB = 1024**3

# Real models (their HF config.json dims) and the tiny random-init preset of the pipeline.
PRESETS: dict[str, ModelConfig] = {
    "smollm2_135m": ModelConfig(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
    ),
    "pythia_1b": ModelConfig(
        arch="gpt_neox", model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=8, num_kv_heads=8, head_dim=256, attention_bias=True,
    ),
    "pythia_2.8b": ModelConfig(
        arch="gpt_neox", model_type="gpt_neox", vocab_size=50304, hidden_size=2560, intermediate_size=10240,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=80, attention_bias=True,
    ),
    "pythia_6.9b": ModelConfig(
        arch="gpt_neox", model_type="gpt_neox", vocab_size=50432, hidden_size=4096, intermediate_size=16384,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, attention_bias=True,
    ),
    "llama3_8b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
    ),
    # rto_jax.pipeline.config.apply_tiny with its 2048-token BPE.
    "tiny": ModelConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16
    ),
}  # fmt: skip
REAL_PRESETS = ("smollm2_135m", "pythia_1b", "pythia_2.8b", "pythia_6.9b", "llama3_8b")
# Hub ids used by the configs in configs/ -> preset.
HUB_IDS = {
    "EleutherAI/pythia-1b-deduped": "pythia_1b",
    "EleutherAI/pythia-2.8b-deduped": "pythia_2.8b",
    "EleutherAI/pythia-6.9b-deduped": "pythia_6.9b",
    "OpenRLHF/Llama-3-8b-sft-mixture": "llama3_8b",
    "meta-llama/Meta-Llama-3-8B": "llama3_8b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2_135m",
    "HuggingFaceTB/SmolLM2-135M": "smollm2_135m",
}

# (name, JAX devices, memory per device in GiB). TPU v4/v5p: one device per chip (megacore).
SLICES = (
    ("v4-8", 4, 32),
    ("v4-32", 16, 32),
    ("v5e-8", 8, 16),
    ("v5e-16", 16, 16),
    ("v5p-8", 4, 95),
    ("v6e-8", 8, 32),
    ("1xH100-80G", 1, 80),
    ("8xA100-40G", 8, 40),
    ("8xA100-80G", 8, 80),
    ("8xH100-80G", 8, 80),
)
USABLE = 0.9  # share of device memory a run may plan for (XLA's buffers and fragmentation need the rest)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Per-stage batch sizes and lengths (the pipeline config's names); defaults: the N+ TL;DR recipe."""

    prompt_len: int = 512
    response_len: int = 53
    sft_batch: int = 128
    sft_accum: int = 1
    rm_batch: int = 64
    rm_accum: int = 1
    dpo_batch: int = 64
    dpo_accum: int = 1
    rollout_batch: int = 512
    ppo_minibatches: int = 1
    critic: bool = True  # False: a critic-free estimator (ppo.estimator other than "gae"): no critic held or trained


def _abstract_mesh(shape) -> AbstractMesh:
    return AbstractMesh(tuple(shape), sharding.MESH_AXES)


def tree_bytes_per_device(tree, mesh_shape, rules=sharding.DEFAULT_RULES) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs, nnx Variables with `axes`) when it is
    placed by `sharding.tree_shardings`: annotated arrays split by the rules, everything else replicated."""
    mesh = _abstract_mesh(mesh_shape)
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shape = tuple(value.shape)
        if isinstance(leaf, nnx.Variable):
            spec = sharding.logical_to_spec(
                leaf.get_metadata()["axes"], rules, shape=shape, mesh=mesh, path=jax.tree_util.keystr(path)
            )
            shape = _shard_shape(shape, spec, mesh)
        total += math.prod(shape) * jnp.dtype(value.dtype).itemsize
    return total


def _shard_shape(shape, spec, mesh) -> tuple[int, ...]:
    out = list(shape)
    for i, axes in enumerate(spec):
        if axes is not None:
            out[i] //= math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return tuple(out)


@functools.cache
def abstract_params(config: ModelConfig, scalar_head: bool = False):
    """The model's parameters as ShapeDtypeStructs (nothing allocated; cached per config)."""
    cls = ScalarHeadModel if scalar_head else CausalLM
    config = config.replace(scan_layers=True, dtype="float32", remat="none")  # execution switches: same params
    return jax.eval_shape(lambda: nnx.split(cls(config, nnx.Rngs(0)))[1])


@functools.cache
def abstract_optimizer_state(config: ModelConfig, scalar_head: bool = False):
    """AdamW's state for the model (the pipeline's optimizer: clip + adamw; two float32 moments and a count)."""
    return jax.eval_shape(make_optimizer(OptimizerConfig()).init, abstract_params(config, scalar_head))


@functools.cache
def abstract_adapters(config: ModelConfig, adapters: LoraConfig, scalar_head: bool = False):
    """What an adapter run trains (`lora.TRAINABLE`: the adapters, and the head of a scalar-head model),
    abstract, and AdamW's state for it."""
    cls = ScalarHeadModel if scalar_head else CausalLM
    config = config.replace(scan_layers=True, dtype="float32", remat="none", lora=adapters)
    trained = jax.eval_shape(lambda: nnx.split(cls(config, nnx.Rngs(0)), lora.TRAINABLE, ...)[1])
    return trained, jax.eval_shape(make_optimizer(OptimizerConfig()).init, trained)


def kv_cache_bytes_per_device(config: ModelConfig, batch: int, length: int, mesh_shape) -> int:
    """The sampler's cache (k and v `[L, B, K, S, D]` in the compute dtype), placed by `kv_cache_shardings`."""
    mesh = _abstract_mesh(mesh_shape)
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
    spec = sharding.logical_to_spec(sharding.KV_CACHE_AXES, shape=shape, mesh=mesh, strict=False)
    return 2 * math.prod(_shard_shape(shape, spec, mesh)) * jnp.dtype(dtype).itemsize


def activation_bytes_per_device(config: ModelConfig, rows: int, length: int, logits_length: int, mesh_shape) -> int:
    """Estimate of a training micro-batch's activations on one device (`rows` sequences of `length` tokens).

    Per layer and token (e = compute bytes; d, f, heads h, kv heads k, head dim c, split by tensor):
      remat 'none': e * (6d + 3(h + 2k)c + 3f) + a       (norms, q/k/v/o, MLP, attention's saved state a)
      remat 'dots': e * ((h + 2k)c + d + 3f)            (matmul outputs only; one layer recomputed)
      remat 'full': e * d                               (the block input; one layer recomputed)
    plus float32 logits, log-softmax and their gradient over the response (3 x 4 bytes x vocab / tensor).
    a = 8 h T (float32 scores + probs) with attention `xla` or `auto` (what `auto` is on TPU); 4 h (the
    float32 log-sum-exp per query and head) with `blockwise`, `cudnn` or `splash`, which keep no T x S array.
    """
    data, fsdp, tensor = mesh_shape
    tokens = math.ceil(rows / (data * fsdp)) * length
    e = 2 if config.dtype == "bfloat16" else 4
    d, f, hd = config.hidden_size, config.intermediate_size / tensor, config.head_dim
    h, k = config.num_heads / tensor, config.num_kv_heads / tensor
    saved_attention = 4 * h if config.attention in attention.WITHOUT_SCORES else 8 * h * length
    full_layer = e * (6 * d + 3 * (h + 2 * k) * hd + 3 * f) + saved_attention
    per_layer = {"none": full_layer, "dots": e * ((h + 2 * k) * hd + d + 3 * f), "full": e * d}[config.remat]
    layers = config.num_layers * per_layer + (full_layer if config.remat != "none" else 0)
    logits = 3 * 4 * config.vocab_size / tensor * math.ceil(rows / (data * fsdp)) * logits_length
    return int(tokens * layers + logits)


def plan_memory(
    config: ModelConfig, mesh_shape, workload: Workload = Workload(), adapters: LoraConfig | None = None
) -> dict[str, dict[str, int]]:
    """Per-device bytes of every stage: {stage: {params, optimizer, frozen, kv_cache, activations, total}}.

    SFT trains the LM; the reward model a scalar-head model; DPO the LM with its frozen reference;
    PPO/RTO the policy and critic (none when `workload.critic` is False) with the reference, reward
    model and DPO policy frozen (float32 master weights everywhere), plus the rollout's KV cache.

    adapters: every stage trains low-rank adapters (`config.<stage>.lora.rank` > 0): `params` and
    `optimizer` are the adapters' (and scalar heads'), float32; `frozen` is the base, stored in the
    compute dtype, once per stage (PPO: one base for policy, reference, critic, reward model and DPO
    policy, plus the frozen adapters and head of the reward model and the DPO policy's adapters).
    """
    mesh_shape = tuple(mesh_shape)
    size = lambda tree: tree_bytes_per_device(tree, mesh_shape)
    lm_params, head_params = size(abstract_params(config)), size(abstract_params(config, scalar_head=True))
    lm_opt = size(abstract_optimizer_state(config))
    head_opt = size(abstract_optimizer_state(config, scalar_head=True))
    if adapters is not None:
        base = lm_params // 2 if config.dtype == "bfloat16" else lm_params  # float32 leaves, stored in bf16
        backbone = head_params - size(abstract_params(config, scalar_head=True)["head"])
        backbone = backbone // 2 if config.dtype == "bfloat16" else backbone
        lm_params, lm_opt = (size(x) for x in abstract_adapters(config, adapters))
        head_params, head_opt = (size(x) for x in abstract_adapters(config, adapters, scalar_head=True))
    w = workload
    length = w.prompt_len + w.response_len
    act = lambda rows, head_only=False: activation_bytes_per_device(
        config if not head_only else config.replace(vocab_size=1), rows, length, w.response_len, mesh_shape
    )
    minibatch = w.rollout_batch // w.ppo_minibatches
    critic = 1 if w.critic else 0  # the critic: a trained scalar-head model, or none
    stages = {
        "sft": {"params": lm_params, "optimizer": lm_opt, "frozen": 0, "kv_cache": 0, "activations": act(w.sft_batch // w.sft_accum)},
        "reward_model": {
            "params": head_params, "optimizer": head_opt, "frozen": 0, "kv_cache": 0,
            "activations": act(2 * w.rm_batch // w.rm_accum, head_only=True),
        },
        "dpo": {
            "params": lm_params, "optimizer": lm_opt, "frozen": lm_params, "kv_cache": 0,
            "activations": act(2 * w.dpo_batch // w.dpo_accum),
        },
        "ppo": {
            "params": lm_params + critic * head_params, "optimizer": lm_opt + critic * head_opt,
            "frozen": 2 * lm_params + head_params,
            "kv_cache": kv_cache_bytes_per_device(config, w.rollout_batch, length, mesh_shape),
            "activations": act(minibatch) + critic * act(minibatch, head_only=True),
        },
    }  # fmt: skip
    if adapters is not None:  # the frozen base under the adapters, held once per stage
        stages["sft"]["frozen"] = stages["dpo"]["frozen"] = base
        stages["reward_model"]["frozen"] = backbone
        stages["ppo"]["frozen"] = base + lm_params + head_params  # + the DPO policy's and reward model's adapters
    for stage in stages.values():
        stage["total"] = sum(stage.values())
    return stages


# ----------------------------------------------------------------------------------------------
# Which presets fit where.


def best_mesh(
    config: ModelConfig, devices: int, workload: Workload, adapters: LoraConfig | None = None
) -> tuple[tuple[int, int, int], int] | None:
    """The (data, fsdp, tensor) mesh over `devices` with the smallest PPO-stage total, and that total."""
    best = None
    for tensor in (1, 2, 4, 8):
        if devices % tensor:
            continue
        for fsdp in sorted({devices // tensor, 1}):
            shape = (devices // tensor // fsdp, fsdp, tensor)
            try:
                total = plan_memory(config, shape, workload, adapters)["ppo"]["total"]
            except sharding.ShardingRuleError:
                continue  # a dimension does not split evenly on this mesh
            if best is None or total < best[1]:
                best = (shape, total)
    return best


def fits_table(
    workload: Workload,
    presets=REAL_PRESETS,
    slices=SLICES,
    remat="full",
    dtype="bfloat16",
    rows_per_device=4,
    adapters: LoraConfig | None = None,
) -> str:
    """Markdown table: each real preset's PPO/RTO-stage GiB per device on each slice, with the best mesh.

    The PPO update's minibatches are chosen so each device trains on `rows_per_device` sequences at a time
    (num_minibatches = rollout_batch / (rows_per_device * devices)); the rollout's KV cache holds the whole
    rollout batch, as make_experience does. adapters: PPO on one shared base (`plan_memory`).
    """
    header = "| preset | params | " + " | ".join(f"{name} ({n}x{mem}G)" for name, n, mem in slices) + " |"
    lines = [header, "|" + "---|" * (len(slices) + 2)]
    for name in presets:
        config = PRESETS[name].replace(remat=remat, dtype=dtype)
        count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
        cells = []
        for _, devices, memory in slices:
            if workload.rollout_batch % devices:
                cells.append("-")
                continue
            minibatches = max(1, workload.rollout_batch // (rows_per_device * devices))
            found = best_mesh(config, devices, dataclasses.replace(workload, ppo_minibatches=minibatches), adapters)
            if found is None:
                cells.append("-")
                continue
            shape, total = found
            verdict = "yes" if total <= USABLE * memory * GIB else "no"
            cells.append(f"{verdict} {total / GIB:.1f} {','.join(map(str, shape))}")
        lines.append(f"| {name} | {count / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Configs.


def _get(section, key, default=None):
    if section is None:
        return default
    try:
        value = section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def load_config(spec: str):
    """`path/to/file.py[:preset]` -> the file's `get_config(preset)` (an ml_collections ConfigDict)."""
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def model_from_config(config) -> ModelConfig:
    """A ModelConfig from `config.model` (see the module docstring for the fields read)."""
    model = _get(config, "model")
    if isinstance(model, str):
        base = PRESETS[model]
    elif _get(model, "preset"):
        base = PRESETS[_get(model, "preset")]
    else:
        init_from = str(_get(model, "init_from", "") or _get(_get(config, "sft"), "init_from", "")).split("@")[0]
        if init_from in HUB_IDS:
            base = PRESETS[HUB_IDS[init_from]]
        elif init_from:
            raise ValueError(f"model.init_from={init_from!r} is not a known preset; known: {sorted(HUB_IDS)}")
        else:
            vocab = _get(model, "vocab_size") or _get(_get(config, "tokenizer"), "bpe_vocab_size") or 256
            fields = ("arch", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
            kw = {f: _get(model, f) for f in fields if _get(model, f) is not None}
            kw["tie_word_embeddings"] = bool(_get(model, "tie_word_embeddings", False))
            base = ModelConfig(vocab_size=int(vocab), **kw)
    return base.replace(
        dtype=_get(model, "dtype", base.dtype),
        remat=_get(model, "remat", base.remat),
        attention=_get(model, "attention", base.attention),
    )


def workload_from_config(config) -> Workload:
    data, sft, rm, dpo, ppo = (_get(config, k) for k in ("data", "sft", "reward_model", "dpo", "ppo"))
    w = Workload()
    return Workload(
        prompt_len=_get(data, "max_prompt_len", w.prompt_len),
        response_len=_get(data, "max_response_len", w.response_len),
        sft_batch=_get(sft, "batch_size", w.sft_batch),
        sft_accum=_get(sft, "grad_accum_steps", 1),
        rm_batch=_get(rm, "batch_size", w.rm_batch),
        rm_accum=_get(rm, "grad_accum_steps", 1),
        dpo_batch=_get(dpo, "batch_size", w.dpo_batch),
        dpo_accum=_get(dpo, "grad_accum_steps", 1),
        rollout_batch=_get(ppo, "rollout_batch_size", w.rollout_batch),
        ppo_minibatches=_get(ppo, "num_minibatches", 1),
        critic=needs_critic(_get(ppo, "estimator", PPOConfig.estimator)),
    )


def lora_from_config(config) -> LoraConfig | None:
    """The adapters of `config.ppo.lora` when its rank is > 0 (the shared-base PPO run), else None."""
    fields = _get(_get(config, "ppo"), "lora")
    if not _get(fields, "rank", 0):
        return None
    targets = lora.parse_targets(str(_get(fields, "targets", "")))
    return LoraConfig(rank=fields.rank, alpha=_get(fields, "alpha", 2.0 * fields.rank), targets=targets)


def mesh_from_config(config, num_devices: int) -> tuple[int, int, int]:
    mesh = _get(config, "mesh")
    return sharding.mesh_shape(_get(mesh, "data", -1), _get(mesh, "fsdp", 1), _get(mesh, "tensor", 1), num_devices)


def format_plan(stages: dict, mesh_shape, title: str) -> str:
    columns = ("params", "optimizer", "frozen", "kv_cache", "activations", "total")
    lines = [f"{title} on mesh (data, fsdp, tensor) = {tuple(mesh_shape)}, GiB per device:"]
    lines.append(f"  {'stage':<13}" + "".join(f"{c:>12}" for c in columns))
    for stage, values in stages.items():
        lines.append(f"  {stage:<13}" + "".join(f"{values[c] / GIB:>12.3f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="configs/FILE.py[:preset] (an ml_collections config file)")
    p.add_argument("--model", default="", help=f"a preset instead of the config's model: {', '.join(PRESETS)}")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor (overrides config.mesh; -1 fills the rest)")
    p.add_argument("--num_devices", type=int, default=8, help="devices of the planned slice")
    p.add_argument("--table_only", action="store_true", help="only the presets x slices table")
    p.add_argument("--no_table", action="store_true", help="skip the presets x slices table")
    p.add_argument(
        "--lora_rank",
        type=int,
        default=16,
        help="rank of the adapter plan and table (every projection; 0: none); a config's ppo.lora takes precedence",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config) if args.config else None
    workload = workload_from_config(config)
    adapters = lora_from_config(config) or (
        LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank > 0 else None
    )
    if adapters is not None:
        targets = ", ".join(adapters.targets) or "every projection"
        lora_title = f"low-rank adapters (rank {adapters.rank} on {targets}; PPO on one shared base)"
    if not args.table_only:
        model = PRESETS[args.model] if args.model else model_from_config(config if config is not None else {})
        if args.model and config is not None:
            model = model.replace(
                dtype=_get(config.model, "dtype", "float32"),
                remat=_get(config.model, "remat", "none"),
                attention=_get(config.model, "attention", "auto"),
            )
        if args.mesh:
            mesh_shape = sharding.mesh_shape(*(int(x) for x in args.mesh.split(",")), num_devices=args.num_devices)
        else:
            mesh_shape = mesh_from_config(config, args.num_devices)
        title = (
            f"{args.model or args.config or 'default model'} "
            f"(dtype {model.dtype}, remat {model.remat}, attention {model.attention})"
        )
        print(format_plan(plan_memory(model, mesh_shape, workload), mesh_shape, title))
        if adapters is not None:
            print(format_plan(plan_memory(model, mesh_shape, workload, adapters), mesh_shape, f"With {lora_title}"))
        if args.no_table:
            return 0
        print()
    print(
        f"PPO/RTO stage, GiB per device (bf16 compute, remat full, P={workload.prompt_len}, R={workload.response_len}, "
        f"rollout batch {workload.rollout_batch}, 4 sequences per device per update minibatch); the best mesh "
        f"data,fsdp,tensor; fits = total <= {USABLE:.0%} of the device's memory:"
    )
    print(fits_table(workload))
    if adapters is not None:
        print(f"\nThe same with {lora_title}:")
        print(fits_table(workload, adapters=adapters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
