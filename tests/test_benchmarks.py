"""The benchmark harness runs end to end in --smoke mode and writes valid JSON. Never asserts a speed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_smoke_run_writes_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-smoke.json")
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file
    payload = json.loads(path.read_text())
    assert payload["smoke"] is True
    assert payload["ceiling_gflops"] > 0
    assert {"cpu", "cores", "versions"} <= set(payload["machine"])
    rows = {row["id"]: row for row in payload["rows"]}
    groups = {row["group"] for row in rows.values()}
    assert groups == {"ceiling", "train", "rollout", "ppo", "scaling"}
    for row in rows.values():
        # TRL is an optional peer: it may be absent, and then says why.
        assert row["status"] == "ok" or (row["status"] == "unavailable" and row["reason"]), row
        assert {"id", "group", "backend", "impl", "median_s" if row["status"] == "ok" else "reason"} <= set(row)
    for task in ("sft", "rm", "dpo", "ppo"):
        ours = rows[f"train/{task}/smoke/4x32/jax-loop"]
        assert {"tokens_per_s", "mfu", "step_flops", "peak_rss_mb"} <= set(ours)
        assert "torch" in ours["ratios"]
    assert "train/sft/smoke/4x32/jax-scan" in rows
    rollout = rows["rollout/smoke/b2/jax-loop"]
    assert {"decode_tokens_per_s", "prefill_tokens_per_s", "weights"} <= set(rollout)
    assert rollout["prefill_tokens_per_s"] > 0  # decode tokens/s may be None: one rep cannot always resolve it
    (ppo,) = [row for row in rows.values() if row["group"] == "ppo"]
    assert set(ppo["split_s"]) == {"rollout", "scoring", "update"}
    assert "| row" in proc.stdout and "PPO iteration" in proc.stdout


def test_interrupted_run_keeps_rows_of_the_same_commit(tmp_path):
    from benchmarks.run import run, write_json
    from benchmarks.workloads import smoke_rows

    ceiling = next(r for r in smoke_rows() if r["group"] == "ceiling" and r["backend"] == "jax")
    progress = tmp_path / ".progress.json"
    kept = {"id": ceiling["id"], "status": "ok", "gflops": 123456.0, "by_size": {}, "median_s": 1.0}
    write_json(progress, {"commit": "abc1234", "rows": {ceiling["id"]: {"row": ceiling, "result": kept}}})

    (record,) = run([ceiling], smoke=False, timeout=300, progress=progress, commit="abc1234")
    assert record["gflops"] == 123456.0  # kept, not measured again

    (record,) = run([ceiling], smoke=False, timeout=300, progress=progress, commit="def5678")
    assert record["status"] == "ok" and record["gflops"] != 123456.0  # other code: measured afresh
    saved = json.loads(progress.read_text())
    assert saved["commit"] == "def5678" and saved["rows"][ceiling["id"]]["result"]["gflops"] == record["gflops"]
