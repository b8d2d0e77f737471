"""What a model says about a response, in the CONTRACT.md layout (prompt left-padded to P, response
right-padded to R from column P). Shared by training (rto_jax/train) and evaluation (rto_jax/eval);
pure functions of a model and arrays, jittable.

    response_hidden(model, ids, mask, positions, R)         [B, R, d] final hidden states predicting the response
    response_logits(model, ids, mask, positions, R)        [B, R, V] logits predicting the response
    head_token_stats(model, hidden, targets, temps, chunk)  ([B, R] log-prob per temperature, [B, R] entropy)
    response_logprobs(model, ids, mask, positions, rmask)   [B, R] log-probs of the response tokens, [B, R] entropy
    response_scalars(model, ids, mask, positions, R)        [B, R] scalar head before each response token
    sequence_scores(model, ids, mask, positions, rmask)     [B] scalar head at the last response token
    token_reward_logprobs(graphdef, params, ids, mask, positions, rmask, tau)
                                                            {name: [B, R], untempered(name): [B, R]}

`vocab_chunk` (> 0 and < V): the LM head runs over vocabulary slices of that size inside a
rematerialized scan with an online log-sum-exp, so no `[B, R, V]` array exists in the forward or the
backward pass (the largest is `[B, R, vocab_chunk]`); 0 computes the whole `[B, R, V]` logits at once.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from rto_jax.objectives import entropy_from_logits, last_token_index, token_logprobs
from rto_jax.objectives.token_rewards import untempered


def response_hidden(model, input_ids, attention_mask, positions, response_length: int):
    """Final hidden states `[B, R, d]` at columns P-1 .. P+R-2 (each predicts the next response token)."""
    hidden, _ = model.decoder(input_ids, attention_mask, positions)
    start = input_ids.shape[1] - response_length - 1
    return jax.lax.dynamic_slice_in_dim(hidden, start, response_length, axis=1)


def response_logits(model, input_ids, attention_mask, positions, response_length: int, temperature: float = 1.0):
    """Float32 logits `[B, R, V]` that predict the R response tokens (columns P-1 .. P+R-2).

    Only those R positions go through the LM head, so the prompt costs no vocabulary projection.
    """
    logits = model.logits_from_hidden(response_hidden(model, input_ids, attention_mask, positions, response_length))
    return logits / temperature if temperature != 1.0 else logits


def head_token_stats(model, hidden, targets, temperatures=(1.0,), vocab_chunk: int = 0):
    """The LM head's view of `targets` `[B, R]` from `hidden` `[B, R, d]`: a tuple with, for each of
    `temperatures`, the log-probs `[B, R]` of the targets under softmax(logits / t), and the entropy
    `[B, R]` of softmax(logits / temperatures[0]). Float32. See the module docstring for `vocab_chunk`.
    """
    vocab = model.config.vocab_size
    if not vocab_chunk or vocab_chunk >= vocab:
        logits = model.logits_from_hidden(hidden)
        scaled = [logits / t if t != 1.0 else logits for t in temperatures]
        return tuple(token_logprobs(x, targets) for x in scaled), entropy_from_logits(scaled[0])
    # Online log-sum-exp over slices [s, s + chunk): per temperature a running max m, sum of exp(y - m),
    # and (first temperature) sum of exp(y - m) * y for the entropy. The last slice is shifted back to
    # end at V; its columns below the nominal start were already counted and are masked out.
    neg = jnp.finfo(jnp.float32).min
    targets = targets.astype(jnp.int32)

    @jax.checkpoint  # the backward recomputes each slice's logits instead of storing them
    def body(carry, nominal):
        start = jnp.minimum(nominal, vocab - vocab_chunk)
        ids = start + jnp.arange(vocab_chunk)
        fresh = ids >= nominal
        z = model.logits_for_vocab_slice(hidden, start, vocab_chunk)  # [B, R, chunk]
        target_logit = carry["target"] + jnp.sum(jnp.where((ids == targets[..., None]) & fresh, z, 0.0), -1)
        new = {"target": target_logit, "max": [], "sum": [], "moment": carry["moment"]}
        for i, t in enumerate(temperatures):
            y = jnp.where(fresh, z / t, neg)
            m_old = carry["max"][i]
            m = jax.lax.stop_gradient(jnp.maximum(m_old, jnp.max(y, axis=-1)))  # a shift: exact without its grad
            decay, weights = jnp.exp(m_old - m), jnp.exp(y - m[..., None])
            new["max"].append(m)
            new["sum"].append(carry["sum"][i] * decay + jnp.sum(weights, -1))
            if i == 0:
                new["moment"] = carry["moment"] * decay + jnp.sum(weights * jnp.where(fresh, y, 0.0), -1)
        return new, None

    zeros = jnp.zeros(targets.shape, jnp.float32)
    init = {
        "target": zeros,
        "max": [jnp.full(targets.shape, neg)] * len(temperatures),
        "sum": [zeros] * len(temperatures),
        "moment": zeros,
    }
    nominal_starts = jnp.arange(0, vocab, vocab_chunk, dtype=jnp.int32)
    out, _ = jax.lax.scan(body, init, nominal_starts)
    lse = [m + jnp.log(s) for m, s in zip(out["max"], out["sum"], strict=True)]
    logps = tuple(out["target"] / t - lse_t for t, lse_t in zip(temperatures, lse, strict=True))
    entropy = lse[0] - out["moment"] / out["sum"][0]
    return logps, entropy


def response_logprobs(
    model, input_ids, attention_mask, positions, response_mask, temperature: float = 1.0, vocab_chunk: int = 0
):
    """Per-token log-probs `[B, R]` of the response tokens at `temperature` (0 where `response_mask` is
    0) and the entropy `[B, R]` of the tempered next-token distribution."""
    length = response_mask.shape[1]
    hidden = response_hidden(model, input_ids, attention_mask, positions, length)
    (logp,), entropy = head_token_stats(model, hidden, input_ids[:, -length:], (temperature,), vocab_chunk)
    return jnp.where(response_mask > 0, logp, 0.0), entropy


def response_scalars(model, input_ids, attention_mask, positions, response_length: int):
    """Scalar-head outputs `[B, R]` at the states before each response token (values V(s_h))."""
    out = model(input_ids, attention_mask=attention_mask, positions=positions)
    return out[:, input_ids.shape[1] - response_length - 1 : -1]


def sequence_scores(model, input_ids, attention_mask, positions, response_mask):
    """Scalar head read at each row's last real response token (its EOS): `[B]` float32."""
    out = model(input_ids, attention_mask=attention_mask, positions=positions)
    column = input_ids.shape[1] - response_mask.shape[1] + jnp.maximum(last_token_index(response_mask), 0)
    return jnp.take_along_axis(out, column[:, None], axis=1)[:, 0]


def token_reward_logprobs(
    graphdef,
    params: dict,
    input_ids,
    attention_mask,
    positions,
    response_mask,
    temperature: float,
    *,
    vocab_chunk: int = 0,
    stacked: bool = False,
):
    """The log-probs a token reward reads (rto_jax/objectives/token_rewards.py) for each of `params`
    {name: parameters of a language model on `graphdef`}: `{name: [B, R] at the rollout temperature,
    untempered(name): [B, R] at temperature 1}`, 0 where `response_mask` is 0.

    stacked: the models run as one forward pass vmapped over their stacked parameters (one program
    for all of them) instead of one pass each; the results are the same.
    """
    length = response_mask.shape[1]
    targets = input_ids[:, -length:]
    temps = (temperature,) if temperature == 1.0 else (temperature, 1.0)

    def one(model_params):
        model = nnx.merge(graphdef, model_params)
        hidden = response_hidden(model, input_ids, attention_mask, positions, length)
        logps, _ = head_token_stats(model, hidden, targets, temps, vocab_chunk)
        return tuple(jnp.where(response_mask > 0, x, 0.0) for x in logps)

    names = list(params)
    if stacked and len(names) > 1:
        batched = jax.vmap(one)(jax.tree.map(lambda *xs: jnp.stack(xs), *(params[n] for n in names)))
        results = {name: tuple(x[i] for x in batched) for i, name in enumerate(names)}
    else:
        results = {name: one(params[name]) for name in names}
    logps = {}
    for name, values in results.items():
        logps[name] = values[0]
        logps[untempered(name)] = values[-1]  # at temperature 1 both keys hold the same array
    return logps
