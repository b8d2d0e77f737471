"""rto_jax.data.synthetic: determinism, the gold reward against a per-row loop of its definition,
the source's exact log-probs, label calibration, best-of-n and the CONTRACT.md batch layout."""

import dataclasses
import itertools
import math

import jax
import numpy as np
import pytest

from rto_jax.data import synthetic as syn

CFG = syn.SyntheticTaskConfig()
# Tiny task for exhaustive checks: 1 topic, 3 content tokens, 1 context token, R = 3.
TINY = syn.SyntheticTaskConfig(
    num_topics=1,
    num_content_tokens=3,
    prompt_length=2,
    max_response_length=3,
    min_response_length=0,
    eos_hazard=0.3,
    target_length=2,
    copy_prob=0.2,
    source_concentration=1.0,
)


@pytest.fixture(scope="module")
def task():
    return syn.SyntheticTask.create(CFG, seed=0)


@pytest.fixture(scope="module")
def data(task):
    """Reference samples plus adversarial rows (off-language tokens, no EOS, EOS first, empty)."""
    rng = np.random.default_rng(1)
    prompts = task.sample_prompts(rng, 300)
    resp = task.sample_reference_responses(rng, prompts)
    ids, mask = resp["response_ids"].copy(), resp["response_mask"].copy()
    r = task.max_response_length
    ids[:20] = rng.integers(0, task.vocab_size, size=(20, r))  # anything, incl. pad/topic/EOS
    mask[:20] = 1.0
    ids[20:25] = rng.integers(task.content_offset, task.vocab_size, size=(5, r))  # never ends
    mask[20:25] = 1.0
    ids[25, 0], mask[25] = syn.EOS_ID, (np.arange(r) == 0)  # just EOS
    mask[26] = 0.0  # empty response
    return prompts["prompt_ids"], prompts["prompt_mask"], ids, mask.astype(np.float32)


# ----------------------------------------------------------------------------- reference loops
def gold_loop(task, prompt_ids, prompt_mask, response_ids, response_mask):
    """r* straight from the module docstring, one row and one token at a time."""
    cfg = task.config
    content = range(task.content_offset, task.vocab_size)
    out = []
    for pid, pm, rid, rm in zip(prompt_ids, prompt_mask, response_ids, response_mask):
        real = [int(t) for t, m in zip(pid, pm) if m]
        topic, ctx = real[0] - 2, set(real[1:])
        resp, ended = [], False
        for t, m in zip(rid, rm):
            if not m:
                break
            if t == syn.EOS_ID:
                ended = True
                break
            resp.append(int(t))
        qs, prev = [], None
        for t in resp:
            if t in content:
                b = task.bigram_bonus[prev, t] if prev in content else 0.0
                qs.append((task.token_weight[topic, t] + b) / (1 + cfg.bigram_scale))
            else:
                qs.append(-1.0)
            prev = t
        h = len(resp)
        quality = sum(qs) / h if h else 0.0
        coverage = len(ctx & set(resp)) / len(ctx) if ctx else 1.0
        length = max(0.0, 1 - abs(h - cfg.target_length) / cfg.target_length)
        out.append(
            cfg.quality_weight * quality
            + cfg.coverage_weight * (2 * coverage - 1)
            + cfg.length_weight * (2 * length - 1)
            + cfg.eos_weight * (2 * ended - 1)
        )
    return np.array(out)


# ----------------------------------------------------------------------------- determinism
def test_determinism_same_seed_same_task_and_samples():
    t1, t2 = syn.SyntheticTask.create(CFG, 7), syn.SyntheticTask.create(CFG, 7)
    for name in ("transition", "token_weight", "bigram_bonus", "quality_table"):
        np.testing.assert_array_equal(getattr(t1, name), getattr(t2, name))
    draws = []
    for t in (t1, t2):
        rng = np.random.default_rng(3)
        p = t.sample_prompts(rng, 50)
        draws.append((p, t.sample_reference_responses(rng, p)))
    for a, b in zip(draws[0], draws[1]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_different_seed_different_task():
    t1, t2 = syn.SyntheticTask.create(CFG, 0), syn.SyntheticTask.create(CFG, 1)
    for name in ("transition", "token_weight", "bigram_bonus"):
        assert not np.array_equal(getattr(t1, name), getattr(t2, name)), name
    p = t1.sample_prompts(np.random.default_rng(0), 50)
    r1 = t1.sample_reference_responses(np.random.default_rng(0), p)["response_ids"]
    r2 = t2.sample_reference_responses(np.random.default_rng(0), p)["response_ids"]
    assert not np.array_equal(r1, r2)


# ----------------------------------------------------------------------------- gold reward
def test_gold_numpy_matches_jnp_and_loop(task, data):
    want = gold_loop(task, *data)
    got = task.gold_reward(*data)
    assert got.dtype == np.float32 and got.shape == (len(want),)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(task.gold_reward_jax(*data)), got, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(task.gold_reward_jax)(*data)), got, atol=1e-6)
    # The adversarial rows hit the special cases.
    comp = task.gold_components(*data)
    assert not comp["ended"][20:25].any() and comp["ended"][25] and comp["length"][25] == 0
    assert comp["length"][26] == 0 and not comp["ended"][26]


def test_gold_bounded_and_credit_sums_to_reward(task, data):
    r = task.gold_reward(*data)
    assert np.all(r >= -1) and np.all(r <= 1)
    credit = task.gold_token_credit(*data)
    rows = np.asarray(data[3]).sum(1) > 0  # an empty response has nowhere to put credit
    np.testing.assert_allclose(credit.sum(1)[rows], r[rows], atol=1e-5)
    credit_jnp = np.asarray(task.gold_token_credit(*data, xp=jax.numpy))
    np.testing.assert_allclose(credit_jnp, credit, atol=1e-6)


def test_gold_ignores_masked_positions(task, data):
    pid, pm, ids, mask = data
    rng = np.random.default_rng(2)
    base = task.gold_reward(pid, pm, ids, mask)
    alive = syn._alive(np, ids, mask, syn.EOS_ID)
    noisy_ids = np.where(alive, ids, rng.integers(0, task.vocab_size, size=ids.shape))
    # Garbage after EOS with the mask still 1 there (a sloppy mask) and with the mask 0.
    noisy_mask = np.where(alive, mask, rng.integers(0, 2, size=mask.shape)).astype(np.float32)
    np.testing.assert_array_equal(task.gold_reward(pid, pm, noisy_ids, mask), base)
    ended = (alive & (ids == syn.EOS_ID)).any(1)
    np.testing.assert_array_equal(task.gold_reward(pid, pm, noisy_ids, noisy_mask)[ended], base[ended])
    # Pad tokens in the prompt padding do not matter either.
    noisy_prompt = np.where(pm > 0, pid, rng.integers(0, task.vocab_size, size=pid.shape))
    np.testing.assert_array_equal(task.gold_reward(noisy_prompt, pm, ids, mask), base)


def enumerate_responses(tokens, r):
    """Every response over `tokens`: h tokens then EOS (h < R), or R tokens without EOS."""
    rows, lengths = [], []
    for h in range(r + 1):
        for seq in itertools.product(tokens, repeat=h):
            row = list(seq) + ([syn.EOS_ID] if h < r else [])
            rows.append(row + [syn.PAD_ID] * (r - len(row)))
            lengths.append(len(row))
    mask = np.arange(r)[None, :] < np.array(lengths)[:, None]
    return np.array(rows, np.int32), mask.astype(np.float32)


def test_max_gold_reward_brute_force():
    tiny = syn.SyntheticTask.create(dataclasses.replace(TINY, bigram_density=0.5), seed=4)
    prompts = tiny.sample_prompts(np.random.default_rng(0), 3)
    tokens = [t for t in range(tiny.vocab_size) if t != syn.EOS_ID]  # pad/topic ids too
    ids, mask = enumerate_responses(tokens, tiny.max_response_length)
    best = tiny.max_gold_reward(prompts["prompt_ids"], prompts["prompt_mask"])
    for i in range(3):
        rep = lambda a: np.repeat(a[i : i + 1], len(ids), axis=0)  # noqa: E731
        brute = tiny.gold_reward(rep(prompts["prompt_ids"]), rep(prompts["prompt_mask"]), ids, mask).max()
        np.testing.assert_allclose(best[i], brute, atol=1e-6)


def test_max_gold_reward_dominates_samples(task):
    rng = np.random.default_rng(5)
    prompts = task.sample_prompts(rng, 8)
    resp = task.sample_reference_responses(rng, prompts, n=64)
    rep = lambda a: np.repeat(a, 64, axis=0)  # noqa: E731
    gold = task.gold_reward(
        rep(prompts["prompt_ids"]),
        rep(prompts["prompt_mask"]),
        resp["response_ids"].reshape(-1, CFG.max_response_length),
        resp["response_mask"].reshape(-1, CFG.max_response_length),
    ).reshape(8, 64)
    best = task.max_gold_reward(prompts["prompt_ids"], prompts["prompt_mask"])
    assert np.all(best >= gold.max(1) - 1e-6) and np.all(best <= 1.0)
    assert best.mean() > gold.max(1).mean() + 0.1  # room to improve beyond best-of-64


# ----------------------------------------------------------------------------- the source
def test_reference_logprobs_normalised_and_match_sampler():
    tiny = syn.SyntheticTask.create(TINY, seed=2)
    ids, mask = enumerate_responses(range(tiny.content_offset, tiny.vocab_size), TINY.max_response_length)
    prompts = tiny.sample_prompts(np.random.default_rng(0), 1)
    rep = lambda a: np.repeat(a, len(ids), axis=0)  # noqa: E731
    logp = tiny.reference_logprobs(rep(prompts["prompt_ids"]), rep(prompts["prompt_mask"]), ids, mask)
    probs = np.exp(logp.astype(np.float64).sum(1))
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(logp[0, 0], math.log(TINY.eos_hazard), rtol=1e-6)  # row 0: just EOS
    # Empirical frequencies of sampled responses against the exact probabilities.
    n = 20000
    samples = tiny.sample_reference_responses(np.random.default_rng(1), prompts, n=n)
    index = {tuple(row): i for i, row in enumerate(ids)}
    counts = np.bincount([index[tuple(row)] for row in samples["response_ids"][0]], minlength=len(ids))
    np.testing.assert_array_equal(
        samples["response_mask"][0], mask[[index[tuple(x)] for x in samples["response_ids"][0]]]
    )
    stderr = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(counts / n - probs) < 5 * stderr + 1e-3)
    # Tokens the source never emits have probability 0.
    bad = ids[:1].copy()
    bad[0, 0] = syn.PAD_ID
    assert np.isneginf(tiny.reference_logprobs(prompts["prompt_ids"], prompts["prompt_mask"], bad, mask[:1]).sum())


def test_default_task_has_room_and_stops(task):
    rep = task.reference_report(np.random.default_rng(0), num_prompts=64, num_samples=64, with_max=False)
    assert 0.85 < rep["eos_rate"] < 1.0  # most, not all, reference samples stop
    assert 4 < rep["length"] < CFG.max_response_length / 2
    assert rep["gold_best_of_64"] > rep["gold_mean"] + 0.2
    assert rep["token_entropy"] > 1.5  # the SFT target has entropy left
    prompts = task.sample_prompts(np.random.default_rng(1), 2000)
    resp = task.sample_reference_responses(np.random.default_rng(2), prompts)
    comp = task.gold_components(prompts["prompt_ids"], prompts["prompt_mask"], **resp)
    assert comp["length"].min() == CFG.min_response_length  # no EOS before the minimum, then hazard
    np.testing.assert_allclose(
        np.mean(comp["length"][comp["ended"]] == CFG.min_response_length), CFG.eos_hazard, atol=0.03
    )


# ----------------------------------------------------------------------------- labels
def test_calibrated_labels_reach_target_agreement(task):
    rng = np.random.default_rng(11)
    prompts = task.sample_prompts(rng, 8000)
    a = task.sample_reference_responses(rng, prompts)
    b = task.sample_reference_responses(rng, prompts)
    batch, info = task.make_preference_data(rng, prompts, a, b)  # temperature None: calibrated
    assert 0.70 <= info["expected_agreement"] <= 0.75
    assert abs(info["expected_agreement"] - CFG.target_agreement) < 1e-3
    untied = np.abs(info["gold_a"] - info["gold_b"]) > 1e-6
    se = math.sqrt(0.72 * 0.28 / untied.sum())
    assert abs(info["agreement"] - info["expected_agreement"]) < 4 * se
    assert 0.70 - 2 * se <= info["agreement"] <= 0.75 + 2 * se
    # The calibration helper on the same rewards returns the same temperature.
    cal = syn.calibrate_label_temperature(rng, info["gold_a"], info["gold_b"], 0.72)
    np.testing.assert_allclose(cal.temperature, info["temperature"], rtol=1e-6)
    assert abs(cal.sampled_agreement - 0.72) < 4 * se
    # chosen/rejected follow the labels.
    chosen_gold = task.gold_reward(
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["chosen_input_ids"][:, CFG.prompt_length :],
        batch["chosen_response_mask"],
    )
    np.testing.assert_allclose(chosen_gold, info["gold_chosen"], atol=1e-6)
    # Temperature -> 0 gives noiseless labels.
    _, clean = task.make_preference_data(rng, prompts, a, b, temperature=1e-9)
    assert clean["agreement"] == 1.0


# ----------------------------------------------------------------------------- best-of-n
@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_monte_carlo(n):
    """Best-of-n over M equiprobable outcomes with distinct rewards (reward = index)."""
    m, draws = 200, 200_000
    rng = np.random.default_rng(n)
    best = rng.integers(0, m, size=(draws, n)).max(1)
    p = np.bincount(best, minlength=m) / draws
    kl = float(np.sum(p[p > 0] * np.log(p[p > 0] * m)))
    np.testing.assert_allclose(kl, syn.best_of_n_kl(n), rtol=0.03)


def test_best_of_n_frontier_estimators():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(50, 6))
    f = syn.best_of_n_frontier(gold)
    for n in (1, 2, 3, 6):
        brute = np.mean([[max(g[list(s)]) for s in itertools.combinations(range(6), n)] for g in gold], 1)
        np.testing.assert_allclose(f["mean"][n - 1], brute.mean(), atol=1e-12)
    np.testing.assert_allclose(f["mean"][0], gold.mean())
    assert np.all(np.diff(f["mean"]) > 0) and np.all(f["stderr"] > 0)
    np.testing.assert_allclose(f["kl"], np.log(f["n"]) - (f["n"] - 1) / f["n"])
    first = syn.best_of_n_frontier(gold, max_n=4, method="first")
    np.testing.assert_allclose(first["mean"], np.maximum.accumulate(gold[:, :4], 1).mean(0))


# ----------------------------------------------------------------------------- layout
def test_prompts_and_sft_batch_layout(task):
    p_len, r_len = CFG.prompt_length, CFG.max_response_length
    rng = np.random.default_rng(0)
    prompts = task.sample_prompts(rng, 500)
    pm = prompts["prompt_mask"]
    assert task.pad_id != task.eos_id
    assert np.all(np.diff(pm, axis=1) >= 0)  # left padding: 0..0 1..1
    n_real = pm.sum(1)
    assert n_real.min() >= 1 + CFG.min_context_tokens and n_real.max() <= p_len and n_real.min() < n_real.max()
    first = prompts["prompt_ids"][np.arange(500), p_len - n_real]
    assert np.all((first >= 2) & (first < task.content_offset))  # topic token
    for row, m in zip(prompts["prompt_ids"], pm):
        ctx = row[m > 0][1:]
        assert len(set(ctx)) == len(ctx) and np.all(ctx >= task.content_offset)
    np.testing.assert_array_equal(prompts["prompt_positions"], np.maximum(np.cumsum(pm, 1) - 1, 0))

    batch = task.make_sft_data(rng, 500)
    assert set(batch) == {"input_ids", "attention_mask", "positions", "response_mask", "prompt_ids", "prompt_mask"}
    shapes = {
        "input_ids": p_len + r_len,
        "attention_mask": p_len + r_len,
        "positions": p_len + r_len,
        "response_mask": r_len,
        "prompt_ids": p_len,
        "prompt_mask": p_len,
    }
    for key, width in shapes.items():
        assert batch[key].shape == (500, width), key
        assert batch[key].dtype == (np.float32 if key == "response_mask" else np.int32), key
    am, rm, ids = batch["attention_mask"], batch["response_mask"], batch["input_ids"]
    np.testing.assert_array_equal(batch["positions"], np.maximum(np.cumsum(am, 1) - 1, 0))
    np.testing.assert_array_equal(am[:, p_len:], rm)
    np.testing.assert_array_equal(am[:, :p_len], batch["prompt_mask"])
    resp = ids[:, p_len:]
    assert np.all(rm[:, 0] == 1)  # every response has a first token at column P
    assert np.all(np.diff(rm, axis=1) <= 0)  # right padding
    last = rm.sum(1).astype(int) - 1
    ends = resp[np.arange(500), last] == task.eos_id
    assert ends.mean() > 0.8 and np.all(ends | (rm.sum(1) == r_len))  # EOS inside the mask, or cut at R
    assert np.all((resp == task.eos_id).sum(1) <= 1) and np.all(resp[rm == 0] == task.pad_id)
    assert np.all(ids[am == 0] == task.pad_id)


def test_preference_batch_layout(task):
    rng = np.random.default_rng(3)
    prompts = task.sample_prompts(rng, 64)
    a, b = (task.sample_reference_responses(rng, prompts) for _ in range(2))
    batch, info = task.make_preference_data(rng, prompts, a, b, temperature=0.2)
    keys = {
        f"{s}_{k}"
        for s in ("chosen", "rejected")
        for k in ("input_ids", "attention_mask", "positions", "response_mask")
    } | {"prompt_ids", "prompt_mask"}
    assert set(batch) == keys
    p_len = CFG.prompt_length
    for side in ("chosen", "rejected"):
        np.testing.assert_array_equal(batch[f"{side}_input_ids"][:, :p_len], batch["prompt_ids"])
        np.testing.assert_array_equal(batch[f"{side}_attention_mask"][:, p_len:], batch[f"{side}_response_mask"])
    pick = info["a_preferred"][:, None]
    np.testing.assert_array_equal(
        batch["chosen_input_ids"][:, p_len:], np.where(pick, a["response_ids"], b["response_ids"])
    )
    np.testing.assert_array_equal(
        batch["rejected_input_ids"][:, p_len:], np.where(pick, b["response_ids"], a["response_ids"])
    )
