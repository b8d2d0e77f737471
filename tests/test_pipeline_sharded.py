"""The experiment pipeline, unchanged, on one device, on a mesh of 8 simulated CPU devices (stopped by
SIGTERM and resumed) and on two processes (jax.distributed on 127.0.0.1, gloo; killed and resumed):
the same numbers each time.

Every run is experiments/run.py in a subprocess, so XLA's device-count flag stays out of this process.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.pipeline.config import shared_data_dir
from rto_jax.pipeline.logging import read_metrics

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


# One process on one device vs the sharded runs. Not bit-identical (reductions are split differently);
# what differs is float32 rounding. Sampling uses the same keys, so rollouts agree token for token.
RTOL, ATOL = 2e-3, 2e-4
# Faster compiles (the same flags for every run, so they compute the same thing).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT = 900


def _command(workdir: Path, *extra: str, fault: str = "") -> list[str]:
    script = [str(ROOT / "tests" / "fault_run.py"), fault] if fault else [str(ROOT / "experiments" / "run.py")]
    return [
        sys.executable,
        *script,
        "--config=" + str(ROOT / "configs" / "rto_tldr.py") + ":tiny",
        f"--workdir={workdir}",
        *OVERRIDES,
        *extra,
    ]


def _env(devices: int) -> dict:
    return {
        **{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")},
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
        "JAX_PLATFORMS": "cpu",
        "RTO_JAX_NO_TQDM": "1",
    }


def _run_one(workdir: Path, devices: int, *extra: str) -> None:
    proc = subprocess.run(
        _command(workdir, *extra),
        check=False,
        env=_env(devices),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir: Path, devices_each: int, *extra: str, fault: str = "") -> list[tuple[int, str]]:
    """Both processes of one run; returns each one's (exit code, log tail)."""
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        log = workdir.parent / f"{workdir.name}.process_{i}.log"
        distributed = [
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
        with open(log, "w") as f:  # a file, not a pipe: a full pipe buffer would stall the collectives
            procs.append(
                subprocess.Popen(
                    _command(workdir, *distributed, *extra, fault=fault),
                    env=_env(devices_each),
                    cwd=ROOT,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log)
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # only our own workers, by handle
    return [(p.returncode, log.read_text()[-6000:]) for p, log in zip(procs, logs)]


def _records(workdir: Path) -> dict[tuple, dict]:
    """metrics.jsonl as {(stage, split, step): numbers}; a record written twice fails here."""
    out = {}
    for record in read_metrics(workdir / "metrics.jsonl"):
        key = (record.pop("stage"), record.pop("split"), record.pop("step"))
        record.pop("time")
        assert key not in out, f"{workdir}: metrics record {key} written twice"
        out[key] = record
    return out


def _tie(record: dict, name: str) -> bool:
    """DPO's first step: the policy is its reference, every implicit reward is 0 up to rounding, and the
    accuracy (the share of strict wins) only counts rounding noise."""
    return name == "rewards/accuracy" and abs(record["rewards/margin"]) < 1e-6


def _assert_same_run(reference: Path, other: Path) -> None:
    expected, got = _records(reference), _records(other)
    assert got.keys() == expected.keys(), f"{other}: records differ: {sorted(set(got) ^ set(expected))}"
    bad = [
        f"{key} {name}: {value} vs {expected[key][name]}"
        for key, numbers in got.items()
        for name, value in numbers.items()
        if not math.isclose(value, expected[key][name], rel_tol=RTOL, abs_tol=ATOL) and not _tie(expected[key], name)
    ]
    assert not bad, f"{other} differs from the one-device run:\n" + "\n".join(bad[:20])
    results, expected_results = (json.loads((d / "results.json").read_text()) for d in (other, reference))
    assert results["policies"].keys() == expected_results["policies"].keys() >= {"reference", "sft", "dpo", "rto"}
    for folder in ("sft/model", "reward_model/model", "dpo/model", "ppo/model", "ppo/critic", "tokenizer"):
        assert (other / folder).is_dir(), folder


def _check_end_to_end(workdir: Path) -> None:
    """The one-device run of configs/rto_tldr.py:tiny on ../shared/data is complete, and a restart of
    the same command skips every stage."""
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["policies"]) == {"reference", "sft", "dpo", "rto"} and results["seed"] == 0
    for name in ("sft", "dpo", "rto"):
        for key in ("rm_score", "kl_to_ref", "length", "eos_rate", "win_rate"):
            assert math.isfinite(results["policies"][name][key]), (name, key)
    assert abs(results["policies"]["sft"]["kl_to_ref"]) < 1e-4  # the reference itself
    records = read_metrics(workdir / "metrics.jsonl")  # raises on a malformed line
    assert {r["stage"] for r in records} == {"sft", "reward_model", "dpo", "ppo", "evaluate"}
    assert json.loads((workdir / "reward_model" / "done.json").read_text())["reward_std"] > 0
    assert (workdir / "config.json").exists() and list((workdir / "tensorboard").iterdir())
    for folder in ("sft/model", "reward_model/model", "dpo/model", "ppo/model", "ppo/critic", "tokenizer"):
        assert (workdir / folder).is_dir(), folder
    assert json.loads((workdir / "ppo" / "model" / "config.json").read_text())["vocab_size"] == 512
    # The BPE's pad (0) and EOS (1), recorded, and in every export (transformers batches with them).
    assert results["special_tokens"] == {
        "pad_id": 0, "pad_token": "<|pad|>", "eos_id": 1, "eos_token": "<|endoftext|>",
        "pad_from": "the tokenizer's pad token",
    }  # fmt: skip
    for folder in ("sft/model", "reward_model/model", "dpo/model", "ppo/model", "ppo/critic"):
        exported = json.loads((workdir / folder / "config.json").read_text())
        assert (exported["pad_token_id"], exported["eos_token_id"]) == (0, 1), folder
        assert (workdir / folder / "tokenizer.json").exists(), folder
    # A finished stage keeps its exported model, not its checkpoints (the disk bound).
    assert not any(workdir.glob("*/checkpoints")), sorted(workdir.glob("*/checkpoints"))
    _run_one(workdir, 1)  # everything finished: every stage is skipped
    assert len(read_metrics(workdir / "metrics.jsonl")) == len(records)


@pytest.mark.slow
def test_tiny_preset_same_on_one_device_eight_devices_and_two_processes(tmp_path):
    """The one tiny TL;DR run of the suite: checked end to end, then the reference of the sharded runs."""
    data = shared_data_dir()
    if not (data / "tldr_sft_oai1b.csv").exists() or not (data / "tldr_comparisons_10k.parquet").exists():
        pytest.skip(f"shared TL;DR sample data not found in {data} (set RTO_JAX_SHARED_DATA)")
    _run_one(tmp_path / "one_device", 1)
    _check_end_to_end(tmp_path / "one_device")

    # 8 simulated devices in one process: batch rows over data=2, parameters over fsdp=4. SIGTERM (a
    # preemptible VM's notice) in the middle of DPO: the step in flight finishes, a checkpoint is
    # written although the cadence would write none (every_steps=100), exit status 75; the same
    # command resumes, and the run equals the one-device run.
    eight = tmp_path / "eight_devices"
    _preempt_then_resume(eight, tmp_path / "one_device", 8, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert json.loads((eight / "config.json").read_text())["mesh"]["fsdp"] == 4

    # Two processes x 2 devices, parameters split over all four (fsdp=4 spans both processes); killed
    # after DPO step 2 (checkpoint at 2), then the same command resumes it.
    two = tmp_path / "two_processes"
    mesh = ("--config.mesh.data=1", "--config.mesh.fsdp=4")
    for code, log in _run_two_processes(two, 2, *mesh, fault="--kill_after_checkpoint=dpo:2"):
        assert code != 0 and "SimulatedFailure" in log, log
    assert (two / "reward_model" / "done.json").exists() and not (two / "dpo" / "done.json").exists()
    for i, (code, log) in enumerate(_run_two_processes(two, 2, *mesh)):
        assert code == 0, f"process {i}:\n{log}"
    assert json.loads((two / "dpo" / "done.json").read_text())["resumed_from"] == 2
    _assert_same_run(tmp_path / "one_device", two)
    # Only process 0 wrote: one metrics file, one events file per run of the workdir.
    assert len(list((two / "tensorboard").iterdir())) == 2


def _preempt_then_resume(workdir: Path, reference: Path, devices: int, *mesh: str) -> None:
    """Runs the tiny preset on `devices`, sends SIGTERM once DPO logs a step, resumes it with the same
    command and checks the result against the `reference` run."""
    import signal
    import time

    from rto_jax.pipeline.loop import PREEMPTED_EXIT_STATUS

    extra = ("--config.checkpoint.every_steps=100", *mesh)
    dpo_steps = 3  # OVERRIDES'
    sent_after = None  # (DPO steps logged just before the signal was sent, and just after)
    with open(workdir.parent / f"{workdir.name}.sigterm.log", "w") as log:
        proc = subprocess.Popen(
            _command(workdir, *extra), env=_env(devices), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + TIMEOUT
            metrics = workdir / "metrics.jsonl"

            def logged() -> list[int]:
                return [r["step"] for r in read_metrics(metrics) if r["stage"] == "dpo"] if metrics.exists() else []

            while time.time() < deadline and proc.poll() is None:
                before = logged()
                if before:
                    proc.send_signal(signal.SIGTERM)  # our own child, by handle
                    sent_after = (max(before), max(logged()))
                    break
                time.sleep(0.05)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (workdir.parent / f"{workdir.name}.sigterm.log").read_text()
    assert proc.returncode == PREEMPTED_EXIT_STATUS, output[-6000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("stopped: ") and "stopped by SIGTERM after step " in last, last
    stage = last.split(": ")[1]
    stopped_at = int(last.split("after step ")[1].split(";")[0])
    assert sent_after is not None, output[-6000:]
    # The loop acts on the signal at the end of the step in flight: a step logged around the moment it
    # was sent, or the one after (a run that ignored it would go on to DPO's end and stop at PPO's start).
    first, latest = sent_after
    if stage == "dpo":  # the usual case: stopped after DPO step 1 or 2, with a checkpoint of it
        assert first <= stopped_at <= latest + 1 and stopped_at < dpo_steps, (last, sent_after)
        assert f"checkpoint written to {workdir / 'dpo' / 'checkpoints' / str(stopped_at)}" in last, last
    else:  # the signal came during DPO's last step: DPO finished, PPO stopped before its first
        assert latest >= dpo_steps - 1, (last, sent_after)
        assert (stage, stopped_at) == ("ppo", 0) and "nothing of this stage to save" in last, last
    assert not (workdir / stage / "done.json").exists()
    _run_one(workdir, devices, *extra)
    assert json.loads((workdir / stage / "done.json").read_text())["resumed_from"] == stopped_at
    _assert_same_run(reference, workdir)
