"""The LM head over vocabulary slices (rto_jax/scoring.py) against the whole-vocabulary head."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.models import CausalLM, ModelConfig
from rto_jax.objectives import entropy_from_logits, token_logprobs
from rto_jax.scoring import head_token_stats

VOCAB, D = 300, 32
TEMPERATURES = (0.7, 1.0)


def _model(tied: bool):
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        tie_word_embeddings=tied,
    )
    return nnx.split(CausalLM(cfg, nnx.Rngs(0)))


def _inputs():
    hidden = 3.0 * jax.random.normal(jax.random.key(1), (2, 5, D))  # peaked distributions, far from uniform
    targets = jax.random.randint(jax.random.key(2), (2, 5), 0, VOCAB)
    return hidden, targets


def _stats(graphdef, params, chunk):
    hidden, targets = _inputs()
    (tempered, plain), entropy = head_token_stats(nnx.merge(graphdef, params), hidden, targets, TEMPERATURES, chunk)
    return tempered, plain, entropy


@pytest.mark.parametrize("tied", [True, False])
def test_whole_head_is_the_plain_log_softmax(tied):
    graphdef, params = _model(tied)
    hidden, targets = _inputs()
    logits = nnx.merge(graphdef, params).logits_from_hidden(hidden)
    tempered, plain, entropy = _stats(graphdef, params, 0)
    np.testing.assert_allclose(tempered, token_logprobs(logits / 0.7, targets), atol=1e-6)
    np.testing.assert_allclose(plain, token_logprobs(logits, targets), atol=1e-6)
    np.testing.assert_allclose(entropy, entropy_from_logits(logits / 0.7), atol=1e-6)


# 64 and 128 do not divide 300 (the last slice is shifted back and overlaps), 100 does, 299 is two slices.
@pytest.mark.parametrize("chunk", [64, 100, 128, 299])
@pytest.mark.parametrize("tied", [True, False])
def test_vocabulary_slices_equal_the_whole_head_with_gradients(tied, chunk):
    graphdef, params = _model(tied)
    for whole, sliced in zip(_stats(graphdef, params, 0), _stats(graphdef, params, chunk), strict=True):
        np.testing.assert_allclose(sliced, whole, atol=2e-5, rtol=1e-5)

    def loss(p, c):
        tempered, plain, entropy = _stats(graphdef, p, c)
        return jnp.sum(tempered * 1.0) + jnp.sum(plain * 0.5) + jnp.sum(entropy * 0.3)

    whole, sliced = jax.grad(loss)(params, 0), jax.grad(loss)(params, chunk)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4), whole, sliced)


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _shapes(sub)


@pytest.mark.parametrize("with_grad", [False, True])
def test_sliced_head_never_builds_the_whole_logits(with_grad):
    graphdef, params = _model(True)

    def fn(p):
        return jnp.sum(_stats(graphdef, p, 64)[0])

    jaxpr = jax.make_jaxpr(jax.grad(fn) if with_grad else fn)(params).jaxpr
    shapes = set(_shapes(jaxpr))
    assert not [s for s in shapes if len(s) >= 3 and s[-1] == VOCAB], shapes  # no [B, R, V]
    assert (2, 5, 64) in shapes  # one slice's logits
    whole = set(_shapes(jax.make_jaxpr(lambda p: jnp.sum(_stats(graphdef, p, 0)[0]))(params).jaxpr))
    assert (2, 5, VOCAB) in whole  # the check would see the whole logits if they were built
