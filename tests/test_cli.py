"""experiments/run.py as a user meets it: --help, --dry_run, the recipe and its coefficients on the
command line, and one-line errors for mistakes in overrides and in config files; recipes and configs
as importable modules (rto_jax/pipeline/recipes.py)."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.objectives.token_rewards import reward_args
from rto_jax.pipeline.config import config_from_file
from rto_jax.pipeline.recipes import load_recipe, set_recipe

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "experiments" / "run.py")
TINY = f"--config={ROOT / 'configs' / 'rto_tldr.py'}:tiny"


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _dry_run(tmp_path, *args, cwd=ROOT) -> dict:
    done = _run(*args, f"--workdir={tmp_path / 'run'}", "--dry_run", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _one_line_error(done, *needles):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _config_modules():
    return sorted(p for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))


def test_help_exits_0_and_lists_every_config_with_its_presets():
    done = _run("--help", cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for path in _config_modules():
        (at,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"configs/{path.name}:")]
        presets_line = lines[at + 1]
        text = path.read_text()
        namespace: dict = {}
        exec(compile(text, str(path), "exec"), namespace)  # the file's own PRESETS and default
        presets = namespace["PRESETS"]
        default = inspect.signature(namespace["get_config"]).parameters["preset"].default
        assert presets[0] == default, f"{path.name}: PRESETS[0] must be get_config's default {default!r}"
        listed = presets_line.split("presets:", 1)[1].strip().split(", ")
        assert listed == [f"{presets[0]} (default)", *presets[1:]], presets_line
    assert "--dry_run" in done.stdout and "--workdir" in done.stdout


@pytest.mark.parametrize("path", _config_modules(), ids=lambda p: p.stem)
def test_every_listed_preset_builds_and_an_unlisted_one_is_refused(path):
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    for preset in namespace["PRESETS"]:
        if preset == "smollm2" and "rto_ultrafeedback" not in path.name:
            continue  # needs the GGUF `make smollm2` caches (tests/test_smollm2_preset.py)
        config = config_from_file(path, preset)
        assert config.name.endswith(preset)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        config_from_file(path, "nope")


@pytest.mark.needs_shared_data
def test_recipe_on_the_command_line_takes_the_new_rewards_coefficients(tmp_path):
    base = _dry_run(tmp_path, TINY)
    assert base["recipe"] == "experiments/rto.py" and base["name"] == "rto_tldr_tiny"
    assert set(base["ppo"]["reward_args"]) == {"beta_dpo", "dpo_clip", "beta_kl", "beta_rm"}
    # A coefficient given before or after --config.recipe applies to the new reward.
    ppo = _dry_run(
        tmp_path,
        TINY,
        "--config.ppo.reward_args.beta_kl=0.07",
        "--config.recipe=experiments/ppo.py",
        "--config.stages=sft,reward_model,ppo,evaluate",
    )
    assert ppo["recipe"] == "experiments/ppo.py" and ppo["name"] == "ppo_tldr_tiny"
    assert ppo["ppo"]["reward_args"] == {"beta_kl": 0.07, "beta_rm": 1.0}
    # A module name works too; --config.name wins over the name set_recipe derives.
    fork = _dry_run(
        tmp_path,
        TINY,
        "--config.recipe",
        "experiments.length_bonus",
        "--config.name=mine",
        "--config.stages=sft,reward_model,ppo,evaluate",
    )
    assert fork["name"] == "mine"
    assert fork["ppo"]["reward_args"] == reward_args(load_recipe("experiments/length_bonus.py").TOKEN_REWARD)


def test_a_coefficient_the_recipes_reward_does_not_take_is_one_line(tmp_path):
    done = _run(
        TINY, f"--workdir={tmp_path / 'run'}", "--config.recipe=experiments/ppo.py", "--config.ppo.reward_args.beta_dpo=0.1"
    )
    _one_line_error(done, "config.ppo.reward_args.beta_dpo", "'ppo'", "beta_kl, beta_rm")
    done = _run(TINY, f"--workdir={tmp_path / 'run'}", "--config.ppo.reward_args.beta_kl=lots")
    _one_line_error(done, "config.ppo.reward_args.beta_kl", "expected a number")
    assert not (tmp_path / "run").exists()


def test_a_coefficient_set_in_a_config_file_that_the_reward_does_not_take_is_one_line(tmp_path):
    bad = tmp_path / "bonus_on_rto.py"
    bad.write_text(
        "from configs import rto_tldr\n\n\n"
        "def get_config(preset='tiny'):\n"
        "    c = rto_tldr.get_config(preset)\n"
        "    c.ppo.reward_args.bonus = 0.25  # rto takes no bonus\n"
        "    return c\n"
    )
    done = _run(f"--config={bad}", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    line = _one_line_error(done, f"{bad}:6", "c.ppo.reward_args.bonus = 0.25", "'bonus'", "beta_dpo")
    assert "set_recipe" in line


def test_a_value_of_the_wrong_type_in_a_config_file_is_one_line(tmp_path):
    bad = tmp_path / "half_groups.py"
    bad.write_text(
        "from configs import rto_rloo_tldr\n\n\n"
        "def get_config(preset='tiny'):\n"
        "    c = rto_rloo_tldr.get_config(preset)\n"
        "    c.ppo.samples_per_prompt = 2.5  # an int field\n"
        "    return c\n"
    )
    done = _run(f"--config={bad}", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    _one_line_error(done, f"{bad}:6", "c.ppo.samples_per_prompt = 2.5", "float")
    assert not (tmp_path / "run").exists()


@pytest.mark.needs_shared_data
def test_a_malformed_column_map_is_one_line(tmp_path):
    done = _run(TINY, f"--workdir={tmp_path / 'run'}", "--config.data.sft.column_map=foo")
    _one_line_error(done, "config.data.sft.column_map", "'foo'", "field=column")
    done = _run(TINY, f"--workdir={tmp_path / 'run'}", "--config.data.preference.column_map=answer=col")
    _one_line_error(done, "config.data.preference.column_map", "'answer'", "chosen")
    config = _dry_run(tmp_path, TINY, "--config.data.sft.column_map=response=reference_response")
    assert config["data"]["sft"]["column_map"] == "response=reference_response"


@pytest.mark.needs_shared_data
def test_config_files_build_on_each_other_from_any_working_directory(tmp_path):
    """configs/ppo_tldr.py does `from configs import rto_tldr`: it loads from another folder too."""
    config = _dry_run(tmp_path, f"--config={ROOT / 'configs' / 'ppo_tldr.py'}:tiny", cwd=tmp_path)
    assert config["recipe"] == "experiments/ppo.py" and config["ppo"]["reward_args"]["beta_kl"] == 0.05


def test_a_recipe_outside_the_repository_may_define_dataclasses_and_import_recipes(tmp_path):
    """A recipe file loaded by path is a module in sys.modules while it runs (dataclasses look their
    module up there) and imports the repository's recipes as `experiments.*`."""
    fork = tmp_path / "my_fork.py"
    fork.write_text(
        "import dataclasses\n\n"
        "from experiments import rto\n\n\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Weights:\n"
        "    bonus: float = 0.5\n\n\n"
        "TOKEN_REWARD = rto.TOKEN_REWARD\n"
        "run = rto.run\n"
    )
    recipe = load_recipe(str(fork))
    assert recipe.Weights().bonus == 0.5 and recipe.TOKEN_REWARD is load_recipe("experiments/rto.py").TOKEN_REWARD
    assert sys.modules[recipe.__name__] is recipe
    # The same file by path or by module name is one module (experiments/ppo.py imports experiments.rto).
    assert load_recipe("experiments.rto") is load_recipe(str(ROOT / "experiments" / "rto.py"))


def test_a_fork_is_named_after_its_recipe_unless_named_by_the_user():
    config = config_from_file(ROOT / "configs" / "rto_tldr.py", "tiny")
    set_recipe(config, "experiments/length_bonus.py")
    assert config.name == "length_bonus_tldr_tiny" and config.recipe == "experiments/length_bonus.py"
    assert config.ppo.reward_args.to_dict() == {"bonus": 0.5, "beta_kl": 0.01}
    with config.unlocked():
        config.name = "my_experiment"
    set_recipe(config, "experiments/ppo.py")
    assert config.name == "my_experiment"
    set_recipe(config, "experiments/rto.py", name="back_to_rto")
    assert config.name == "back_to_rto"
