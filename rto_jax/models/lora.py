"""Low-rank adapters (LoRA, Hu et al. 2021) on the dense projections of our decoders.

A targeted `Dense` computes `y = x @ W + (alpha / r) * dropout(x) @ A @ B` with `A` `[in, r]`, `B`
`[r, out]`, both float32 `nnx.LoRAParam`s whatever the compute dtype (the base kernel may be cast to
bfloat16; the adapter path runs in float32 and is added in the compute dtype). `B` starts at zero, so a
fresh adapter leaves the logits unchanged; `A` is uniform in +-1/sqrt(in) (PEFT's default init).
Logical axes: `A` (the kernel's input axis, `lora_rank`), `B` (`lora_rank`, the kernel's output axis), so
adapters shard like the kernel they sit on (`lora_rank` is replicated).

Two switches are read while a step is traced (context variables, like the activation constraint):
`disabled()` runs the bare base (the reference policy of an adapter run is the base without its adapter,
no second copy), and `dropout_rng(key)` turns adapter dropout on (off by default: evaluation, scoring
and sampling never drop). Each adapter call draws its own mask from the key, the layer index and its
place in the block, so the loop and scan layer layouts drop the same units.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# Our module names of the projections adapters may target, per architecture (HF's names are the same
# for Llama; PEFT's target_modules uses them as they are).
PROJECTIONS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters on the projections named in `targets` (empty: every attention and MLP projection)."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, as in PEFT (no rsLoRA)
    dropout: float = 0.0  # on the adapter's input, while a `dropout_rng` is set (training)
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout}: must be in [0, 1)")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def target_names(self, arch: str) -> tuple[str, ...]:
        """The targeted projections of `arch`; an unknown name is an error naming the valid ones."""
        valid = PROJECTIONS[arch]
        unknown = [t for t in self.targets if t not in valid]
        if unknown:
            raise ValueError(f"LoraConfig.targets: {unknown} are not projections of {arch!r}; valid: {list(valid)}")
        return self.targets or valid


_ENABLED: contextvars.ContextVar = contextvars.ContextVar("lora_enabled", default=True)
_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("lora_dropout", default=None)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def disabled():
    """Inside, adapters are skipped: the model computes its bare base."""
    return _setting(_ENABLED, False)


def dropout_rng(key):
    """Inside, adapters with dropout > 0 drop their input units with masks drawn from `key`."""
    return _setting(_DROPOUT, key)


def layer_scope(index):
    """Folds the layer index (traced under scan) into the dropout key, so each layer draws its own masks."""
    key = _DROPOUT.get()
    return _setting(_DROPOUT, None if key is None else jax.random.fold_in(key, index))


def enabled() -> bool:
    return _ENABLED.get()


def init_a(key, shape):
    """A fresh `lora_a` of `shape` (`[..., in, r]`): uniform in +-1/sqrt(in), PEFT's default."""
    bound = 1.0 / shape[-2] ** 0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def parse_targets(text: str) -> tuple[str, ...]:
    """`LoraConfig.targets` from a config's comma-separated string ('' = every projection)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def dropout(x, rate: float, site: int):
    """`x` with units dropped at `rate` (and the rest scaled by 1 / (1 - rate)) while a `dropout_rng` is set."""
    key = _DROPOUT.get()
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


# What an adapter run trains: the adapters and, on a scalar-head model (reward model, critic), the head,
# which is new and has no base to adapt. `TrainState.create(model, tx, trainable=TRAINABLE)`.
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))


def adapter_state(model: nnx.Module) -> nnx.State:
    """The adapters of `model` (its `LoRAParam`s)."""
    return nnx.state(model, nnx.LoRAParam)


def count_adapter_parameters(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(adapter_state(model)))
