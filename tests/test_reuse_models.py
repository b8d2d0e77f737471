"""`config.reuse_models_from`: a new token reward tried on a finished run's SFT, reward model and DPO
models (and tokenizer), so only PPO and the evaluation run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.errors import ConfigError
from rto_jax.pipeline import common, run
from rto_jax.pipeline.config import validate, with_reused_models
from rto_jax.pipeline.logging import read_metrics
from rto_jax.pipeline.recipes import set_recipe
from tests.test_pipeline import fixture_data, small_config  # noqa: F401 (fixture_data is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def _with_bpe(config):
    """small_config with the BPE trained in the workdir (as the tiny preset does), not given."""
    config.tokenizer.path, config.tokenizer.bpe_vocab_size, config.tokenizer.bpe_max_texts = "", 320, 200
    return config


@pytest.fixture(scope="module")
def finished_run(fixture_data, tmp_path_factory):  # noqa: F811
    """A run that trained its BPE, SFT, reward model and DPO (the models a reward experiment reuses)."""
    workdir = tmp_path_factory.mktemp("finished")
    run(_with_bpe(small_config(*fixture_data, "sft,reward_model,dpo")), workdir)
    return workdir


def test_only_ppo_and_evaluation_run_on_the_reused_models(fixture_data, finished_run, tmp_path, monkeypatch):  # noqa: F811
    loaded = []
    load_model = common.load_model
    monkeypatch.setattr(common, "load_model", lambda name, *a, **k: loaded.append(str(name)) or load_model(name, *a, **k))
    config = _with_bpe(small_config(*fixture_data))  # every stage asked for, a BPE to train: both taken instead
    config.reuse_models_from = str(finished_run)
    results = run(config, tmp_path / "run")

    stages = {r["stage"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    assert stages == {"ppo", "evaluate"}
    for stage in ("sft", "reward_model", "dpo", "tokenizer"):
        assert not (tmp_path / "run" / stage).exists(), f"{stage} was made again"
    models = {stage: str(finished_run / stage / "model") for stage in ("sft", "reward_model", "dpo")}
    assert set(models.values()) <= set(loaded)  # PPO's reference, reward/critic and DPO policy (evaluated)
    trained_here = str(tmp_path / "run")
    assert all(path in models.values() or path.startswith(trained_here) for path in loaded), loaded
    # The reused stages' summaries, reward normalization included, are the finished run's.
    rm_done = json.loads((finished_run / "reward_model" / "done.json").read_text())
    assert results["stages"]["reward_model"]["reward_mean"] == rm_done["reward_mean"]
    assert results["stages"]["sft"]["model_path"] == models["sft"]
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["tokenizer"] == {**written["tokenizer"], "path": models["sft"], "bpe_vocab_size": 0}
    assert written["reuse_models_from"] == str(finished_run)


def test_a_run_without_the_models_the_reward_needs_is_refused_naming_what_is_missing(
    fixture_data, finished_run, tmp_path  # noqa: F811
):
    partial = tmp_path / "partial"
    partial.mkdir()
    for stage in ("sft", "reward_model"):  # a run stopped before DPO
        (partial / stage).mkdir()
        done = json.loads((finished_run / stage / "done.json").read_text())
        (partial / stage / "done.json").write_text(json.dumps({**done, "model_path": str(finished_run / stage / "model")}))
    config = _with_bpe(small_config(*fixture_data))
    config.reuse_models_from = str(partial)
    with pytest.raises(ConfigError, match=r"config.reuse_models_from: .*partial has no finished dpo stage.*'rto'"):
        validate(with_reused_models(config), tmp_path / "run")
    set_recipe(config, "experiments/ppo.py")  # PPO's reward reads no DPO policy: the partial run is enough
    validate(with_reused_models(config), tmp_path / "run")

    config.reuse_models_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"config.reuse_models_from: .*nowhere' is not a folder"):
        validate(with_reused_models(config), tmp_path / "run")
    (partial / "reward_model" / "done.json").write_text(json.dumps({"model_path": str(tmp_path / "gone")}))
    config.reuse_models_from = str(partial)
    with pytest.raises(ConfigError, match=r"reward_model/done.json names the model .*gone', which does not exist"):
        validate(with_reused_models(config), tmp_path / "run")


@pytest.mark.needs_shared_data
def test_the_command_line_error_is_one_line(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "run.py"),
        f"--config={ROOT / 'configs' / 'rto_tldr.py'}:tiny",
        f"--workdir={tmp_path / 'run'}",
        f"--config.reuse_models_from={tmp_path}",  # a folder with no finished stage
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: config.reuse_models_from: {tmp_path} has no finished sft stage (sft/done.json), and the token "
        "reward 'rto' needs it: reuse a run that finished it, or set sft.init_from"
    ]
    assert not (tmp_path / "run").exists()
