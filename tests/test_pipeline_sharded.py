"""The experiment pipeline sharded: configs/rto_tldr.py:tiny on 8 simulated CPU devices (mesh data=2 x fsdp=4).

Runs experiments/run.py in a subprocess so the XLA device-count flag does not leak into this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.pipeline.config import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]

# The overrides of test_pipeline.py's tiny end-to-end test (a handful of steps per stage).
OVERRIDES = [
    "--config.tokenizer.bpe_vocab_size=512",
    "--config.tokenizer.bpe_max_texts=800",
    "--config.data.sft.max_rows=200",
    "--config.data.preference.max_rows=300",
    "--config.data.max_prompt_len=64",
    "--config.data.max_response_len=16",
    "--config.data.eval_size=16",
    *(
        f"--config.{stage}.{key}={value}"
        for stage, steps in (("sft", 4), ("reward_model", 4), ("dpo", 3))
        for key, value in (("max_steps", steps), ("batch_size", 8), ("eval_every", 0))
    ),
    "--config.ppo.rollout_batch_size=8",
    "--config.ppo.total_episodes=16",
    "--config.ppo.num_minibatches=1",
    "--config.evaluate.num_prompts=8",
    "--config.evaluate.batch_size=8",
]


@pytest.mark.slow
def test_tiny_preset_runs_on_8_simulated_devices_fsdp(tmp_path):
    data = shared_data_dir()
    if not (data / "tldr_sft_oai1b.csv").exists() or not (data / "tldr_comparisons_10k.parquet").exists():
        pytest.skip(f"shared TL;DR sample data not found in {data} (set RTO_JAX_SHARED_DATA)")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "RTO_JAX_NO_TQDM": "1",
    }
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "run.py"),
        "--config=" + str(ROOT / "configs" / "rto_tldr.py") + ":tiny",
        f"--workdir={tmp_path}",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        *OVERRIDES,
    ]
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["policies"]) >= {"sft", "dpo", "rto"}
    assert json.loads((tmp_path / "config.json").read_text())["mesh"]["fsdp"] == 4
