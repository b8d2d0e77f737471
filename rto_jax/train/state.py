"""Train state pytree, optimizers and gradient accumulation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


class TrainState(struct.PyTreeNode):
    """Parameters, optimizer state and step of one trained model; `frozen` holds fixed params (e.g. DPO's ref).

    `params` are the trained variables; `base`, when the model is trained only in part (low-rank
    adapters over a frozen base: `create(..., trainable=...)`), holds the rest of the model's state,
    which gets neither gradients nor optimizer state. The NNX graphdef and the optax transformation are
    static: `state.merge(params)` rebuilds the model inside a step.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None
    base: Any = None
    graphdef: nnx.GraphDef = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        frozen: Any = None,
        trainable: Any = None,
        base_dtype: Any = None,
    ) -> "TrainState":
        """trainable: an nnx filter of the variables to train (e.g. `rto_jax.models.lora.TRAINABLE`); None:
        all of them. base_dtype: the floating dtype the rest (`base`) is stored in; None keeps it."""
        if trainable is None:
            graphdef, params = nnx.split(model)
            base = None
        else:
            graphdef, params, base = nnx.split(model, trainable, ...)
            if base_dtype is not None:
                cast = lambda x: x.astype(base_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
                base = jax.tree.map(cast, base)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            frozen=frozen,
            base=base,
            graphdef=graphdef,
            tx=tx,
        )

    def merge(self, params) -> nnx.Module:
        """The model with `params` in place of the trained variables (the base, if any, as it is)."""
        if self.base is None:
            return nnx.merge(self.graphdef, params)
        return nnx.merge(self.graphdef, params, self.base)

    def model(self) -> nnx.Module:
        return self.merge(self.params)

    def apply_gradients(self, grads) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    schedule: str = "cosine"  # "cosine", "linear" (decay to 0) or "constant", after linear warmup
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999  # PyTorch's default, as in the N+ and RTO code
    eps: float = 1e-5  # N+ uses 1e-5
    max_grad_norm: float = 1.0  # global-norm clip; <= 0 disables


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, with linear warmup then cosine/linear decay or a constant rate."""
    lr, warmup = config.learning_rate, config.warmup_steps
    decay_steps = max(config.total_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif config.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"OptimizerConfig.schedule={config.schedule!r}: expected 'cosine', 'linear' or 'constant'")
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup else decay
    parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))
    return optax.chain(*parts)


def accumulate_gradients(loss_fn: Callable, params, batch: dict, num_micro_batches: int, rng=None):
    """Mean loss, metrics and gradients of `loss_fn(params, batch) -> (loss, metrics)` over micro-batches.

    With one micro-batch this is a plain `value_and_grad`; otherwise the batch's leading axis is split
    and a `lax.scan` sums the gradients, so peak activation memory is that of one micro-batch.
    rng: when given, `loss_fn(params, batch, key)` is called with a key of its own for each micro-batch
    (`rng` folded with the micro-batch index; `rng` itself when there is one micro-batch).
    """
    with_key = loss_fn if rng is not None else (lambda p, b, key: loss_fn(p, b))
    grad_fn = jax.value_and_grad(with_key, has_aux=True)
    if num_micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, metrics, grads
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % num_micro_batches:
        raise ValueError(f"batch size {size} is not divisible by grad_accum_steps={num_micro_batches}")
    micro = jax.tree.map(lambda x: x.reshape((num_micro_batches, size // num_micro_batches) + x.shape[1:]), batch)

    def body(acc, xs):
        index, micro_batch = xs
        key = None if rng is None else jax.random.fold_in(rng, index)
        (loss, metrics), grads = grad_fn(params, micro_batch, key)
        return jax.tree.map(jnp.add, acc, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, metrics) = jax.lax.scan(body, zeros, (jnp.arange(num_micro_batches), micro))
    scale = 1.0 / num_micro_batches
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics), jax.tree.map(lambda g: g * scale, grads)
