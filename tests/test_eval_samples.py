"""The evaluation stage's per-policy files on a real tiny run: samples_<policy>.jsonl and the token page
tokens_<policy>.html, checked against an independent numpy recomputation from the models' logits.

The models are tiny random ones (different seeds for pi_ref, pi_dpo and the evaluated policy, so the
log-ratios are far from 0), exported like a stage's and given to `run_evaluate` as the RTO recipe does.
"""

import functools
import json
from html.parser import HTMLParser

import jax
import numpy as np
import pytest
from flax import nnx

from rto_jax.models import CausalLM, ScalarHeadModel, load_pretrained
from rto_jax.objectives.token_rewards import rto
from rto_jax.pipeline import common
from rto_jax.pipeline.logging import RunLog
from rto_jax.pipeline.runner import with_seed
from rto_jax.pipeline.stages import run_evaluate
from rto_jax.pipeline.tasks import build_task
from tests.test_pipeline import fixture_data, small_config  # noqa: F401  (fixture_data: a pytest fixture)

BETA_DPO, DPO_CLIP, BETA_KL, BETA_RM = 1.0, 0.1, 0.5, 2.0
REWARD_MEAN, REWARD_STD = 0.1, 0.05  # a small std: some normalized scores reach the clip
LOGGED = 5  # of the 8 held-out prompts
EOS_WEIGHT = 1.5


class Page(HTMLParser):
    """Per sample (section data-index): its token spans' attributes and its score badge's."""

    def __init__(self):
        super().__init__()
        self.samples = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-index" in attrs:
            self.samples.append({"tokens": [], "score": None})
        elif tag == "span" and "tok" in (attrs.get("class") or "").split():
            self.samples[-1]["tokens"].append(attrs)
        elif tag == "span" and attrs.get("class") == "score":
            self.samples[-1]["score"] = attrs


def read_page(path) -> list[dict]:
    parser = Page()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.samples


@pytest.fixture(scope="module")
def evaluated(fixture_data, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("evaluate")
    config = with_seed(small_config(*fixture_data, "evaluate"), 0)
    config.evaluate.num_samples_logged = LOGGED
    config.ppo.reward_args.update(beta_dpo=BETA_DPO, dpo_clip=DPO_CLIP, beta_kl=BETA_KL, beta_rm=BETA_RM)
    task = build_task(config, workdir)
    ref = common.random_base_model(config, task)
    paths = {"sft": common.export(ref, workdir / "sft", task)}
    for seed, name in ((1, "dpo"), (2, "rto")):
        model = CausalLM(ref.config, nnx.Rngs(seed))
        if name == "rto":  # EOS's logit a multiple of the sum of all logits: some responses end early
            kernel = model.lm_head.kernel
            kernel[...] = kernel[...].at[:, task.eos_id].set(EOS_WEIGHT * kernel[...].sum(axis=1))
        paths[name] = common.export(model, workdir / name, task)
    paths["rm"] = common.export(ScalarHeadModel.from_causal_lm(ref, nnx.Rngs(3)), workdir / "rm", task)
    summary = run_evaluate(
        config,
        workdir,
        task,
        RunLog(workdir, tensorboard=False),
        policies={"sft": paths["sft"], "rto": paths["rto"]},
        reward_path=paths["rm"],
        ref_path=paths["sft"],
        token_reward=rto,
        models={"ref": paths["sft"], "dpo": paths["dpo"]},
        reward={"model_path": paths["rm"], "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD},
    )
    return config, task, workdir, paths, summary


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def independent(task, paths, prompt_ids, prompt_mask, response, temperature):
    """log-probs of `response` under each model (numpy log-softmax of its logits) at `temperature`,
    the same at temperature 1 (as "<name>@1") and the RM score."""
    p = task.prompt_length
    ids = np.concatenate([prompt_ids, response])[None]
    mask = np.concatenate([prompt_mask, np.ones(len(response), np.int32)])[None]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logps = {}
    for name in ("sft", "dpo", "rto"):
        logits = np.asarray(load_pretrained(paths[name], kind="lm")(ids, mask, positions), np.float64)[0]
        for key, t in ((name, temperature), (f"{name}@1", 1.0)):
            rows = log_softmax(logits[p - 1 : p - 1 + len(response)] / t)
            logps[key] = rows[np.arange(len(response)), response]
    raw = float(np.asarray(load_pretrained(paths["rm"], kind="scalar")(ids, mask, positions))[0, -1])
    return logps, raw


def test_token_page_values_equal_a_numpy_recomputation(evaluated):
    config, task, workdir, paths, _ = evaluated
    page = read_page(workdir / "evaluate" / "tokens_rto.html")
    rows = [json.loads(line) for line in (workdir / "evaluate" / "samples_rto.jsonl").read_text().splitlines()]
    assert len(page) == LOGGED and len(rows) == LOGGED
    dpo_all, clipped = [], 0
    for i, sample in enumerate(page):
        tokens = sample["tokens"]
        response = np.array([int(t["data-id"]) for t in tokens])
        assert len(response) == rows[i]["length"] and task.pad_id not in response  # no span for padding
        logps, raw = independent(
            task,
            paths,
            task.eval_prompts["prompt_ids"][i],
            task.eval_prompts["prompt_mask"][i],
            response,
            config.evaluate.temperature,
        )
        # DPO's implicit reward at temperature 1 (the models' own distributions); the KL term at the
        # sampling temperature.
        lr_dpo, lr_pi = logps["dpo@1"] - logps["sft@1"], logps["rto"] - logps["sft"]
        dpo = np.clip(BETA_DPO * lr_dpo, -DPO_CLIP, DPO_CLIP)
        kl = -BETA_KL * lr_pi
        value = lambda key, tokens=tokens: np.array([float(t[key]) for t in tokens])
        np.testing.assert_allclose(value("data-lr-dpo"), lr_dpo, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(value("data-lr-policy"), lr_pi, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(value("data-dpo"), dpo, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(value("data-kl"), kl, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(value("data-color"), dpo, rtol=1e-4, atol=2e-5)  # coloured by the DPO part
        eos = bool(response[-1] == task.eos_id)
        score = np.clip((raw - REWARD_MEAN) / REWARD_STD, -config.ppo.score_clip, config.ppo.score_clip)
        score -= config.ppo.missing_eos_penalty * (not eos)
        assert float(sample["score"]["data-raw-score"]) == pytest.approx(raw, rel=1e-4, abs=1e-5)
        assert float(sample["score"]["data-score"]) == pytest.approx(score, rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(value("data-score"), BETA_RM * score * (np.arange(len(response)) == len(response) - 1), atol=1e-4)  # fmt: skip
        # The jsonl row of the same sample: its KL is the sequence log-ratio, its score the raw one.
        assert rows[i]["kl"] == pytest.approx(lr_pi.sum(), rel=1e-4, abs=1e-4)
        assert rows[i]["rm_score"] == pytest.approx(raw, rel=1e-4, abs=1e-5) and rows[i]["eos"] == eos
        assert rows[i]["response"] == task.decode(response)
        dpo_all.append(dpo)
        clipped += int(np.sum(np.abs(BETA_DPO * lr_dpo) > DPO_CLIP))
    # Both regimes occur, so the clip (and its absence) is checked, and so do responses that end with
    # EOS before R (padded: no span for the padding) and responses cut at R (the missing-EOS penalty).
    assert 0 < clipped < sum(len(d) for d in dpo_all)
    assert 0 < sum(r["eos"] and r["length"] < task.response_length for r in rows) < LOGGED
    # pi_ref's own page: its log-ratio to itself is 0, so its KL part is.
    for sample in read_page(workdir / "evaluate" / "tokens_sft.html"):
        assert all(float(t["data-kl"]) == 0 and float(t["data-lr-policy"]) == 0 for t in sample["tokens"])


def test_samples_rows_carry_the_reference_the_judge_and_the_win(evaluated):
    _, task, workdir, _, _ = evaluated
    p = task.prompt_length
    keys = {"prompt", "response", "reference", "judge_score", "reference_judge_score", "win", "rm_score", "kl",
            "length", "eos"}  # fmt: skip
    refs = task.eval_references
    for policy in ("sft", "rto"):
        rows = [json.loads(x) for x in (workdir / "evaluate" / f"samples_{policy}.jsonl").read_text().splitlines()]
        assert len(rows) == LOGGED
        for i, row in enumerate(rows):
            assert keys <= row.keys()
            mask = refs["response_mask"][i] > 0
            assert row["reference"] == task.decode(refs["input_ids"][i, p:][mask])
            assert row["prompt"] == task.decode(refs["prompt_ids"][i][refs["prompt_mask"][i] > 0])
            a, b = row["judge_score"], row["reference_judge_score"]
            assert row["win"] == (1.0 if a > b else 0.5 if a == b else 0.0)
            # The judge is the run's reward model here: the row's judge score is its score.
            assert a == pytest.approx(row["rm_score"], rel=1e-5, abs=1e-6)
            if row["eos"]:
                assert row["response"].endswith(task.tokenizer.eos_token)  # EOS stays visible


def test_model_paths_inside_the_workdir_are_written_relative_to_it(evaluated):
    """evaluate/<policy>.json and the summary (results.json's `judge`) name models as done.json does."""
    _, _, workdir, _, summary = evaluated
    assert summary["judge"] == "rm"
    for policy in ("sft", "rto"):
        saved = json.loads((workdir / "evaluate" / f"{policy}.json").read_text())
        assert saved["model_path"] == policy
        assert summary["policies"][policy]["model_path"] == policy


def test_evaluation_shows_a_progress_bar_over_prompt_batches():
    from rto_jax.eval import rollout_eval

    bars = []

    class Bar:
        def __init__(self, desc, total):
            self.desc, self.total, self.n, self.closed = desc, total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    prompts = {"prompt_ids": np.zeros((10, 3), np.int32), "prompt_mask": np.ones((10, 3), np.int32)}
    fn = lambda ids, mask, rng: {"x": np.asarray(ids)[:, 0]}
    progress = functools.partial(Bar, "evaluate sft")  # as the evaluation stage labels its bar
    out = rollout_eval.over_prompt_batches(fn, prompts, jax.random.key(0), 4, progress=progress)
    assert out["x"].shape == (10,)
    assert [(b.desc, b.total, b.n, b.closed) for b in bars] == [("evaluate sft", 3, 3, True)]
    rollout_eval.over_prompt_batches(fn, prompts, jax.random.key(0), 4)  # no bar asked (PPO's gold curve)
    assert len(bars) == 1
