"""Pure jitted steps for SFT, the reward model and DPO: `(state, batch, rng) -> (state, metrics)`.

Batches follow CONTRACT.md: prompt left-padded to P, response right-padded to R, the response
starting at column P; preference batches carry `chosen_*` and `rejected_*` copies of the keys.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rto_jax.objectives import bradley_terry_loss, dpo_loss, last_token_index, sft_loss, token_logprobs
from rto_jax.train.sharding import StepShardings, jit_step
from rto_jax.train.state import TrainState, accumulate_gradients


def response_logits(model, input_ids, attention_mask, positions, response_length: int, temperature: float = 1.0):
    """Float32 logits `[B, R, V]` that predict the R response tokens (columns P-1 .. P+R-2).

    Only those R positions go through the LM head, so the prompt costs no vocabulary projection.
    """
    hidden, _ = model.decoder(input_ids, attention_mask, positions)
    start = input_ids.shape[1] - response_length - 1
    logits = model.logits_from_hidden(jax.lax.dynamic_slice_in_dim(hidden, start, response_length, axis=1))
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(model, input_ids, attention_mask, positions, response_mask, temperature: float = 1.0):
    """Per-token log-probs `[B, R]` of the response tokens (0 where `response_mask` is 0) and the logits."""
    length = response_mask.shape[1]
    logits = response_logits(model, input_ids, attention_mask, positions, length, temperature)
    logp = token_logprobs(logits, input_ids[:, -length:])
    return jnp.where(response_mask > 0, logp, 0.0), logits


def response_scalars(model, input_ids, attention_mask, positions, response_length: int):
    """Scalar-head outputs `[B, R]` at the states before each response token (values V(s_h))."""
    out = model(input_ids, attention_mask=attention_mask, positions=positions)
    return out[:, input_ids.shape[1] - response_length - 1 : -1]


def sequence_scores(model, input_ids, attention_mask, positions, response_mask):
    """Scalar head read at each row's last real response token (its EOS): `[B]` float32."""
    out = model(input_ids, attention_mask=attention_mask, positions=positions)
    column = input_ids.shape[1] - response_mask.shape[1] + jnp.maximum(last_token_index(response_mask), 0)
    return jnp.take_along_axis(out, column[:, None], axis=1)[:, 0]


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


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum_steps: int = 1


def make_sft_step(config: StepConfig = StepConfig(), shardings: StepShardings | None = None):
    """SFT: masked cross-entropy of the response tokens. batch: input_ids, attention_mask, positions, response_mask.

    Every step factory returns `jax.jit(step, donate_argnums=0)`; with `shardings`
    (`rto_jax.train.sharding.step_shardings(state, mesh)`) the jit has explicit in/out shardings: the
    state's tree, the batch split over data x fsdp, rng and metrics replicated.
    """

    def loss_fn(params, batch, graphdef):
        model = nnx.merge(graphdef, params)
        length = batch["response_mask"].shape[1]
        logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["positions"], length)
        return sft_loss(logits, batch["input_ids"][:, -length:], batch["response_mask"])

    def step(state: TrainState, batch: dict, rng):
        del rng  # deterministic: dropout is off everywhere
        loss, metrics, grads = accumulate_gradients(
            lambda p, b: loss_fn(p, b, state.graphdef), state.params, batch, config.grad_accum_steps
        )
        return state.apply_gradients(grads), {**metrics, "loss": loss, "grad_norm": _global_norm(grads)}

    return jit_step(step, shardings)


def make_reward_model_step(
    config: StepConfig = StepConfig(), margin: bool = False, shardings: StepShardings | None = None
):
    """Bradley-Terry on scores at the last response token. batch: a preference batch (+ `margin` `[B]`)."""

    def loss_fn(params, batch, graphdef):
        model = nnx.merge(graphdef, params)
        scores = sequence_scores(model, *_pair_inputs(batch))
        chosen, rejected = jnp.split(scores, 2)
        return bradley_terry_loss(chosen, rejected, batch["margin"] if margin else None)

    def step(state: TrainState, batch: dict, rng):
        del rng
        loss, metrics, grads = accumulate_gradients(
            lambda p, b: loss_fn(p, b, state.graphdef), state.params, batch, config.grad_accum_steps
        )
        return state.apply_gradients(grads), {**metrics, "loss": loss, "grad_norm": _global_norm(grads)}

    return jit_step(step, shardings)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1


def sequence_logps(graphdef, params, batch):
    """Summed response log-probs of chosen and rejected `[B]` each, and their token counts."""
    model = nnx.merge(graphdef, params)
    input_ids, attention_mask, positions, response_mask = _pair_inputs(batch)
    logp, _ = response_logprobs(model, input_ids, attention_mask, positions, response_mask)
    sums, lengths = jnp.sum(logp, axis=1), jnp.sum(response_mask, axis=1)
    return jnp.split(sums, 2), jnp.split(lengths, 2)


@functools.partial(jax.jit, static_argnums=0)
def precompute_reference_logps(graphdef, params, batch) -> dict:
    """`ref_chosen_logps`, `ref_rejected_logps` `[B]` to add to a DPO batch, so the step skips the reference."""
    (chosen, rejected), _ = sequence_logps(graphdef, params, batch)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def make_dpo_step(config: DPOConfig = DPOConfig(), shardings: StepShardings | None = None):
    """DPO. The reference log-probs come from the batch (`ref_chosen_logps`, `ref_rejected_logps`, precomputed
    once) or, when absent, from `state.frozen["ref"]` (params with the policy's graphdef) inside the step."""

    def loss_fn(params, batch, state):
        (chosen, rejected), (chosen_len, rejected_len) = sequence_logps(state.graphdef, params, batch)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            (ref_chosen, ref_rejected), _ = sequence_logps(state.graphdef, state.frozen["ref"], batch)
            ref_chosen, ref_rejected = jax.lax.stop_gradient(ref_chosen), jax.lax.stop_gradient(ref_rejected)
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=config.beta,
            loss_type=config.loss_type,
            label_smoothing=config.label_smoothing,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
        )

    def step(state: TrainState, batch: dict, rng):
        del rng
        loss, metrics, grads = accumulate_gradients(
            lambda p, b: loss_fn(p, b, state), state.params, batch, config.grad_accum_steps
        )
        return state.apply_gradients(grads), {**metrics, "loss": loss, "grad_norm": _global_norm(grads)}

    return jit_step(step, shardings)


def _global_norm(grads):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
