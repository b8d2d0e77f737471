"""One step factory for SFT, the reward model and DPO: `make_train_step(loss)` ->
`(state, batch, rng) -> (state, metrics)`, jitted; the three are losses given to it.

Batches follow CONTRACT.md: prompt left-padded to P, response right-padded to R, the response
starting at column P; preference batches carry `chosen_*` and `rejected_*` copies of the keys.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rto_jax.models import lora
from rto_jax.objectives import bradley_terry_loss, dpo_loss, sft_loss
from rto_jax.scoring import response_logits, response_logprobs, sequence_scores
from rto_jax.train.sharding import StepShardings, jit_step
from rto_jax.train.state import TrainState, accumulate_gradients


def _pair(batch: dict, key: str):
    """Stacks the chosen and rejected versions of `key` into one `[2B, ...]` array (one forward pass)."""
    return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)


def _pair_inputs(batch):
    return (
        _pair(batch, "input_ids"),
        _pair(batch, "attention_mask"),
        _pair(batch, "positions"),
        _pair(batch, "response_mask"),
    )


# ----------------------------------------------------------------------------------------------
# Losses: `loss(params, batch, state) -> (scalar loss, metrics)`; frozen dataclasses, hashable by value.


@dataclasses.dataclass(frozen=True)
class SFTLoss:
    """Masked cross-entropy of the response tokens. batch: input_ids, attention_mask, positions, response_mask."""

    def __call__(self, params, batch, state):
        model = state.merge(params)
        length = batch["response_mask"].shape[1]
        logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["positions"], length)
        return sft_loss(logits, batch["input_ids"][:, -length:], batch["response_mask"])


@dataclasses.dataclass(frozen=True)
class RewardModelLoss:
    """Bradley-Terry on scores at the last response token. batch: a preference batch (+ `margin` `[B]`)."""

    margin: bool = False

    def __call__(self, params, batch, state):
        scores = sequence_scores(state.merge(params), *_pair_inputs(batch))
        chosen, rejected = jnp.split(scores, 2)
        return bradley_terry_loss(chosen, rejected, batch["margin"] if self.margin else None)


@dataclasses.dataclass(frozen=True)
class DPOLoss:
    """DPO. The reference log-probs come from the batch (`ref_chosen_logps`, `ref_rejected_logps`,
    precomputed once) or, when absent, from `state.frozen["ref"]` (params with the policy's graphdef),
    or, for an adapter policy without one, from its base with the adapters off."""

    beta: float = 0.1  # the RTO paper's DPO stage
    loss_type: str = "sigmoid"  # 'sigmoid', 'ipo', 'hinge' or 'robust'
    label_smoothing: float = 0.0  # eps of conservative / robust DPO

    def __call__(self, params, batch, state):
        (chosen, rejected), (chosen_len, rejected_len) = sequence_logps(state.merge(params), batch)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            if state.frozen is not None and "ref" in state.frozen:
                (ref_chosen, ref_rejected), _ = sequence_logps(nnx.merge(state.graphdef, state.frozen["ref"]), batch)
            else:
                with lora.disabled():
                    (ref_chosen, ref_rejected), _ = sequence_logps(state.merge(params), batch)
            ref_chosen, ref_rejected = jax.lax.stop_gradient(ref_chosen), jax.lax.stop_gradient(ref_rejected)
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
        )


def sequence_logps(model, batch):
    """Summed response log-probs of chosen and rejected `[B]` each, and their token counts."""
    input_ids, attention_mask, positions, response_mask = _pair_inputs(batch)
    logp, _ = response_logprobs(model, input_ids, attention_mask, positions, response_mask)
    sums, lengths = jnp.sum(logp, axis=1), jnp.sum(response_mask, axis=1)
    return jnp.split(sums, 2), jnp.split(lengths, 2)


@functools.partial(jax.jit, static_argnums=0)
def precompute_reference_logps(graphdef, params, batch) -> dict:
    """`ref_chosen_logps`, `ref_rejected_logps` `[B]` to add to a DPO batch, so the step skips the reference."""
    (chosen, rejected), _ = sequence_logps(nnx.merge(graphdef, params), batch)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


@functools.partial(jax.jit, static_argnums=0)
def loss_metrics(loss, state: TrainState, batch: dict) -> dict:
    """`loss`'s metrics (and the value as `loss`) on `batch` at `state.params`, no gradient: held-out evaluation."""
    value, metrics = loss(state.params, batch, state)
    return {**metrics, "loss": value}


# ----------------------------------------------------------------------------------------------
# The one step factory.


def make_train_step(loss, grad_accum_steps: int = 1, shardings: StepShardings | None = None):
    """`jax.jit(step, donate_argnums=0)` of `step(state, batch, rng) -> (state, metrics)` minimizing `loss`.

    loss: `loss(params, batch, state) -> (scalar, metrics)`, e.g. SFTLoss(), RewardModelLoss(),
      DPOLoss(beta=0.1). grad_accum_steps: micro-batches per step (the batch is split on its first axis).
    With `shardings` (`rto_jax.train.sharding.step_shardings(state, mesh)`) the jit has explicit in/out
    shardings: the state's tree, the batch split over data x fsdp, rng and metrics replicated.
    """

    def loss_with_dropout(params, batch, key, state):
        # Adapter dropout (the only dropout of our models) draws from the step's key; off elsewhere.
        with lora.dropout_rng(key):
            return loss(params, batch, state)

    def step(state: TrainState, batch: dict, rng):
        fn = lambda p, b, key=None: loss_with_dropout(p, b, key, state)  # no rng: no key, no dropout
        value, metrics, grads = accumulate_gradients(fn, state.params, batch, grad_accum_steps, rng)
        return state.apply_gradients(grads), {**metrics, "loss": value, "grad_norm": optax.tree.norm(grads)}

    return jit_step(step, shardings)
