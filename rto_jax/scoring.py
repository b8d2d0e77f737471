"""What a model says about a response, in the CONTRACT.md layout (prompt left-padded to P, response
right-padded to R from column P). Shared by training (rto_jax/train) and evaluation (rto_jax/eval);
pure functions of a model and arrays, jittable.

    response_logits(model, ids, mask, positions, R)        [B, R, V] logits predicting the response
    response_logprobs(model, ids, mask, positions, rmask)   [B, R] log-probs of the response tokens
    response_scalars(model, ids, mask, positions, R)        [B, R] scalar head before each response token
    sequence_scores(model, ids, mask, positions, rmask)     [B] scalar head at the last response token
    token_reward_logprobs(models, ids, mask, positions, rmask, tau)
                                                            {name: [B, R], untempered(name): [B, R]}
"""

import jax
import jax.numpy as jnp

from rto_jax.objectives import last_token_index, token_logprobs
from rto_jax.objectives.token_rewards import untempered


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


def token_reward_logprobs(models: dict, input_ids, attention_mask, positions, response_mask, temperature: float):
    """The log-probs a token reward reads (rto_jax/objectives/token_rewards.py), one forward pass per
    model: `{name: [B, R] at the rollout temperature, untempered(name): [B, R] at temperature 1}`
    for each of `models` {name: language model}, 0 where `response_mask` is 0.

    Also returns `models`' first entry's tempered logits `[B, R, V]` (the policy's, for its entropy).
    """
    logps, first_logits = {}, None
    targets = input_ids[:, -response_mask.shape[1] :]
    for name, model in models.items():
        logits = response_logits(model, input_ids, attention_mask, positions, response_mask.shape[1])
        tempered = logits / temperature if temperature != 1.0 else logits
        first_logits = tempered if first_logits is None else first_logits
        logps[name] = jnp.where(response_mask > 0, token_logprobs(tempered, targets), 0.0)
        # At temperature 1 both are the same array: no second log-softmax.
        logps[untempered(name)] = (
            logps[name] if temperature == 1.0 else jnp.where(response_mask > 0, token_logprobs(logits, targets), 0.0)
        )
    return logps, first_logits
