"""The `smollm2` presets of configs/{rto,ppo,dpo}_tldr.py: SmolLM2-135M-Instruct (the GGUF of
`make smollm2`) on the offline TL;DR samples. The full run takes ~30 minutes (docs/results/smollm2.md); here: its validation and source checks, and the first stages for a few steps on short
sequences, through experiments/run.py as a user runs it.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.models.smollm2 import find_smollm2_gguf
from rto_jax.pipeline.config import config_from_file, validate
from rto_jax.pipeline.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(find_smollm2_gguf() is None, reason="SmolLM2 GGUF not cached (run `make smollm2`)"),
    pytest.mark.needs_shared_data,
]


@pytest.mark.parametrize("recipe", ["rto", "ppo", "dpo"])
def test_the_presets_validate_and_their_sources_check_out(recipe):
    from rto_jax.pipeline.sources import check_sources
    from rto_jax.pipeline.tasks import choose_special_tokens

    config = config_from_file(ROOT / "configs" / f"{recipe}_tldr.py", "smollm2")
    validate(config)
    assert config.tokenizer.bpe_vocab_size == 0 and config.model.init_from == str(find_smollm2_gguf())
    for stage in ("sft", "reward_model", "dpo", "ppo"):  # fine-tuning rates, not :tiny's random-init 1e-3
        assert config[stage].lr <= 3e-5, stage
    tokenizer = check_sources(config)  # the model's own 49k tokenizer, checked against its vocabulary
    assert len(tokenizer) == 49152
    # SmolLM2's pad is its EOS; the run takes its unknown token <|endoftext|> as pad instead.
    chosen = choose_special_tokens(tokenizer)
    assert (chosen["pad_id"], chosen["pad_token"], chosen["eos_id"], chosen["eos_token"]) == (
        0,
        "<|endoftext|>",
        2,
        "<|im_end|>",
    )


@pytest.mark.slow
def test_the_rto_preset_trains_its_first_stages_on_the_real_model(tmp_path):
    workdir = tmp_path / "run"
    overrides = {
        "stages": "sft,reward_model",
        "data.max_prompt_len": 48,
        "data.max_response_len": 12,
        "data.sft.max_rows": 120,
        "data.preference.max_rows": 120,
        "data.eval_size": 8,
        "sft.batch_size": 2,
        "sft.max_steps": 3,
        "sft.eval_batch_size": 8,
        "reward_model.batch_size": 2,
        "reward_model.max_steps": 2,
        "reward_model.eval_batch_size": 8,
        "reward_model.normalize_rows": 8,
        "checkpoint.every_steps": 2,
    }
    env = {**os.environ, "RTO_JAX_NO_TQDM": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "run.py"),
            f"--config={ROOT / 'configs' / 'rto_tldr.py'}:smollm2",
            f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["special_tokens"]["pad_id"] == 0 and results["special_tokens"]["eos_id"] == 2
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if r.get("split", "train") == "train"]
    sft_losses = [r["loss"] for r in records if r["stage"] == "sft"]
    # A pretrained model: its first loss on TL;DR summaries is a few nats, not log(49152) = 10.8.
    assert len(sft_losses) == 3 and all(math.isfinite(x) and x < 6.0 for x in sft_losses), sft_losses
    assert json.loads((workdir / "reward_model" / "done.json").read_text())["reward_std"] > 0
    for folder in ("sft/model", "reward_model/model"):
        exported = json.loads((workdir / folder / "config.json").read_text())
        assert exported["vocab_size"] == 49152 and exported["num_hidden_layers"] == 30, folder
        assert (exported["pad_token_id"], exported["eos_token_id"]) == (0, 2), folder
        assert (workdir / folder / "tokenizer.json").exists(), folder
    assert not any(workdir.glob("*/checkpoints"))  # finished stages keep their exports only
