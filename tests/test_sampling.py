"""The KV-cache sampler against the full forward pass of the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.models import CausalLM, ModelConfig
from rto_jax.sampling import SamplingConfig, filter_logits, response_inputs, sample

VOCAB, PAD, NEW = 50, 0, 8


def _model(arch="llama", scan_layers=False):
    cfg = ModelConfig(
        arch=arch,
        model_type="llama" if arch == "llama" else "gpt_neox",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if arch == "llama" else 4,
        head_dim=8,
        rotary_fraction=1.0 if arch == "llama" else 0.5,
        scan_layers=scan_layers,
    )
    # A larger init than HF's 0.02 gives peaked, prompt-dependent next-token distributions.
    model = CausalLM(cfg, nnx.Rngs(0))
    for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        if var[...].ndim == 2:
            var[...] = var[...] * 10
    return model


def _prompts(lengths, total):
    rng = np.random.default_rng(0)
    ids = np.full((len(lengths), total), PAD, np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n :] = rng.integers(2, VOCAB, n)
        mask[row, total - n :] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def _teacher_forced_logprobs(model, prompt_ids, prompt_mask, samples, temperature):
    input_ids, attention_mask, positions = response_inputs(prompt_ids, prompt_mask, samples)
    logits = model(input_ids, attention_mask=attention_mask, positions=positions) / temperature
    prompt_len = prompt_ids.shape[1]
    logp = jax.nn.log_softmax(logits[:, prompt_len - 1 : -1], axis=-1)
    return jnp.take_along_axis(logp, samples.tokens[..., None], axis=-1)[..., 0] * samples.response_mask


@pytest.mark.parametrize("arch,scan_layers", [("llama", False), ("llama", True), ("gpt_neox", False)])
def test_greedy_equals_argmax_of_full_forward(arch, scan_layers):
    model = _model(arch, scan_layers)
    prompt_ids, prompt_mask = _prompts([6, 3, 1], 6)
    config = SamplingConfig(max_new_tokens=NEW, eos_id=1, pad_id=PAD, greedy=True)
    out = sample(model, prompt_ids, prompt_mask, jax.random.key(0), config)
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    for t in range(NEW):  # the reference: re-run the whole sequence, no cache
        logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        expected = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
        live = np.asarray(out.response_mask[:, t]) > 0
        np.testing.assert_array_equal(np.asarray(out.tokens[:, t])[live], expected[live])
        ids = np.concatenate([ids, np.asarray(out.tokens[:, t : t + 1])], 1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int32)], 1)
    np.testing.assert_allclose(
        out.logprobs, _teacher_forced_logprobs(model, prompt_ids, prompt_mask, out, 1.0), atol=1e-5
    )


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9)])
def test_sampled_logprobs_equal_teacher_forced(temperature, top_k, top_p):
    model = _model()
    prompt_ids, prompt_mask = _prompts([5, 2, 4, 1], 5)
    config = SamplingConfig(max_new_tokens=NEW, eos_id=1, pad_id=PAD, temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample(model, prompt_ids, prompt_mask, jax.random.key(1), config)
    assert out.logprobs.dtype == jnp.float32
    expected = _teacher_forced_logprobs(model, prompt_ids, prompt_mask, out, temperature)
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-5)
    # What PPO reuses instead of scoring the policy again: the log-probs at temperature 1 and the
    # entropy of the tempered (unfiltered) distribution, as a teacher-forced pass gives them.
    untempered = _teacher_forced_logprobs(model, prompt_ids, prompt_mask, out, 1.0)
    np.testing.assert_allclose(out.untempered_logprobs, untempered, atol=1e-5)
    input_ids, attention_mask, positions = response_inputs(prompt_ids, prompt_mask, out)
    logits = model(input_ids, attention_mask=attention_mask, positions=positions)[:, prompt_ids.shape[1] - 1 : -1]
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1) * out.response_mask
    np.testing.assert_allclose(out.entropy, entropy, atol=1e-4)


def test_rows_that_hit_eos_are_masked_and_padded():
    model = _model()
    prompt_ids, prompt_mask = _prompts([4, 4, 2], 4)
    free = sample(
        model,
        prompt_ids,
        prompt_mask,
        jax.random.key(0),
        SamplingConfig(max_new_tokens=NEW, eos_id=VOCAB + 1, pad_id=PAD, greedy=True),
    )
    eos = int(free.tokens[0, 2])  # make row 0's third greedy token the EOS
    out = sample(
        model,
        prompt_ids,
        prompt_mask,
        jax.random.key(0),
        SamplingConfig(max_new_tokens=NEW, eos_id=eos, pad_id=PAD, greedy=True),
    )
    tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    lengths = []
    for row in range(len(tokens)):
        hits = np.flatnonzero(np.asarray(free.tokens[row]) == eos)
        length = hits[0] + 1 if len(hits) else NEW
        lengths.append(length)
        np.testing.assert_array_equal(mask[row], (np.arange(NEW) < length).astype(np.float32))
        np.testing.assert_array_equal(tokens[row, :length], np.asarray(free.tokens[row, :length]))
        assert (tokens[row, length:] == PAD).all() and (np.asarray(out.logprobs[row, length:]) == 0).all()
    assert mask[0].sum() <= 3
    # The loop ran until the last row's EOS (or to R), not one step more or less.
    assert int(out.steps) == max(lengths)


def test_loop_stops_when_every_row_is_done():
    model = _model()
    prompt_ids, prompt_mask = _prompts([3], 3)
    free = sample(
        model,
        prompt_ids,
        prompt_mask,
        jax.random.key(0),
        SamplingConfig(max_new_tokens=NEW, eos_id=VOCAB + 1, pad_id=PAD, greedy=True),
    )
    out = sample(
        model,
        prompt_ids,
        prompt_mask,
        jax.random.key(0),
        SamplingConfig(max_new_tokens=NEW, eos_id=int(free.tokens[0, 0]), pad_id=PAD, greedy=True),
    )
    np.testing.assert_array_equal(np.asarray(out.response_mask[0]), [1] + [0] * (NEW - 1))
    # One decode step, not R: the loop itself stopped (the mask alone looks the same either way).
    assert int(free.steps) == NEW and int(out.steps) == 1


def test_top_k_one_equals_greedy():
    model = _model()
    prompt_ids, prompt_mask = _prompts([5, 3], 5)
    greedy = sample(
        model,
        prompt_ids,
        prompt_mask,
        jax.random.key(0),
        SamplingConfig(max_new_tokens=NEW, eos_id=1, pad_id=PAD, greedy=True),
    )
    top1 = sample(
        model,
        prompt_ids,
        prompt_mask,
        jax.random.key(7),
        SamplingConfig(max_new_tokens=NEW, eos_id=1, pad_id=PAD, top_k=1),
    )
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(top1.tokens))


def test_left_padded_batch_equals_single_rows():
    model = _model()
    lengths = [6, 2, 4]
    prompt_ids, prompt_mask = _prompts(lengths, 6)
    config = SamplingConfig(max_new_tokens=NEW, eos_id=1, pad_id=PAD, greedy=True)
    batch = sample(model, prompt_ids, prompt_mask, jax.random.key(0), config)
    for row, n in enumerate(lengths):
        single = sample(
            model, prompt_ids[row : row + 1, 6 - n :], prompt_mask[row : row + 1, 6 - n :], jax.random.key(0), config
        )
        np.testing.assert_array_equal(np.asarray(single.tokens[0]), np.asarray(batch.tokens[row]))
        np.testing.assert_allclose(np.asarray(single.logprobs[0]), np.asarray(batch.logprobs[row]), atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_prompt_answered_n_times_is_prefilled_once_with_the_same_samples(scan_layers):
    """`repeats=n` (one prefill per prompt, its KV cache repeated) samples what the prompts repeated n
    times do, row for row, and the n answers to a prompt are n different samples."""
    model = _model(scan_layers=scan_layers)
    prompt_ids, prompt_mask = _prompts([6, 2, 4], 6)
    config = SamplingConfig(max_new_tokens=NEW, eos_id=1, pad_id=PAD, temperature=1.3)
    shared = sample(model, prompt_ids, prompt_mask, jax.random.key(3), config, repeats=4)
    repeated = sample(
        model, jnp.repeat(prompt_ids, 4, axis=0), jnp.repeat(prompt_mask, 4, axis=0), jax.random.key(3), config
    )
    assert shared.tokens.shape == (12, NEW)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
    for field in ("logprobs", "untempered_logprobs", "entropy", "response_mask"):
        np.testing.assert_allclose(np.asarray(getattr(shared, field)), np.asarray(getattr(repeated, field)), atol=1e-5)
    # The answers continue their own prompt: teacher-forced on the repeated prompts, the same log-probs.
    forced = _teacher_forced_logprobs(
        model, jnp.repeat(prompt_ids, 4, axis=0), jnp.repeat(prompt_mask, 4, axis=0), shared, 1.3
    )
    np.testing.assert_allclose(np.asarray(forced), np.asarray(shared.logprobs), atol=1e-4)
    tokens = np.asarray(shared.tokens).reshape(3, 4, NEW)
    assert all(len({row.tobytes() for row in group}) > 1 for group in tokens)


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 20)).astype(np.float32)
    for top_k, top_p in [(3, 1.0), (0, 0.5), (5, 0.8)]:
        got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p)) > np.finfo(np.float32).min
        for row in range(4):
            order = np.argsort(-logits[row])
            keep = np.zeros(20, bool)
            keep[order[:top_k] if top_k else order] = True
            # top-p acts on the distribution left after top-k, as in transformers' warper chain.
            probs = np.where(keep, np.exp(logits[row] - logits[row].max()), 0.0)
            probs /= probs.sum()
            mass = 0.0
            nucleus = np.zeros(20, bool)
            for idx in order:
                if mass >= top_p:
                    break
                nucleus[idx] = True
                mass += probs[idx]
            np.testing.assert_array_equal(got[row], keep & nucleus)


def test_pad_equal_to_eos_is_rejected():
    with pytest.raises(ValueError, match="pad_id"):
        SamplingConfig(max_new_tokens=4, eos_id=2, pad_id=2)
