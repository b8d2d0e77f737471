"""Config files and presets load and validate; bad values fail before any work, naming the key."""

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.pipeline import config as config_lib
from rto_jax.objectives.token_rewards import TOKEN_REWARDS, BoundReward, reward_args
from rto_jax.pipeline.config import ConfigError, validate
from rto_jax.pipeline.recipes import load_recipe, set_recipe
from rto_jax.pipeline.stages import ppo_config
from rto_jax.pipeline.tasks import Task
from tests.conftest import SHARED_FILES, shared_data_skip_reason

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "rto_tldr": ["1b", "2.8b", "6.9b", "tiny"],
    "rto_rloo_tldr": ["1b", "2.8b", "6.9b", "tiny"],
    "rto_grpo_tldr": ["1b", "2.8b", "6.9b", "tiny"],
    "ppo_tldr": ["1b", "tiny"],
    "dpo_tldr": ["1b", "tiny"],
    "rto_ultrafeedback": ["llama3_8b", "smollm2", "tiny"],
    "rto_synthetic": ["demo", "full", "smoke", "tune", "tune_methods", "tuned", "study", "study_smoke"],
}
NO_SHARED = shared_data_skip_reason()  # None where the offline samples are there


def load_config(name: str, preset: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _comments_missing(*functions) -> list[str]:
    """Lines of `functions` assigning a config field without a trailing comment."""
    missing = []
    for line in "\n".join(inspect.getsource(f) for f in functions).splitlines():
        s = line.strip()
        if s.startswith(("c.", "s.", "stage.")) and "=" in s and "#" not in s and "ConfigDict()" not in s:
            missing.append(s)
    return missing


@pytest.mark.parametrize("name,preset", [(n, p) for n, presets in PRESETS.items() for p in presets])
def test_every_preset_loads_and_validates(name, preset):
    config = load_config(name, preset)
    if preset == "tiny" and NO_SHARED:
        pytest.skip(NO_SHARED)  # the tiny presets read the offline samples
    validate(config)
    assert config.name.endswith(preset)


def test_every_base_field_has_a_comment():
    assert _comments_missing(config_lib.base_config, config_lib._source, config_lib._optimizer) == []


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("rto_tldr", "huge")


def _tiny():
    config = load_config("rto_tldr", "tiny")
    # Local paths must exist for validation: point them at this file when the shared data is absent.
    if NO_SHARED:
        config.data.sft.path = config.data.preference.path = ""
        config.data.preference.path = str(ROOT / "tests" / "test_configs.py")
    return config


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("stages", "sft,train_more", "config.stages: unknown stage 'train_more'"),
        ("stages", "ppo,sft", "config.stages: stages must be distinct and in the order"),
        ("data.max_response_len", 1, "config.data.max_response_len: must be >= 2"),
        ("data.max_prompt_len", 400, "config.model.max_position_embeddings: 256 < max_prompt_len"),
        ("data.pad_id", 1, "config.data.pad_id: pad_id must differ from eos_id"),
        ("recipe", "experiments/grpo.py", "config.recipe: recipe 'experiments/grpo.py' not found"),
        ("ppo.num_minibatches", 3, "config.ppo.num_minibatches: 3 does not divide rollout_batch_size 16"),
        ("sft.grad_accum_steps", 3, "config.sft.grad_accum_steps: 3 does not divide batch_size 16"),
        ("sft.init_from", "/no/such/model", "config.sft.init_from: '/no/such/model' does not exist"),
        (
            "data.preference.path",
            "/no/such/file.parquet",
            "config.data.preference.path: data file '/no/such/file.parquet'",
        ),
        ("data.preference.format", "tldr_sft", "config.data.preference.format: 'tldr_sft' is a sft format"),
        ("dpo.loss_type", "kto", "config.dpo.loss_type: expected"),
        ("model.attention", "flash", "config.model.attention: expected one of ('auto', 'xla', 'blockwise', 'cudnn', 'splash')"),
        ("ppo.total_episodes", 8, "config.ppo.total_episodes: 8 < one rollout batch"),
        ("tokenizer.bpe_vocab_size", 100, "config.tokenizer.bpe_vocab_size: 100 < 300"),
        ("ppo.loss_average", "row", "config.ppo.loss_average: must be one of token, sequence"),
        ("ppo.per_method", "rto:lr=1e-4", "config.ppo.per_method: experiments/rto.py trains one token reward"),
        ("ppo.per_method", "rto lr=1e-4", "config.ppo.per_method: expected 'method:key=value,...'"),
    ],
)
def test_bad_values_name_their_key(key, value, message):
    config = _tiny()
    section, _, field = key.rpartition(".")
    if key == "data.pad_id":
        config.data.eos_id = 1
    node = config
    for part in filter(None, section.split(".")):
        node = node[part]
    node[field] = value
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert str(error.value).startswith(message), str(error.value)


def test_batches_must_split_over_the_mesh():
    config = _tiny()  # batch 16 everywhere
    config.mesh.fsdp = 4
    validate(config, num_devices=8)  # data=2 x fsdp=4 = 8 rows per split: 16 divides
    with pytest.raises(ConfigError, match=r"config.mesh: mesh .* 6 devices not divisible"):
        validate(config, num_devices=6)
    config.dpo.batch_size = 12
    with pytest.raises(ConfigError, match=r"config.dpo.batch_size: 12 rows do not split over .* 2 x 4 .*multiple of 8"):
        validate(config, num_devices=8)
    config.dpo.batch_size, config.ppo.rollout_batch_size = 16, 4
    config.ppo.total_episodes = 16
    with pytest.raises(ConfigError, match=r"config.ppo.rollout_batch_size: 4 rows"):
        validate(config, num_devices=8)
    validate(config, num_devices=4)  # data=1 x fsdp=4


def test_a_stage_needing_a_model_nobody_makes_is_refused(tmp_path):
    config = _tiny()
    config.stages = "ppo,evaluate"  # RTO needs sft, reward_model and dpo models
    with pytest.raises(ConfigError, match=r"config.sft.init_from: stage 'ppo' needs the sft model"):
        validate(config, tmp_path)
    config.sft.init_from = config.reward_model.init_from = str(tmp_path)
    config.tokenizer.bpe_vocab_size = 0  # given models bring their tokenizer
    with pytest.raises(ConfigError, match=r"config.dpo.init_from: stage 'ppo' needs the dpo model .*'rto'"):
        validate(config, tmp_path)
    set_recipe(config, "experiments/ppo.py")  # PPO's reward reads no DPO policy
    validate(config, tmp_path)
    set_recipe(config, "experiments/rto.py")
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "done.json").write_text("{}")  # finished in this workdir earlier
    validate(config, tmp_path)


def test_recipes_bind_their_token_reward_to_the_config_coefficients():
    config = _tiny()
    task = Task(
        "t", pad_id=0, eos_id=1, vocab_size=8, prompt_length=4, response_length=6, prompts_train={}, eval_prompts={}
    )
    assert load_recipe(config.recipe).TOKEN_REWARD is TOKEN_REWARDS["rto"]
    assert config.ppo.reward_args.to_dict() == reward_args(TOKEN_REWARDS["rto"])  # base config = rto's defaults
    config.ppo.reward_args.beta_kl = 0.3
    ppo = ppo_config(config, task, load_recipe(config.recipe).TOKEN_REWARD)
    assert isinstance(ppo.token_reward, BoundReward) and ppo.token_reward.fn is TOKEN_REWARDS["rto"]
    assert dict(ppo.token_reward.args)["beta_kl"] == 0.3 and ppo.sampling.max_new_tokens == 6
    ppo_tldr = load_config("ppo_tldr", "1b")
    assert load_recipe(ppo_tldr.recipe).TOKEN_REWARD is TOKEN_REWARDS["ppo"]
    assert ppo_tldr.ppo.reward_args.to_dict() == {"beta_kl": 0.05, "beta_rm": 1.0}
    config.ppo.reward_args.beta_kl = -1.0
    with pytest.raises(ConfigError, match=r"config.ppo.reward_args.beta_kl: must be >= 0"):
        validate(config)
    set_recipe(config, "experiments/ppo.py")
    with config.unlocked():
        config.ppo.reward_args.beta_dpo = 0.1  # PPO's reward has no DPO term: refused, not ignored
    with pytest.raises(ConfigError, match=r"config.ppo.reward_args.beta_dpo: the token reward 'ppo'.*takes no"):
        validate(config)


def _run_cli(*args):
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_rejects_bad_values_and_unknown_keys_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    bad = _run_cli("--config=configs/rto_tldr.py:1b", f"--workdir={workdir}", "--config.recipe=nope.py")
    assert bad.returncode != 0 and "config.recipe: recipe 'nope.py' not found" in bad.stderr + bad.stdout
    unknown = _run_cli("--config=configs/rto_tldr.py:1b", f"--workdir={workdir}", "--config.ppo.learning_rate=1e-6")
    assert unknown.returncode != 0 and "learning_rate" in unknown.stderr + unknown.stdout
    assert not workdir.exists()  # nothing was written


def test_a_test_that_reads_the_offline_samples_skips_naming_their_folder(tmp_path):
    """Without ../shared/data (a fresh clone alone), `needs_shared_data` tests skip, naming where the
    samples were looked for and what is missing; with every file there they run."""
    absent, present = tmp_path / "absent", tmp_path / "data"
    present.mkdir()
    for name in SHARED_FILES:
        (present / name).write_bytes(b"")
    marked = tmp_path / "test_marked.py"
    marked.write_text("import pytest\n\n\n@pytest.mark.needs_shared_data\ndef test_reads_them():\n    pass\n")

    def outcome(folder):
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-rs", "-q", str(marked)],
            cwd=ROOT,
            env={**os.environ, "RTO_JAX_SHARED_DATA": str(folder)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return " ".join(proc.stdout.split())  # pytest wraps long skip reasons

    skipped = outcome(absent)
    assert "1 skipped" in skipped and f"needs the offline sample data in {absent} (missing" in skipped, skipped
    assert all(name in skipped for name in SHARED_FILES), skipped
    assert "1 passed" in outcome(present)
