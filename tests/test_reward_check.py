"""The recipe's token rewards are called on fake inputs before any stage runs
(rto_jax/pipeline/reward_check.py): a reward that breaks the contract is one line naming it, its
file and what was expected, through experiments/run.py, before SFT; the stock rewards pass; a
reward that turns NaN during training is named by its part first."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rto_jax.errors import ConfigError
from rto_jax.objectives.token_rewards import TOKEN_REWARDS, log_ratio, reward_args, rto, token_reward
from rto_jax.pipeline import base_config, run, set_recipe
from rto_jax.pipeline.common import NonFiniteError
from rto_jax.pipeline.config import config_from_file
from rto_jax.pipeline.loop import reward_parts_first
from rto_jax.pipeline.reward_check import DEFAULT_MODELS, check_recipe_rewards, check_token_reward, fake_inputs

ROOT = Path(__file__).resolve().parents[1]
OFFERED = (*DEFAULT_MODELS, "reward")

os.environ.setdefault("RTO_JAX_NO_TQDM", "1")


def load_config(name: str, preset: str):
    return config_from_file(ROOT / "configs" / f"{name}.py", preset)  # as run.py's --config loads it


# ----------------------------------------------------------------------------------------------
# A broken reward in a copy of experiments/rto.py, run through experiments/run.py.

# Each body is a reward with RTO's coefficients (the config's ppo.reward_args) that breaks one rule.
HEADER = """
import jax.numpy as jnp
from rto_jax.objectives.masked import apply_mask
from rto_jax.objectives.token_rewards import log_ratio, token_reward

"""
SIGNATURE = "def broken(logps, score, mask, *, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01, beta_rm=1.0):\n"
BROKEN = {
    # kind: (uses, body, what the message must say)
    "shape": (
        '"ref"',
        'kl = -beta_kl * log_ratio(logps, "policy", "ref", mask)\nreturn kl.sum(-1), {"kl": kl}',
        r"returned rewards as an array of shape \(3,\) float32; expected \[B, R\] = \(3, 5\)",
    ),
    "dtype": (
        '"ref"',
        'kl = -beta_kl * log_ratio(logps, "policy", "ref", mask)\nreturn kl.astype(jnp.bfloat16), {"kl": kl}',
        r"returned rewards of dtype bfloat16; expected float32",
    ),
    "parts_sum": (
        '"ref", "dpo"',
        'kl = -beta_kl * log_ratio(logps, "policy", "ref", mask)\n'
        'dpo = beta_dpo * log_ratio(logps, "dpo", "ref", mask)\n'
        'return kl + dpo, {"kl": kl, "dpo": kl}',  # the second part is the first one again
        r"returned parts that do not sum to the rewards: dpo \+ kl = .* expected equal",  # jit sorts them
    ),
    "non_finite": (
        '"ref"',
        'kl = -beta_kl * log_ratio(logps, "policy", "ref", mask)\n'
        "n = mask.sum(-1, keepdims=True)\n"
        "mean = kl.sum(-1, keepdims=True) / n\n"
        "std = jnp.sqrt((apply_mask(kl - mean, mask) ** 2).sum(-1, keepdims=True) / (n - 1))\n"  # 0/0: 1 token
        "white = apply_mask((kl - mean) / std, mask)\n"
        'return white, {"kl": white}',
        r"with beta_dpo=0\.05, beta_kl=0\.01, beta_rm=1, dpo_clip=0\.05 returned part 'kl' with nan at \[2, 0\]; "
        r"expected finite values",
    ),
    "outside_mask": (
        '"ref"',
        'kl = -beta_kl * log_ratio(logps, "policy", "ref", mask)\n'
        "bonus = 0.1 * jnp.ones_like(mask)\n"  # forgot `* mask`
        'return kl + bonus, {"kl": kl, "bonus": bonus}',
        r"returned part 'bonus' = 0\.1 at \[1, 3\], outside the mask \(row 1 has 3 tokens\); expected 0 there",
    ),
    "raises": (
        '"ref"',
        'kl = -beta_kl * log_ratio(logps, "policy", "dpo", mask)\nreturn kl, {"kl": kl}',  # "dpo" not in uses
        r"raised KeyError: 'dpo' \(logps holds policy, policy@T=1, ref, ref@T=1: a model it reads must be listed",
    ),
    "fails_traced": (
        '"ref"',
        'kl = -beta_kl * log_ratio(logps, "policy", "ref", mask)\n'
        "if float(kl.max()) > 1e3:\n    kl = kl / 2\n"  # a Python branch on a value: fine eagerly only
        'return kl, {"kl": kl}',
        r"raised ConcretizationTypeError: .* when traced \(under jax\.jit, as in training\)",
    ),
    "not_offered": (
        '"ref", "sft_v2"',
        'kl = -beta_kl * log_ratio(logps, "policy", "sft_v2", mask)\nreturn kl, {"kl": kl}',
        r"uses 'sft_v2', which .*broken_recipe\.py does not offer; it offers ref, dpo, reward",
    ),
    "not_a_pair": (
        '"ref"',
        'return -beta_kl * log_ratio(logps, "policy", "ref", mask)',
        r"returned an array of shape \(3, 5\) float32; expected a pair \(rewards \[B, R\], parts",
    ),
}


def broken_recipe(folder: Path, kind: str) -> tuple[Path, int]:
    """experiments/rto.py with its TOKEN_REWARD replaced by the `kind` reward -> (file, its `def` line)."""
    uses, body, _ = BROKEN[kind]
    source = (ROOT / "experiments" / "rto.py").read_text()
    assert "\nTOKEN_REWARD = rto\n" in source
    reward = f"{HEADER}@token_reward({uses})\n{SIGNATURE}" + "".join(f"    {line}\n" for line in body.split("\n"))
    text = source.replace("\nTOKEN_REWARD = rto\n", reward + "\n\nTOKEN_REWARD = broken\n")
    path = folder / "broken_recipe.py"
    path.write_text(text)
    return path, text.splitlines().index(f"@token_reward({uses})") + 1  # where the function's source starts


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_reward_is_one_line_before_any_stage(kind, tmp_path):
    """Through experiments/run.py on the tiny preset: exit 2, one line naming the reward, its file and
    line and what was expected, no traceback, the workdir it created removed (nothing was trained:
    a run that had started would have written config.json and kept the workdir)."""
    recipe, line = broken_recipe(tmp_path, kind)
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "run.py"),
        "--config=configs/rto_tldr.py:tiny",
        f"--config.recipe={recipe}",
        f"--workdir={workdir}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    message = done.stderr.strip()
    prefix = f"error: config.recipe: token reward 'broken' ({recipe}:{line})"
    assert message.startswith(prefix), (message, prefix)
    assert re.search(BROKEN[kind][2], message), message
    assert not workdir.exists()


# ----------------------------------------------------------------------------------------------
# In-process: the stock rewards and recipes, the tolerance of the parts' sum, METHODS' coefficients.


@pytest.mark.parametrize("name", list(TOKEN_REWARDS))
def test_the_stock_rewards_pass(name):
    check_token_reward(TOKEN_REWARDS[name], reward_args(TOKEN_REWARDS[name]), OFFERED, "experiments/rto.py")


@pytest.mark.parametrize(
    "config_file, preset",
    [("rto_tldr", "tiny"), ("ppo_tldr", "tiny"), ("rto_synthetic", "tuned"), ("rto_synthetic", "study")],
)
def test_the_stock_recipes_pass(config_file, preset):
    """Their TOKEN_REWARD and every METHODS entry, with the configured coefficients."""
    check_recipe_rewards(load_config(config_file, preset))


def test_fake_inputs_are_what_ppo_gives_a_reward():
    """Rows of 5, 3 and 1 tokens; log-probs < 0 inside the mask and 0 outside, per model in `uses`
    and at temperature 1; a score only for a reward that reads the reward model."""
    logps, score, mask = fake_inputs(rto)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), [5, 3, 1])
    assert set(logps) == {f"{m}{t}" for m in ("policy", "ref", "dpo") for t in ("", "@T=1")}
    for value in logps.values():
        assert value.dtype == jnp.float32 and value.shape == (3, 5)
        assert np.all((np.asarray(value) < 0) == (np.asarray(mask) > 0))
    assert score.shape == (3,) and fake_inputs(TOKEN_REWARDS["rto_no_rm"])[1] is None
    assert not np.allclose(logps["dpo@T=1"], logps["ref@T=1"])  # a DPO term that is not 0


def test_a_reward_branching_in_python_on_a_float_coefficient_is_refused():
    """Float coefficients are traced in training (one program for a sweep): a Python `if` on one works
    eagerly only; the check, tracing them as PPO's step does, says so and what to write instead."""

    @token_reward("ref")
    def switch(logps, score, mask, *, beta_kl=0.01, bonus=0.0):
        kl = -beta_kl * log_ratio(logps, "policy", "ref", mask)
        if bonus > 0:  # should be jnp.where(bonus > 0, ...)
            kl = kl + bonus * mask
        return kl, {"kl": kl}

    switch(*fake_inputs(switch))  # fine eagerly
    with pytest.raises(ConfigError, match=r"TracerBoolConversionError.* when traced .* jnp\.where, not a Python if"):
        check_token_reward(switch, {"beta_kl": 0.01, "bonus": 0.5}, OFFERED, "experiments/rto.py")


def _rto_with_parts_off_by(relative: float):
    @token_reward("ref", "dpo", "reward")
    def off_by(logps, score, mask, *, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01, beta_rm=1.0):
        rewards, parts = rto(logps, score, mask, beta_dpo=beta_dpo, dpo_clip=dpo_clip, beta_kl=beta_kl, beta_rm=beta_rm)
        return rewards, {**parts, "kl": parts["kl"] * (1 + relative)}

    return off_by


def test_parts_must_sum_to_the_rewards_to_float32_rounding():
    """A part 0.1% off is refused; one off by float32 rounding (summed in another order) is not."""
    with pytest.raises(ConfigError, match=r"token reward 'off_by' \(.*test_reward_check\.py:\d+\).*do not sum"):
        check_token_reward(_rto_with_parts_off_by(1e-3), {}, OFFERED, "experiments/x.py")
    check_token_reward(_rto_with_parts_off_by(1e-7), {}, OFFERED, "experiments/x.py")


def test_a_reward_without_its_uses_is_named():
    def plain(logps, score, mask, *, beta_kl=0.01):
        return mask * beta_kl, {"kl": mask * beta_kl}

    with pytest.raises(ConfigError, match=r"token reward 'plain' \(.*test_reward_check\.py:\d+\) is not marked @token"):
        check_token_reward(plain, {}, OFFERED, "experiments/x.py")


RECIPE_WITH_METHODS = """
import jax.numpy as jnp
from rto_jax.objectives.token_rewards import log_ratio, ppo, rto, token_reward


@token_reward("ref")
def relative_kl(logps, score, mask, *, beta_kl=0.01):
    kl = log_ratio(logps, "policy", "ref", mask) / beta_kl * beta_kl**2  # inf at beta_kl = 0
    return -kl, {"kl": -kl}


METHODS = (ppo, rto, relative_kl)
TOKEN_REWARD = rto


def run(pipeline):
    raise AssertionError("not run by these tests")
"""


def test_each_method_is_checked_with_its_configured_coefficients(tmp_path):
    path = tmp_path / "methods.py"
    path.write_text(RECIPE_WITH_METHODS)
    config = base_config()
    set_recipe(config, str(path))
    check_recipe_rewards(config)
    config.ppo.per_method = "relative_kl:beta_kl=0"  # this method's own coefficient, not the shared one
    with pytest.raises(ConfigError, match=r"token reward 'relative_kl' .* with beta_kl=0 returned part 'kl' with"):
        check_recipe_rewards(config)
    config.ppo.per_method = "rto:beta_kl=0"  # RTO takes it: no division
    check_recipe_rewards(config)


def test_a_recipe_offering_another_model_declares_it(tmp_path):
    """`MODELS` in the recipe: the frozen models it passes to stages.run_ppo."""
    text = RECIPE_WITH_METHODS.replace('@token_reward("ref")', '@token_reward("ref", "sft_v2")')
    text = text.replace("METHODS = (ppo, rto, relative_kl)", "METHODS = (relative_kl,)")
    config = base_config()
    for name, declared in (("undeclared", ""), ("declared", '\nMODELS = ("ref", "dpo", "sft_v2")\n')):
        (tmp_path / f"{name}.py").write_text(text + declared)
    set_recipe(config, str(tmp_path / "undeclared.py"))
    with pytest.raises(ConfigError, match=r"uses 'sft_v2', which .*undeclared\.py does not offer; it offers ref, dpo"):
        check_recipe_rewards(config)
    set_recipe(config, str(tmp_path / "declared.py"))
    check_recipe_rewards(config)


# ----------------------------------------------------------------------------------------------
# NaN during training: the reward's part is named first.


def test_reward_parts_are_listed_first():
    values = {"approx_kl": 1.0, "loss": 2.0, "reward/total": 3.0, "entropy": 4.0, "reward/dpo": 5.0, "reward/kl": 6}
    first = ["reward/dpo", "reward/kl", "reward/total", "approx_kl", "loss", "entropy"]
    assert list(reward_parts_first(values)) == first
    assert reward_parts_first(values) == values


NAN_ON_STEP_2 = """
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from rto_jax.objectives.masked import apply_mask
from rto_jax.objectives.token_rewards import ppo, token_reward
from rto_jax.pipeline import load_recipe, model_path, stages

ROLLOUTS = []  # the rollouts this reward has seen (the check before the run calls it on 3 rows)


def _rollout_number(mask):
    if mask.shape[0] == {rollout_batch}:
        ROLLOUTS.append(mask.shape)
    return np.float32(len(ROLLOUTS))


@token_reward("ref", "reward")
def nan_on_step_2(logps, score, mask, *, beta_kl=0.05, beta_rm=1.0):
    rewards, parts = ppo(logps, score, mask, beta_kl=beta_kl, beta_rm=beta_rm)
    number = io_callback(_rollout_number, jax.ShapeDtypeStruct((), jnp.float32), mask)
    bonus = apply_mask(jnp.where(number == 2, jnp.nan, 0.0) * jnp.ones_like(mask), mask)
    return rewards + bonus, {{**parts, "bonus": bonus}}


TOKEN_REWARD = nan_on_step_2


def run(pipeline):
    shared = load_recipe("experiments/synthetic_compare.py").shared_models
    sft, _, reward_model, _ = shared(pipeline)
    models = {{"ref": model_path(sft)}}
    return pipeline.stage("ppo", stages.run_ppo, token_reward=TOKEN_REWARD, models=models, reward=reward_model)
"""


def test_a_reward_turning_nan_in_training_is_named_first(tmp_path):
    """The synthetic smoke task, PPO with a reward that passes the check but is NaN on the second
    rollout: the stage stops at step 2 naming reward/bonus, then reward/total, then the rest."""
    config = load_config("rto_synthetic", "smoke")
    recipe = tmp_path / "nan_recipe.py"
    recipe.write_text(NAN_ON_STEP_2.format(rollout_batch=config.ppo.rollout_batch_size))
    set_recipe(config, str(recipe))
    with config.unlocked():
        config.stages = "sft,preferences,reward_model,ppo"
        config.sft.max_steps, config.reward_model.max_steps = 1, 1
        config.ppo.per_method = ""
    with pytest.raises(NonFiniteError) as error:
        run(config, tmp_path / "run")
    message = str(error.value)
    assert re.match(r"ppo: non-finite reward/bonus, reward/total, \w", message), message
    assert "at step 2" in message
