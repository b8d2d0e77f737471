"""When does RTO's dense token reward help, and could this setup show it if it did? PPO and RTO on
the synthetic task, each with the values its fair tuning chose on the tuning seed
(config.ppo.per_method), beside two positive controls that know the gold reward:

  oracle_dense  PPO's reward plus the task's exact per-token gold credit, scaled as RTO's DPO term
                is (the same per-token spread on pi_sft's samples): a dense term of RTO's size whose
                credit is perfect. If it beats PPO, the setup can detect better credit assignment,
                and RTO's result is about the quality of DPO's credit.
  oracle_rm     PPO with the gold reward in place of the learned reward model's score (sparse, at
                the last token, normalized as the score is): how much the reward model limits.

The cells change one thing at a time around the tuned setting (the "center"):

  horizon    config.study.horizons: the response length the gold reward prefers; `horizon_config`
             scales the center task's lengths by H / target_length. Each horizon is its own task,
             with its own SFT, pairs, reward model and DPO (seed_N/horizon_H/).
  DPO data   config.study.dpo_pairs: RTO's DPO policy trained on fewer or more labelled pairs than
             the reward model's config.study.reward_pairs. Only RTO reads it: the other methods'
             runs are the center's.
  KL         config.study.beta_kl: every method at other KL coefficients.
  DPO weight config.study.beta_dpo at config.study.beta_dpo_horizons: RTO with a larger beta_dpo and
             config.study.wide_clip (0 = no clip), so the dense term is not ~5% of the reward, and
             oracle_dense scaled to match it; PPO's and oracle_rm's runs are the horizon's.
  no critic  critic_free_h<H> at config.study.critic_free_horizons: PPO's and RTO's rewards under the
             critic-free RLOO estimator (4 responses per prompt, the same episodes; each with the
             values its tuning chose, per_method's rloo / rto_rloo), both positive controls under
             RLOO (oracle_dense_rloo sized as rto_rloo's DPO term), beside the horizon's PPO and RTO.

Before PPO, a `credit` stage per DPO model measures on pi_sft's samples how RTO's DPO term and the
reward model's score correlate with the gold credit (rto_jax.eval.credit); during PPO every run logs
the same for its own reward parts at each gold evaluation (`credit/*` in the eval records).

Each finished (seed, cell) is one small JSON summary (`cell_summary`) in config.study.summaries
(default <workdir>/summaries; the `study` preset: docs/results/synthetic_study/summaries, committed,
so the study resumes across sessions and machines: a horizon whose cells are all there with the same
design is not run again; a horizon with some cells there runs only the others, and the runs they
compare with in its own workdir). `aggregate` hands every summary to experiments/synthetic_study_report.py,
which writes the tables and figures; `make study-report` regenerates them from the committed
summaries alone. Stages are skip-if-done: the same command resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.synthetic_compare import rloo, rto_rloo
from rto_jax.data.synthetic import SyntheticTask, SyntheticTaskConfig
from rto_jax.distributed import is_main_process
from rto_jax.errors import ConfigError
from rto_jax.eval.credit import credit_correlations, token_scale
from rto_jax.eval.policy_eval import SEQUENCE_KEYS, fixed_size_batches, score_arrays, sequences
from rto_jax.objectives.ppo import normalized_score
from rto_jax.objectives.token_rewards import (
    GOLD,
    REWARD_MODEL,
    at_last_token,
    clip_symmetric,
    log_ratio,
    ppo,
    reward_args,
    rto,
    sum_parts,
    token_reward,
)
from rto_jax.pipeline import Pipeline, common, model_path, stages
from rto_jax.pipeline.config import ONLINE_PRM_KNOBS, parse_per_method, parse_seeds
from rto_jax.pipeline.evaluate import held_out_rows, run_best_of_n
from rto_jax.pipeline.logging import read_metrics, write_json_atomic
from rto_jax.pipeline.recipes import method
from rto_jax.pipeline.tasks import with_preferences
from rto_jax.scoring import response_logprobs

# ----------------------------------------------------------------------------------------------
# The positive controls: token rewards that read the task's gold credit (logps[GOLD], [B, R]).


@token_reward("ref", REWARD_MODEL, GOLD)
def oracle_dense(logps, score, mask, *, beta_gold=0.05, beta_kl=0.01, beta_rm=1.0):
    """PPO's reward plus beta_gold times the exact gold credit of each token (which sums to r*):
    RTO with perfect token credit in place of DPO's. The study sets beta_gold per cell so that the
    term's per-token spread on pi_sft's samples equals RTO's DPO term's (`run_token_credit`)."""
    return sum_parts(
        {
            "gold": beta_gold * logps[GOLD],
            "kl": -beta_kl * log_ratio(logps, "policy", "ref", mask),
            "score": beta_rm * at_last_token(score, mask),
        },
        mask,
    )


@token_reward("ref", GOLD)
def oracle_rm(logps, score, mask, *, gold_mean=0.0, gold_std=1.0, beta_kl=0.01, beta_rm=1.0):
    """PPO with the gold reward r* in place of the learned reward model's score: sparse, at the last
    token, normalized as the score is ((r* - gold_mean) / gold_std on pi_sft's samples). r* already
    penalizes a response that never stops (its EOS term), so no missing-EOS penalty is added."""
    del score
    gold = jnp.sum(logps[GOLD], axis=-1)
    return sum_parts(
        {
            "kl": -beta_kl * log_ratio(logps, "policy", "ref", mask),
            "gold": beta_rm * at_last_token((gold - gold_mean) / gold_std, mask),
        },
        mask,
    )


HORIZON_METHODS = (ppo, rto, oracle_dense, oracle_rm)  # every horizon's own cell
CRITIC_FREE = (rloo, rto_rloo)  # the critic_free_h<H> cells': PPO's and RTO's rewards under RLOO
# ... and the positive controls under RLOO: oracle_dense_rloo's gold term sized as rto_rloo's DPO term.
CRITIC_FREE_CONTROLS = tuple(method(fn, f"{fn.__name__}_rloo", **rloo.ppo_settings) for fn in (oracle_dense, oracle_rm))
METHODS = HORIZON_METHODS + CRITIC_FREE + CRITIC_FREE_CONTROLS  # every token reward the study trains
TOKEN_REWARD = rto  # the coefficients `config.ppo.reward_args` may hold
# The controls are the sparse baseline plus what they know: they train with its tuned values
# (per_method's "ppo", or "rloo" without a critic); rloo and rto_rloo have their own tune_methods rows.
TUNED_AS = {
    "ppo": "ppo", "rto": "rto", "oracle_dense": "ppo", "oracle_rm": "ppo",
    "rloo": "rloo", "rto_rloo": "rto_rloo", "oracle_dense_rloo": "rloo", "oracle_rm_rloo": "rloo",
}  # fmt: skip


class Design(NamedTuple):  # (a dataclass needs its module in sys.modules; a recipe's is not)
    """The study's cells, from config.study."""

    horizons: tuple[int, ...]  # the center's (synthetic.task.target_length) among them
    center: int
    dpo_pairs: tuple[int, ...]  # reward_pairs among them
    reward_pairs: int
    beta_kl: tuple[float, ...]  # KL coefficients besides each method's own
    beta_dpo: tuple[float, ...]  # RTO's DPO weights besides its tuned one (with wide_clip)
    beta_dpo_horizons: tuple[int, ...]  # where the beta_dpo cells run
    wide_clip: float  # RTO's dpo_clip in the beta_dpo cells (0: no clip)
    critic_free_horizons: tuple[int, ...]  # where the critic_free cells run
    tuning_seed: int
    summaries: str  # the folder of per seed-cell summaries ("": <workdir>/summaries)


def _numbers(key: str, text: str, kind, allow_empty: bool = False) -> tuple:
    if allow_empty and not str(text).strip():
        return ()
    try:
        values = tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(key, f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise ConfigError(key, f"expected distinct positive numbers, got {text!r}")
    return values


def design(config) -> Design:
    study = config.get("study")
    if study is None:
        raise ConfigError("study", "experiments/synthetic_study.py needs config.study (configs/rto_synthetic.py:study)")
    return Design(
        horizons=_numbers("study.horizons", study.horizons, int),
        center=config.synthetic.task.target_length,
        dpo_pairs=_numbers("study.dpo_pairs", study.dpo_pairs, int),
        reward_pairs=int(study.reward_pairs),
        beta_kl=_numbers("study.beta_kl", study.beta_kl, float, allow_empty=True),
        beta_dpo=_numbers("study.beta_dpo", study.get("beta_dpo", ""), float, allow_empty=True),
        beta_dpo_horizons=_numbers("study.beta_dpo_horizons", study.get("beta_dpo_horizons", ""), int, allow_empty=True),
        wide_clip=float(study.get("wide_clip", 0.0)),
        critic_free_horizons=_numbers(
            "study.critic_free_horizons", study.get("critic_free_horizons", ""), int, allow_empty=True
        ),
        tuning_seed=int(study.tuning_seed),
        summaries=str(study.get("summaries", "")),
    )


def horizon_config(config, horizon: int, reward_pairs: int):
    """`config` for horizon `horizon`: every length of the center task scaled by horizon /
    target_length (min_response_length, 1 / eos_hazard, max_response_length), and only the
    reward model's pairs labelled (the DPO-data cells run at the center)."""
    task = config.synthetic.task
    scale = horizon / task.target_length
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.name = f"{config.name}_horizon_{horizon}"
        new = out.synthetic.task
        new.target_length = horizon
        new.min_response_length = max(1, round(task.min_response_length * scale))
        new.eos_hazard = min(1.0, task.eos_hazard / scale)
        new.max_response_length = round(task.max_response_length * scale)
        out.data.max_response_len = new.max_response_length
        out.model.max_position_embeddings = max(
            config.model.max_position_embeddings, new.prompt_length + new.max_response_length
        )
        out.synthetic.preference_pairs = reward_pairs + int(config.data.eval_size)
    return out


def validate(config) -> None:
    d = design(config)
    if d.center not in d.horizons:
        raise ConfigError("study.horizons", f"must hold the center task's target_length {d.center}: {d.horizons}")
    if d.reward_pairs not in d.dpo_pairs:
        raise ConfigError("study.dpo_pairs", f"must hold study.reward_pairs ({d.reward_pairs}): {d.dpo_pairs}")
    if not set(d.beta_dpo_horizons) <= set(d.horizons):
        raise ConfigError("study.beta_dpo_horizons", f"{d.beta_dpo_horizons} must be among study.horizons {d.horizons}")
    if not set(d.critic_free_horizons) <= set(d.horizons):
        raise ConfigError(
            "study.critic_free_horizons", f"{d.critic_free_horizons} must be among study.horizons {d.horizons}"
        )
    if d.wide_clip < 0:
        raise ConfigError("study.wide_clip", f"expected >= 0 (0: no clip), got {d.wide_clip}")
    if d.tuning_seed in parse_seeds(config.seeds):
        raise ConfigError("seeds", f"the tuning seed {d.tuning_seed} chose the methods' values: it is never evaluated")
    if config.data.eval_size < 1:
        raise ConfigError("data.eval_size", "the study splits the labelled pairs by count: give a number of pairs")
    labelled = config.synthetic.preference_pairs - int(config.data.eval_size)
    if labelled < max(d.dpo_pairs):
        raise ConfigError(
            "synthetic.preference_pairs",
            f"{config.synthetic.preference_pairs} - data.eval_size {config.data.eval_size} = {labelled} training pairs, "
            f"fewer than the largest of study.dpo_pairs ({max(d.dpo_pairs)})",
        )
    if config.ppo.eval_every <= 0:
        raise ConfigError("ppo.eval_every", "the study's curves are the held-out gold reward during PPO: set > 0")
    per_method = parse_per_method(config.ppo.per_method)
    for method in ("ppo", "rto") + (tuple(fn.__name__ for fn in CRITIC_FREE) if d.critic_free_horizons else ()):
        if method not in per_method:
            raise ConfigError("ppo.per_method", f"give {method}'s tuned values (docs/results/synthetic.md#fair-tuning)")
    for horizon in d.horizons:
        try:
            SyntheticTaskConfig(**horizon_config(config, horizon, d.reward_pairs).synthetic.task.to_dict())
        except ValueError as e:
            raise ConfigError("study.horizons", f"horizon {horizon}: {e}") from None


def _first_pairs(task, count: int):
    """`task` with only the first `count` training pairs (nested subsets: fewer pairs are a prefix of more)."""
    return dataclasses.replace(task, preference_train={k: v[:count] for k, v in task.preference_train.items()})


# ----------------------------------------------------------------------------------------------
# How good DPO's token credit is, on pi_sft's samples (a stage: skip-if-done like any other).


@functools.partial(jax.jit, static_argnames="graphdef")
def _dpo_log_ratio(graphdef, dpo_params, ref_params, input_ids, attention_mask, positions, response_mask):
    """log pi_dpo(y_h) - log pi_ref(y_h) at temperature 1 (as RTO's reward reads it): [B, R]."""
    inputs = (input_ids, attention_mask, positions, response_mask)
    logp_dpo, _ = response_logprobs(nnx.merge(graphdef, dpo_params), *inputs, 1.0)
    logp_ref, _ = response_logprobs(nnx.merge(graphdef, ref_params), *inputs, 1.0)
    return jnp.where(response_mask > 0, logp_dpo - logp_ref, 0.0)


def run_token_credit(config, workdir, task, run_log, *, sft_path: str, dpo_path: str, reward: dict, settings: dict):
    """On one sample of pi_sft per held-out prompt (the gold curves' sampling keys): RTO's DPO term,
    for each of `settings` {label: (beta_dpo, dpo_clip)}, and the reward model's normalized score
    against the gold credit (rto_jax.eval.credit.credit_correlations); the DPO term's per-token spread
    and the oracle_dense weight that matches it; r*'s mean and spread there (oracle_rm's normalization)."""
    del workdir, run_log
    mesh = common.device_mesh(config)
    graphdef, sft = nnx.split(common.load_model(sft_path, "lm", config, mesh))
    _, dpo = nnx.split(common.load_model(dpo_path, "lm", config, mesh))
    rows = held_out_rows(config, task, graphdef, sft, sft)
    prompts, mask = task.eval_prompts, rows["response_mask"]
    arrays = sequences(prompts, rows["tokens"], mask)
    ratio = np.concatenate(
        [
            np.asarray(_dpo_log_ratio(graphdef, dpo, sft, *(jnp.asarray(b[k]) for k in SEQUENCE_KEYS)))[:n]
            for b, n in fixed_size_batches({k: arrays[k] for k in SEQUENCE_KEYS}, config.evaluate.batch_size)
        ]
    )
    raw = score_arrays(common.load_model(reward["model_path"], "scalar", config, mesh), arrays, config.evaluate.batch_size)
    score = np.asarray(
        normalized_score(
            raw,
            rows["eos"] > 0,
            mean=reward["reward_mean"],
            std=reward["reward_std"],
            clip=config.ppo.score_clip,
            missing_eos_penalty=config.ppo.missing_eos_penalty,
        )
    )
    source = SyntheticTask.create(SyntheticTaskConfig(**config.synthetic.task.to_dict()), seed=config.seed)
    gold_args = (prompts["prompt_ids"], prompts["prompt_mask"], rows["tokens"], mask)
    credit, quality = source.gold_token_credit(*gold_args), source.gold_quality_credit(*gold_args)
    gold = credit.sum(axis=1)
    score_part = np.asarray(at_last_token(score, mask))  # where PPO's reward puts it
    out = {
        "gold_mean": float(gold.mean()),
        "gold_std": float(max(gold.std(), 1e-6)),
        "gold_credit_scale": token_scale(credit, mask),
        "score": credit_correlations({"score": score_part}, credit, mask),
    }
    for label, (beta_dpo, dpo_clip) in settings.items():
        term = np.asarray(clip_symmetric(beta_dpo * ratio, dpo_clip)) * mask
        out[label] = {
            **credit_correlations({"dpo": term}, credit, mask, quality_credit=quality),
            "dpo_scale": token_scale(term, mask),
            "oracle_dense_beta_gold": token_scale(term, mask) / max(out["gold_credit_scale"], 1e-12),
        }
    return out


# ----------------------------------------------------------------------------------------------
# The cells of one horizon.


def _setting(config, values: dict) -> tuple[float, float]:
    """(beta_dpo, dpo_clip) of an RTO run with these per-method values."""
    args = {**reward_args(rto), **config.ppo.reward_args.to_dict(), **values}
    return float(args["beta_dpo"]), float(args["dpo_clip"])


def _design_hash(config, cell: str = "") -> str:
    """A fingerprint of everything that decides a horizon's numbers but the seed and the study's
    list of cells: summaries with the same hash come from the same design. The critic-free methods'
    per_method values are only in the critic_free cells' fingerprint (only those cells train them)."""
    keep = config.to_dict()
    entries = [e for e in str(keep["ppo"].get("per_method", "")).split(";") if e.strip()]
    critic_free = [e for e in entries if e.split(":", 1)[0].strip() in {fn.__name__ for fn in CRITIC_FREE}]
    keep["ppo"]["per_method"] = ";".join(e for e in entries if e not in critic_free)
    if cell.startswith("critic_free_"):
        keep["critic_free_per_method"] = critic_free
    for key in ("name", "seed", "seeds", "study", "resume_with_changes", "reuse_models_from", "checkpoint", "logging"):
        keep.pop(key, None)
    for (section, key), value in ADDED_AT_EARLIER_BEHAVIOUR.items():
        if keep.get(section, {}).get(key, value) == value:
            keep[section].pop(key, None)
    if "online_prm" not in keep.get("ppo", {}):  # no PRM trains: its knobs decide nothing
        for key in ONLINE_PRM_KNOBS:
            keep["ppo"].pop(key, None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Config keys added after summaries were committed, at the values that reproduce the committed runs:
# left out of the fingerprint at those values, so a new switch does not void the finished cells.
# (model.attention "auto" may pick blockwise attention where the committed runs had the plain one: the same
# attention, equal to float32 rounding.)
ADDED_AT_EARLIER_BEHAVIOUR = {
    ("ppo", "estimator"): "gae",
    ("ppo", "samples_per_prompt"): 1,
    ("ppo", "online_prm"): "",
    ("model", "attention"): "auto",
}


def _cell_names(d: Design, horizon: int) -> list[str]:
    names = [f"horizon_{horizon}"]
    if horizon == d.center:
        names += [f"dpo_{n}_pairs" for n in d.dpo_pairs if n != d.reward_pairs]
        names += [f"beta_kl_{b:g}" for b in d.beta_kl]
    if horizon in d.beta_dpo_horizons:
        names += [f"beta_dpo_{b:g}_h{horizon}" for b in d.beta_dpo]
    if horizon in d.critic_free_horizons:
        names.append(f"critic_free_h{horizon}")
    return names


def summaries_dir(pipeline_workdir: Path, d: Design, seeds: int) -> Path:
    """Where the per seed-cell summaries go: config.study.summaries, else the study's workdir/summaries."""
    if d.summaries:
        return Path(d.summaries).expanduser()
    return (pipeline_workdir.parent if seeds > 1 else pipeline_workdir) / "summaries"


def _cell_methods(name: str) -> set[str]:
    """The methods cell `name` reports (its own runs and those it shares)."""
    if name.startswith("critic_free_"):
        return {fn.__name__ for fn in (ppo, rto, *CRITIC_FREE, *CRITIC_FREE_CONTROLS)}
    return {fn.__name__ for fn in HORIZON_METHODS}


def _committed(folder: Path, seed: int, names: list[str], config) -> dict[str, dict]:
    """{name: summary} of the cells among `names` whose summary for `seed` is in `folder` with this
    design (`_design_hash`) and the methods the cell trains now; any other summary is not taken (its
    cell runs again: e.g. a cell that gained a method)."""
    found = {}
    for name in names:
        path = folder / f"seed_{seed}" / f"{name}.json"
        if path.exists():
            summary = json.loads(path.read_text())
            if summary.get("design") == _design_hash(config, name) and set(summary["methods"]) == _cell_methods(name):
                found[name] = summary
    return found


def _horizon_cells(p: Pipeline, d: Design, horizon: int, wanted: list[str]) -> list[dict]:
    """The cells `wanted` (of `_cell_names`) at one horizon, as summaries (`cell_summary`), training
    only what they need. A cell's methods always come from this workdir's models: a cell added to a
    committed horizon trains its own runs and the horizon runs it compares with (the same stages the
    horizon's cell would run), never pairs new runs with committed ones."""
    config = p.config
    center = horizon == d.center
    here = f"horizon_{horizon}"
    per_method = parse_per_method(config.ppo.per_method)
    sft = p.stage("sft", stages.run_sft)
    pairs = p.stage("preferences", stages.run_preferences, sft_path=model_path(sft))
    p.task = with_preferences(p.task, pairs["path"], config.data.eval_size, config.seed)
    reward_model = p.stage(
        "reward_model", stages.run_reward_model, task=_first_pairs(p.task, d.reward_pairs), sft_path=model_path(sft)
    )
    # The DPO models: the reward model's pairs (RTO's everywhere), and each DPO-data cell's own.
    dpo_pairs = [d.reward_pairs] + [n for n in d.dpo_pairs if center and f"dpo_{n}_pairs" in wanted]
    dpo = {}
    for n in dpo_pairs:
        name = "dpo" if n == d.reward_pairs else f"dpo_{n}_pairs"
        dpo[n] = p.stage(
            name, stages.run_dpo, section="dpo", task=_first_pairs(p.task, n), sft_path=model_path(sft), stage=name
        )
    # pi_sft's and the DPO policies' held-out gold: one stage per DPO-data cell (a cell added later
    # adds a stage, it does not change a finished one).
    held_out = {}
    for n in dpo_pairs:
        policies = {f"dpo_{n}": model_path(dpo[n])} | ({"sft": model_path(sft)} if n == d.reward_pairs else {})
        name = "gold_eval" if n == d.reward_pairs else f"gold_eval_dpo_{n}_pairs"
        held_out |= p.stage(
            name, stages.run_gold_eval, section="evaluate", policies=policies, ref_path=model_path(sft)
        )
    frontier = p.stage("best_of_n", run_best_of_n, section="evaluate", sft_path=model_path(sft))

    # RTO's DPO term at each setting this horizon trains with, on pi_sft's samples: the tuned setting
    # with each DPO model, each wider setting with the reward model's pairs' (one stage each).
    tuned = _setting(config, per_method.get("rto", {}))
    wide = {
        f"beta_dpo_{b:g}": (b, d.wide_clip)
        for b in d.beta_dpo
        if horizon in d.beta_dpo_horizons and f"beta_dpo_{b:g}_h{horizon}" in wanted
    }
    measured = {(n, "tuned"): ("credit" if n == d.reward_pairs else f"credit_dpo_{n}_pairs", tuned) for n in dpo}
    measured.update({(d.reward_pairs, label): (f"credit_{label}", setting) for label, setting in wide.items()})
    if f"critic_free_h{horizon}" in wanted:  # rto_rloo's own setting (its tuned clip)
        measured[d.reward_pairs, "rto_rloo"] = ("credit_rto_rloo", _setting(config, per_method["rto_rloo"]))
    credit = {}
    for (n, label), (name, setting) in measured.items():
        done = p.stage(
            name,
            run_token_credit,
            section="evaluate",
            sft_path=model_path(sft),
            dpo_path=model_path(dpo[n]),
            reward=reward_model,
            settings={label: setting},
        )
        credit[n, label] = {**done[label], **{k: done[k] for k in ("gold_mean", "gold_std", "gold_credit_scale")}}
        credit[n, "score"] = done["score"]
    center_credit = credit[d.reward_pairs, "tuned"]

    trained = {}  # stage -> its run: each PPO run once, whichever cells read it

    def train(fn, suffix: str = "", dpo_pairs: int = d.reward_pairs, **values) -> dict:
        name = f"ppo_{fn.__name__}{suffix}"
        if name in trained:
            return trained[name]
        merged = dict(per_method.get(TUNED_AS[fn.__name__], {}))
        merged.update(values)
        reward = getattr(fn, "__wrapped__", fn)  # a control under another estimator (recipes.method) is the control
        if reward is oracle_dense and "beta_gold" not in merged:
            merged["beta_gold"] = center_credit["oracle_dense_beta_gold"]
        if reward is oracle_rm:
            merged.update(gold_mean=center_credit["gold_mean"], gold_std=center_credit["gold_std"])
        models = {"ref": model_path(sft), "dpo": model_path(dpo[dpo_pairs])}
        result, args = p.ppo(name, fn, models=models, reward=reward_model, values=merged)
        trained[name] = {
            "stage": str(Path(p.workdir.name if not center else "") / name),
            "gold_reward": result["held_out"]["gold_reward"],
            "kl_to_ref": result["held_out"]["kl_to_ref"],
            "reward_args": args,
        }
        return trained[name]

    def horizon_runs(*methods) -> dict:
        """The horizon cell's runs of `methods`, marked shared where that cell is made here too."""
        shared = {"shared_from": here} if here in wanted else {}
        return {fn.__name__: {**train(fn), **shared} for fn in methods}

    # cell -> (its runs, what it varies, its DPO pairs, its credit setting: the RTO term its pi_sft credit is of)
    layout = {}
    if here in wanted:
        layout[here] = ({fn.__name__: train(fn) for fn in HORIZON_METHODS}, {}, d.reward_pairs, "tuned")
    for n in dpo_pairs[1:]:  # only RTO reads the DPO model: the others' runs are the horizon's
        methods = horizon_runs(ppo, oracle_dense, oracle_rm)
        methods["rto"] = train(rto, f"_dpo_{n}_pairs", dpo_pairs=n)
        layout[f"dpo_{n}_pairs"] = (methods, {}, n, "tuned")
    for beta in d.beta_kl if center else ():
        if f"beta_kl_{beta:g}" in wanted:
            methods = {fn.__name__: train(fn, f"_kl_{beta:g}", beta_kl=beta) for fn in HORIZON_METHODS}
            layout[f"beta_kl_{beta:g}"] = (methods, {"beta_kl": beta}, d.reward_pairs, "tuned")
    for label, (beta, clip) in wide.items():
        methods = horizon_runs(ppo, oracle_rm)
        methods["rto"] = train(rto, f"_{label}", beta_dpo=beta, dpo_clip=clip)
        gold_weight = credit[d.reward_pairs, label]["oracle_dense_beta_gold"]
        methods["oracle_dense"] = train(oracle_dense, f"_{label}", beta_gold=gold_weight)
        layout[f"{label}_h{horizon}"] = (methods, {"beta_dpo": beta, "dpo_clip": clip}, d.reward_pairs, label)
    if f"critic_free_h{horizon}" in wanted:  # its pi_sft credit: rto_rloo's DPO term (its own clip)
        methods = horizon_runs(ppo, rto) | {fn.__name__: train(fn) for fn in CRITIC_FREE}
        dense_rloo, rm_rloo = CRITIC_FREE_CONTROLS
        gold_weight = credit[d.reward_pairs, "rto_rloo"]["oracle_dense_beta_gold"]
        methods[dense_rloo.__name__] = train(dense_rloo, beta_gold=gold_weight)
        methods[rm_rloo.__name__] = train(rm_rloo)
        settings = dict(rloo.ppo_settings)  # every critic-free method's: estimator, samples_per_prompt
        layout[f"critic_free_h{horizon}"] = (methods, settings, d.reward_pairs, "rto_rloo")
    # _cell_names and _cell_methods (what _committed checks a summary against) agree with the cells made here.
    assert set(layout) == set(wanted), (sorted(layout), wanted)
    assert all(set(methods) == _cell_methods(name) for name, (methods, *_) in layout.items()), layout

    # Every run's held-out curves from one read of the metrics, starting at pi_sft's (the same samples' keys).
    records = read_metrics(p.workdir / "metrics.jsonl")
    references = {
        "sft_gold": held_out["sft"]["gold_reward"],
        "best_of_n": [{k: point[k] for k in ("n", "kl", "gold_reward")} for point in frontier["best_of_n"]],
        "reward_accuracy": reward_model.get("accuracy"),
        "label_agreement": pairs["label_agreement"],
    }
    summaries = []
    for name, (methods, varies, n, label) in layout.items():
        pi_sft = {k: v for k, v in credit[n, label].items() if k != "gold_credit_scale"}
        summaries.append(
            cell_summary(
                name, config, horizon, n, varies, methods, records,
                {**references, "dpo_gold": held_out[f"dpo_{n}"]["gold_reward"]},
                {**pi_sft, "score_response": credit[n, "score"]["score_response"]},
            )
        )  # fmt: skip
    return summaries


def _stage_records(records: list[dict], stage: str) -> list[dict]:
    return sorted(
        (r for r in records if r["stage"] == stage and r["split"] == "eval" and "gold_reward" in r),
        key=lambda r: r["step"],
    )


def cell_summary(name, config, horizon, dpo_pairs, varies, methods, records, references, credit) -> dict:
    """One (seed, cell) as the small JSON the study commits
    (docs/results/synthetic_study.md#design-fixed-before-the-runs):
    per method the final held-out gold and KL, the curve from pi_sft, the mean of each reward part over
    training and the credit correlations along training; the cell's references and pi_sft's credit."""
    per_step = config.ppo.rollout_batch_size
    out_methods = {}
    for method, run in methods.items():
        stage = Path(run["stage"]).name
        evals = _stage_records(records, stage)
        train = [r for r in records if r["stage"] == stage and r["split"] == "train"]
        parts = sorted({k for r in train for k in r if k.startswith("reward/") and k != "reward/total"})
        out_methods[method] = {
            **{k: run[k] for k in ("stage", "gold_reward", "kl_to_ref", "reward_args")},
            **({"shared_from": run["shared_from"]} if "shared_from" in run else {}),
            "curve": [[0, references["sft_gold"], 0.0]]
            + [[r["step"] * per_step, r["gold_reward"], r["kl_to_ref"]] for r in evals],
            "parts": {k.removeprefix("reward/"): float(np.mean([r[k] for r in train if k in r])) for k in parts},
            "credit_curve": [
                {"episodes": r["step"] * per_step}
                | {k.removeprefix("credit/"): _finite(v) for k, v in r.items() if k.startswith("credit/")}
                for r in evals
            ],
        }
    return {
        "cell": name,
        "seed": int(config.seed),
        "horizon": horizon,
        "dpo_pairs": dpo_pairs,
        "varies": varies,
        "design": _design_hash(config, name),
        "methods": out_methods,
        "references": references,
        "credit": {k: _finite(v) for k, v in credit.items() if not isinstance(v, dict)},
    }


def _finite(value):
    value = float(value)
    return value if np.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# A seed, and across seeds.


def run(pipeline: Pipeline) -> dict:
    d = design(pipeline.config)
    seeds = len(parse_seeds(pipeline.config.seeds))
    folder = summaries_dir(pipeline.workdir, d, seeds)
    summaries = []
    for horizon in d.horizons:
        config = pipeline.config if horizon == d.center else horizon_config(pipeline.config, horizon, d.reward_pairs)
        names = _cell_names(d, horizon)
        done = _committed(folder, pipeline.config.seed, names, config)
        summaries += done.values()
        wanted = [name for name in names if name not in done]
        if is_main_process() and done:  # committed by an earlier session: their work is not redone
            left = f"; running {', '.join(wanted)}" if wanted else ""
            print(f"[horizon {horizon}] seed {pipeline.config.seed}: {', '.join(done)} in {folder}: skipped{left}")
        if not wanted:
            continue
        if horizon == d.center:
            opened = contextlib.nullcontext(pipeline)
        else:
            opened = pipeline.variant(f"horizon_{horizon}", config)
        with opened as p:
            cells = _horizon_cells(p, d, horizon, wanted)
        if is_main_process():
            for cell in cells:
                path = folder / f"seed_{cell['seed']}" / f"{cell['cell']}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, cell)
        summaries += cells
    return pipeline.results(summaries=summaries, summaries_dir=str(folder), center=d.center)


def aggregate(per_seed: list[dict], workdir: Path) -> dict:
    """The across-seed report (experiments/synthetic_study_report.py) of every summary in the
    summaries folder: this run's seeds and any committed earlier, with the same design."""
    from experiments import synthetic_study_report

    folder = Path(per_seed[0]["summaries_dir"])
    summaries = synthetic_study_report.load_summaries(folder)
    return synthetic_study_report.aggregate_summaries(summaries, workdir)
