"""The benchmark harness runs end to end in --smoke mode and writes valid JSON. Never asserts a speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in the repository, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _smoke_run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m benchmarks.run --smoke ARGS --out OUT`, asserted to succeed; returns it and its JSON."""
    proc = _module("benchmarks.run", "--smoke", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("*-smoke.json")
    assert not list(out.glob("*.tmp"))  # the atomic write left no temporary file
    return proc, json.loads(path.read_text())


def test_smoke_run_writes_json(tmp_path):
    proc, payload = _smoke_run(tmp_path)
    assert payload["smoke"] is True
    assert payload["ceiling_gflops"] > 0
    jax_ceiling = next(row for row in payload["rows"] if row["id"] == "ceiling/matmul/jax")
    assert jax_ceiling["bandwidth_gbs"] > 0
    assert {"cpu", "cores", "versions"} <= set(payload["machine"])
    rows = {row["id"]: row for row in payload["rows"]}
    groups = {row["group"] for row in rows.values()}
    assert groups == {"ceiling", "train", "rollout", "ppo", "scaling", "attention"}
    pinned = {row["impl"]: row["attention_impl"] for row in rows.values() if row["group"] == "attention"}
    assert pinned == {"jax-xla": "xla", "jax-blockwise": "blockwise"}
    assert rows["train/sft/smoke/4x32/jax-loop"]["attention_impl"] == "xla"  # `auto` on CPU at 32 tokens
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
    if rollout["decode_tokens_per_s"]:
        assert rollout["bandwidth_fraction"] > 0
    ppo = {row["impl"]: row for row in rows.values() if row["group"] == "ppo"}
    assert set(ppo) == {"jax-loop", "jax-lora", "jax-rloo", "torch", "tunix"}
    for impl in ("jax-loop", "jax-lora", "jax-rloo", "torch"):  # tunix's iteration is timed whole (when it exists)
        split = ppo[impl]["split_s"]
        assert set(split) == {"rollout", "scoring", "update"} and all(t >= 0 for t in split.values())
    assert "torch" in ppo["jax-loop"]["ratios"]  # the PyTorch iteration is our iteration's peer
    assert not ppo["jax-lora"].get("ratios")  # an adapter run has no full-fine-tune peer
    assert ppo["jax-lora"]["peak_rss_mb"] > 0
    # The critic-free row ran RLOO without a critic on one prompt answered twice, and has no peer (they run GAE).
    # Its peak RSS is not compared here: the smoke rows share one process, so theirs is cumulative.
    rloo = ppo["jax-rloo"]
    assert (rloo["estimator"], rloo["samples_per_prompt"], rloo["critic"]) == ("rloo", 2, False)
    assert (ppo["jax-loop"]["estimator"], ppo["jax-loop"]["critic"]) == ("gae", True)
    assert not rloo.get("ratios") and rloo["peak_rss_mb"] > 0 and rloo["tokens_per_s"] > 0
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


def test_smoke_run_never_writes_into_the_tracked_results(tmp_path, monkeypatch):
    import benchmarks.run as bench

    # The real smoke folder is ignored by git, so a smoke run cannot dirty the checkout.
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(bench.SMOKE_OUT / "x-smoke.json")], cwd=REPO, check=False
    )
    assert ignored.returncode == 0
    tracked, smoke = tmp_path / "results", tmp_path / "smoke"
    monkeypatch.setattr(bench, "DEFAULT_OUT", tracked)
    monkeypatch.setattr(bench, "SMOKE_OUT", smoke)
    assert bench.main(["--smoke", "--only", "ceiling/matmul/jax"]) == 0
    assert not tracked.exists() and len(list(smoke.glob("*-smoke.json"))) == 1


def test_decode_bytes_count_every_weight_and_the_mean_kv_cache():
    from benchmarks.workloads import SHAPES, decode_bytes

    # smoke shape: blocks 2 x (64*16*(2*4 + 2*2) + 3*64*128) = 73,728 weights, tied head 256*64 = 16,384;
    # K and V: 2 layers x 2 kv heads x 16 dims x 2 = 128 values per token, mean context 8 + 9/2 = 12.5 tokens.
    assert decode_bytes(SHAPES["smoke"], batch=2, prompt=8, new_tokens=8) == 4 * (73_728 + 16_384 + 2 * 128 * 12.5)


def test_critic_free_iteration_counts_no_critic_flops():
    """The smoke shape's FLOPs written out from the equations (forward: 2 per matmul weight per token, the
    LM head on the 8 response positions, 4 L H hd T^2 attention; training 3x forward)."""
    from benchmarks.run import _metrics
    from benchmarks.workloads import _ppo_split, critic_free

    # blocks 73,728 weights, tied head 256 x 64 = 16,384; batch 2, length 8 + 8, attention 4 x 2 x 4 x 16 x 16^2.
    body = 2 * (2 * 73_728 * 16 + 4 * 2 * 4 * 16 * 16**2)
    lm_forward = body + 2 * 2 * 16_384 * 8  # reference / DPO policy (and the policy in the update)
    scalar_forward = body  # reward model, critic: no LM head
    one_second = {"rollout": 1.0, "scoring": 1.0, "update": 1.0}
    result = {"status": "ok", "median_s": 3.0, "split_s": one_second}
    flops = lambda row, res: {k: mfu * 1e9 for k, mfu in _metrics(row, res, ceiling_gflops=1.0)["split_mfu"].items()}

    gae = flops(_ppo_split("smoke", 2, "jax-loop", prompt=8, new_tokens=8, reps=1), {**result, "critic": True})
    rloo_row = _ppo_split("smoke", 2, "jax-rloo", prompt=8, new_tokens=8, reps=1, ppo_config=critic_free(2))
    rloo = flops(rloo_row, {**result, "critic": False})
    assert gae["scoring"] == pytest.approx(2 * lm_forward + 2 * scalar_forward)
    assert gae["update"] == pytest.approx(3 * (lm_forward + scalar_forward))
    assert rloo["scoring"] == pytest.approx(2 * lm_forward + scalar_forward)  # no critic values
    assert rloo["update"] == pytest.approx(3 * lm_forward)  # no critic trained
    assert rloo["rollout"] == pytest.approx(gae["rollout"])  # the same 2 responses sampled
    # A results file written before rows reported "critic": its iterations all trained one.
    assert flops(_ppo_split("smoke", 2, "jax-loop", prompt=8, new_tokens=8, reps=1), result) == gae


def test_critic_free_ppo_state_drops_the_critic_and_its_optimizer_state():
    """The memory a critic-free row saves, counted exactly: the GAE state's critic (weights, Adam's two
    moments) is all that the RLOO state lacks."""
    import jax

    from benchmarks.jax_rows import _config, _ppo_setup
    from benchmarks.workloads import critic_free

    cfg = _config({"shape": "smoke"})
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
    gae, _, gae_config = _ppo_setup(cfg, 8, beta_dpo=0.05)
    rloo, _, rloo_config = _ppo_setup(cfg, 8, beta_dpo=0.05, ppo_config=critic_free(4))
    assert (gae_config.estimator, gae.critic is None) == ("gae", False)
    assert (rloo_config.estimator, rloo_config.samples_per_prompt, rloo.critic) == ("rloo", 4, None)
    critic_weights = nbytes(gae.critic.params)
    assert nbytes(gae.critic) >= 3 * critic_weights  # weights + Adam's first and second moments
    assert nbytes(gae) - nbytes(rloo) == nbytes(gae.critic)


def test_ppo_split_rows_hand_their_calls_to_the_profiler():
    """benchmarks.profile passes a `measure` that only captures the timed calls (and reports 0 s)."""
    from benchmarks.jax_rows import ppo_split
    from benchmarks.workloads import smoke_rows

    row = next(r for r in smoke_rows() if r["impl"] == "jax-rloo")
    captured = []

    def capture(fn, warmup, reps, sync):
        captured.append(fn)
        return {"median_s": 0.0, "times_s": [], "first_s": 0.0}

    result = ppo_split(row, measure=capture)
    assert len(captured) == 3  # sampler, make_experience, update
    assert result["split_share"] == {"rollout": 0.0, "scoring": 0.0, "update": 0.0}
    assert result["critic"] is False


def _tunix_python():
    from benchmarks.run import TUNIX_PYTHON

    return TUNIX_PYTHON if TUNIX_PYTHON.exists() else None


@pytest.mark.skipif(_tunix_python() is None, reason="no google-tunix environment (make tunix-env creates .venv-tunix)")
def test_tunix_rows_run_in_their_own_environment(tmp_path):
    only = "train/dpo/smoke/4x32/tunix,ppo/iteration/smoke/b2/tunix"
    _, payload = _smoke_run(tmp_path, "--only", only)
    rows = {row["id"]: row for row in payload["rows"] if row["backend"] == "tunix"}
    assert set(rows) == set(only.split(","))
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0


_HLO = """HloModule jit_step

%fused_computation.1 (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (p0: f32[4,16]) -> f32[16,4] {
  %p0 = f32[4,16]{1,0} parameter(0)
  %exp.1 = f32[4,16]{1,0} exponential(%p0)
  %transpose.1 = f32[16,4]{0,1} transpose(%exp.1), dimensions={1,0}
  ROOT %copy.1 = f32[16,4]{1,0} copy(%transpose.1)
}

ENTRY %main (a: f32[4,8], b: f32[8,16]) -> f32[16,4] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/dot_general"}
  %dot.9 = f32[16,16]{1,0} dot(%b, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %add.3 = f32[4,16]{1,0} add(%ynn_fusion.1, %ynn_fusion.1)
  ROOT %copy_fusion = f32[16,4]{1,0} fusion(%add.3), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(step)/transpose"}
}
"""


def test_profile_joins_thunk_events_with_the_optimized_hlo():
    from benchmarks.profile import op_times, parse_hlo, summarize

    modules = {"jit_step": parse_hlo(_HLO)}
    inst = modules["jit_step"]
    assert inst["ynn_fusion.1"]["category"] == "matmul"  # a fusion is classified by its body
    assert inst["ynn_fusion.1"]["source"] == "jit(step)/dot_general"
    assert inst["copy_fusion"]["category"] == "transpose/copy"
    assert inst["add.3"]["category"] == "elementwise"
    assert inst["dot.9"]["category"] == "matmul"

    def op(name, ts, dur, end):
        args = {"hlo_module": "jit_step", "hlo_op": name}
        return [
            {"ph": "X", "pid": 1, "tid": 1, "ts": ts, "dur": dur, "name": name, "args": args},
            {"ph": "X", "pid": 1, "tid": 2, "ts": end, "dur": 0.0, "name": f"end: {name}"},
        ]

    # Times in microseconds. The Eigen dot is launched (2 us) and ends 600 us later; the add runs 100 us
    # twice (inside a loop); the other fusions run in their own events.
    events = op("ynn_fusion.1", 0, 300, 300) + op("dot.9", 300, 2, 900) + op("add.3", 310, 100, 410)
    events += op("add.3", 420, 100, 520) + op("copy_fusion", 530, 50, 580)
    events.append({"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 1000, "name": "ThunkExecutor::Execute"})
    report = summarize(op_times(events), modules, top=2)
    cats = report["categories"]
    assert cats["matmul"]["seconds"] == pytest.approx(300e-6 + 600e-6)  # the dot counts from launch to end
    assert cats["elementwise"]["seconds"] == pytest.approx(200e-6)  # both executions of the add
    assert cats["transpose/copy"]["seconds"] == pytest.approx(50e-6)
    assert report["op_seconds"] == pytest.approx(1150e-6)
    assert [r["op"] for r in report["top"]] == ["dot.9", "ynn_fusion.1"]


def test_profile_of_a_smoke_row_names_the_matmuls(tmp_path):
    out = tmp_path / "profile.json"
    proc = _module("benchmarks.profile", "--smoke", "train/sft/smoke/4x32/jax-loop", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    unit = json.loads(out.read_text())["units"]["step"]
    assert unit["op_seconds"] > 0
    assert unit["categories"]["matmul"]["seconds"] > 0
    known = [r for r in unit["top"] if r["shape"] != "?"]
    assert len(known) == len(unit["top"])  # every traced op was found in the dumped HLO
    assert "| matmul |" in proc.stdout
    bad = _module("benchmarks.profile", "--smoke", "rollout/smoke/b2/hf-generate", timeout=120)
    assert bad.returncode == 2 and "is not one of our rows" in bad.stderr and "Traceback" not in bad.stderr


def test_device_suite_runs_its_rows_in_bf16_at_toy_sizes(tmp_path):
    """The accelerator's table (`--suite device`, run on a GPU by benchmarks/device.sh), its smoke form on this
    CPU: bf16 ceilings and rows, the decode bandwidth fraction at 2 bytes a value, cuDNN attention reported as
    unavailable (no GPU) rather than failing the run."""
    from benchmarks.workloads import SHAPES, decode_bytes

    only = "device/sft/smoke/1x128,device/rollout/smoke/b2"
    proc = _module("benchmarks.run", "--smoke", "--suite", "device", "--only", only, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-device-smoke.json")
    payload = json.loads(path.read_text())
    assert payload["suite"] == "device" and "gpus" in payload["machine"]
    rows = {row["id"]: row for row in payload["rows"]}
    assert set(rows) == {
        "ceiling/matmul/jax-bfloat16",
        "ceiling/matmul/torch-bfloat16",
        *(f"device/sft/smoke/1x128/{impl}" for impl in ("jax-xla", "jax-blockwise", "jax-cudnn", "torch")),
        *(f"device/rollout/smoke/b2/{impl}" for impl in ("jax-loop", "hf-generate")),
    }
    assert all(row.get("dtype") == "bfloat16" for row in rows.values())
    for impl in ("xla", "blockwise"):
        ours = rows[f"device/sft/smoke/1x128/jax-{impl}"]
        assert ours["status"] == "ok" and (ours["attention_impl"], ours["compute_dtype"]) == (impl, "bfloat16")
        assert "torch" in ours["ratios"]
    cudnn = rows["device/sft/smoke/1x128/jax-cudnn"]
    assert cudnn["status"] == "unavailable" and "needs a GPU" in cudnn["reason"]
    rollout = rows["device/rollout/smoke/b2/jax-loop"]
    ceiling = rows["ceiling/matmul/jax-bfloat16"]
    assert ceiling["status"] == "ok" and ceiling["read_mb"] == 64 and "bfloat16 matmul" in proc.stdout
    if rollout["decode_tokens_per_s"]:  # one rep cannot always resolve a decode step
        bytes_bf16 = decode_bytes(SHAPES["smoke"], 2, 8, 8, bytes_per_value=2)
        expected = bytes_bf16 / rollout["decode_step_s"] / 1e9 / ceiling["bandwidth_gbs"]
        assert rollout["bandwidth_fraction"] == pytest.approx(expected)


def test_device_rows_cover_both_models_decode_and_the_attention_implementations():
    from benchmarks.workloads import SHAPES, device_rows, peer_of

    rows = device_rows()
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows)
    assert rows[0]["group"] == rows[1]["group"] == "ceiling"  # first: every MFU and bandwidth is against them
    ours = [row for row in rows if row["backend"] == "jax" and row["kind"] != "ceiling"]
    assert all(row["dtype"] == "bfloat16" for row in rows)
    for shape in ("smollm2-135m", "llama-3.2-1b"):
        assert shape in SHAPES
        kinds = {(row["kind"], row["task"], row.get("batch")) for row in ours if row["shape"] == shape}
        assert {("train", "sft"), ("train", "dpo"), ("ppo_split", "ppo_iteration")} <= {k[:2] for k in kinds}
        assert {("rollout", "rollout", 1), ("rollout", "rollout", 32)} <= kinds
    long = {(row["seq"], row.get("attention")) for row in ours if row["seq"] >= 2048}
    assert long == {(seq, impl) for seq in (2048, 8192) for impl in ("xla", "blockwise", "cudnn")}
    for row in ours:  # every row of ours has its PyTorch peer
        assert peer_of(row, by_id), row["id"]
    # The 1B rows come after every 135M row: what a lease that runs out first still measures.
    first_1b = next(i for i, row in enumerate(rows) if row.get("shape") == "llama-3.2-1b")
    assert all(row.get("shape") != "smollm2-135m" for row in rows[first_1b:])


def _fake_worker(calls, seconds=0.3, device=lambda row: "cpu"):
    """A stand-in for benchmarks.run._run_worker: each row takes `seconds`; one given less is killed (an error)."""
    import time

    def worker(group, timeout, log_dir, extra_env=None):
        calls.append((group[0]["id"], timeout))
        time.sleep(min(seconds, timeout))
        if timeout < seconds:
            return [{"id": group[0]["id"], "status": "error", "reason": f"timed out after {timeout:.0f} s"}], 100.0
        return [{"id": group[0]["id"], "status": "ok", "median_s": 1.0, "device": device(group[0])}], 100.0

    return worker


def test_a_budget_skips_the_rows_it_leaves_no_time_for_and_never_keeps_them(tmp_path, monkeypatch):
    import benchmarks.run as bench
    from benchmarks.workloads import smoke_rows

    rows = [r for r in smoke_rows() if r["group"] == "train"][:3]
    calls = []
    monkeypatch.setattr(bench, "_run_worker", _fake_worker(calls))
    progress = tmp_path / ".progress.json"
    log = open(tmp_path / "log", "w")
    records = bench.run(rows, smoke=False, timeout=300, budget=0.45, progress=progress, commit="abc1234", log=log)
    # The first row fits; the budget cuts the second off (not an error, not kept); the third never starts.
    assert [r["status"] for r in records] == ["ok", "skipped", "skipped"]
    assert "cut off by --budget" in records[1]["reason"] and "not started" in records[2]["reason"]
    assert calls[0][1] <= 0.45 and len(calls) == 2  # the budget, not --timeout, bounds a row
    assert set(json.loads(progress.read_text())["rows"]) == {rows[0]["id"]}
    # Without a budget, every row; --budget 0 is a budget (nothing starts), not "no budget".
    assert [r["status"] for r in bench.run(rows, smoke=False, timeout=300, log=log)] == ["ok"] * 3
    assert calls[-1][1] == 300
    assert {r["status"] for r in bench.run(rows, smoke=False, timeout=300, budget=0, log=log)} == {"skipped"}


def test_a_run_cut_off_by_its_budget_resumes_with_only_the_rows_left(tmp_path, monkeypatch):
    import benchmarks.run as bench
    from benchmarks.workloads import smoke_rows

    rows = [r for r in smoke_rows() if r["group"] == "train"][:2]
    calls = []
    monkeypatch.setattr(bench, "_run_worker", _fake_worker(calls))
    monkeypatch.setattr(bench, "full_rows", lambda: rows)
    assert bench.main(["--budget", "0.45", "--out", str(tmp_path)]) == 0
    assert (tmp_path / ".progress.json").exists()  # kept: a row is left
    first = [row_id for row_id, _ in calls]
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert [row_id for row_id, _ in calls[len(first) :]] == [rows[1]["id"]]  # only the row left
    assert not (tmp_path / ".progress.json").exists()  # complete: removed


def test_without_git_the_code_version_is_a_hash_of_the_code(monkeypatch):
    import benchmarks.run as bench

    def no_git(*args, **kwargs):
        raise OSError("no git here")

    monkeypatch.setattr(bench.subprocess, "run", no_git)
    version = bench.code_version()
    assert version.startswith("tree-") and len(version) == len("tree-") + 12 and version == bench.code_version()
    assert bench.load_progress(None, None) == {}


def test_no_ratio_between_rows_on_different_devices(tmp_path, monkeypatch):
    import benchmarks.run as bench
    from benchmarks.workloads import smoke_rows

    rows = [r for r in smoke_rows() if r["id"].startswith("train/sft/smoke/4x32/") and r["impl"] in ("jax-loop", "torch")]
    log = open(tmp_path / "log", "w")
    for torch_device, paired in (("cpu", True), ("gpu", False)):
        device = lambda row: torch_device if row["backend"] == "torch" else "cpu"
        monkeypatch.setattr(bench, "_run_worker", _fake_worker([], seconds=0.0, device=device))
        ours = next(r for r in bench.run(rows, smoke=False, timeout=300, log=log) if r["impl"] == "jax-loop")
        assert ("torch" in ours.get("ratios", {})) == paired


def test_device_script_lists_the_device_suite(tmp_path):
    """benchmarks/device.sh, as a device session runs it, up to the point where it would start measuring."""
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device.sh"), "--list"],
        cwd=tmp_path,  # the script finds the repository itself
        env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from benchmarks.workloads import device_rows

    assert [line for line in proc.stdout.splitlines() if line.startswith(("ceiling/", "device/"))] == [
        row["id"] for row in device_rows()
    ]
    assert "jax devices" in (tmp_path / "out" / "device-log.txt").read_text()


def test_attention_block_sweep_prints_every_column_and_autos_choice():
    proc = _module(
        "benchmarks.attention_blocks", "--shapes", "study", "--lengths", "102", "--blocks", "32,64", "--reps", "1"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [row for row in proc.stdout.splitlines() if row.startswith("| study | 102 |")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert len(cells) == 6 and all(float(c.rstrip("*")) > 0 for c in cells[2:5])
    assert cells[5] == "blockwise 64"  # batch 64 x 4 heads x 102^2 float32 scores are 10.6 MB: over 8 MiB


def test_decode_kernels_cover_the_models_projections_and_time_both_frameworks():
    import jax
    from flax import nnx

    from benchmarks import decode_kernels
    from benchmarks.workloads import SHAPES
    from rto_jax.models.config import ModelConfig
    from rto_jax.models.transformer import CausalLM

    # The timed weights are the model's: every parameter but the norms' scales and the tied embedding.
    model = CausalLM(ModelConfig(**SHAPES["tiny"]), nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    sizes = {jax.tree_util.keystr(path): leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    projections = sum(n for name, n in sizes.items() if "norm" not in name and "embed" not in name)
    m = decode_kernels._dims("tiny")
    assert decode_kernels.projection_bytes(m) == 4 * projections
    assert sum(sizes.values()) == projections + m["vocab"] * m["d"] + sum(n for k, n in sizes.items() if "norm" in k)

    proc = _module("benchmarks.decode_kernels", "--shape", "tiny", "--batches", "1,2", "--reps", "1", "--cache", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2
    for row in rows:  # every part timed on both sides: ours / torch's
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for cell in cells[1:5]:
            ours, theirs = (float(x) for x in cell.split(" / "))
            assert ours > 0 and theirs > 0
    assert "Memory read rate" in proc.stdout


def test_train_kernels_count_every_projection_of_every_layer_and_time_both_frameworks():
    from benchmarks import decode_kernels, train_kernels

    m = decode_kernels._dims("tiny")
    parts = train_kernels.parts(m, batch=2, seq=64, head_tokens=48)
    linear = [p for p in parts if p["kind"] == "linear"]
    # Each layer's seven projections once (k+v and gate+up share a shape, counted twice), the head once.
    assert sum(p["count"] * p["in"] * p["out"] for p in linear) == decode_kernels.projection_bytes(m) // 4 + m[
        "vocab"
    ] * m["d"]
    assert [p["rows"] for p in linear] == [128] * (len(linear) - 1) + [96]
    (attention,) = [p for p in parts if p["kind"] == "attention"]
    assert attention["count"] == m["layers"]

    proc = _module("benchmarks.train_kernels", "--shape", "tiny", "--batch", "2", "--seq", "64", "--reps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == len(parts)
    for row in rows:  # both sides timed, and the ratio is theirs over ours (to the printed digits)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        ours, theirs, ratio = float(cells[2]), float(cells[3]), float(cells[6].rstrip("x"))
        assert ours > 0 and theirs > 0 and abs(ratio / (theirs / ours) - 1) < 0.1
    assert "the step's kernels" in proc.stdout


def _pipeline_folder(root: Path, step_s: float, eval_s: float) -> Path:
    """A study pipeline's folder as a shortened run leaves it: config.json, one done.json per stage at
    known times, and train / eval records 10 SFT steps and 4 PPO iterations (2 evaluations) long."""
    root.mkdir(parents=True)
    t = 1_000.0
    (root / "config.json").write_text("{}")
    os.utime(root / "config.json", (t, t))
    records = []
    for stage, steps, evals_every in (("sft", 10, 0), ("gold_eval", 0, 0), ("ppo_rto", 4, 2)):
        start = t
        for step in range(1, steps + 1):
            t += step_s * {1: 5, 2: 3}.get(step, 1)  # the first step compiles; the second is slow too
            records.append({"stage": stage, "split": "train", "step": step, "time": t})
            if evals_every and step % evals_every == 0:
                t += eval_s * (3 if step == evals_every else 1)  # the first evaluation compiles too
                records.append({"stage": stage, "split": "eval", "step": step, "time": t})
        t = max(t, start) + 7.0  # export / sampling time after the last record
        (root / stage).mkdir()
        (root / stage / "done.json").write_text("{}")
        os.utime(root / stage / "done.json", (t, t))
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_study_seed_time_extrapolates_each_stage_from_its_measured_step_and_evaluation(tmp_path):
    from benchmarks import study_seed_time

    before = _pipeline_folder(tmp_path / "before", step_s=2.0, eval_s=4.0)
    after = _pipeline_folder(tmp_path / "after", step_s=1.0, eval_s=2.0)
    full = {"sft": (100, 0), "ppo": (40, 10)}
    result = study_seed_time.compare(before, after, full)
    sft, gold, ppo = (result["stages"][s] for s in ("sft", "gold_eval", "ppo_rto"))
    assert sft["before"]["step_s"] == 2.0 and sft["before"]["steps"] == 10
    assert sft["before"]["seconds"] == pytest.approx(2.0 * 16 + 7.0)  # 8 steps, a 5x and a 3x one, and 7 s
    assert sft["full_before_s"] == pytest.approx(sft["before"]["seconds"] + 90 * 2.0)
    assert gold["full_before_s"] == gold["before"]["seconds"] == 7.0  # a sampling stage counts as measured
    assert (ppo["before"]["evals"], ppo["before"]["eval_s"]) == (2, 4.0)  # the compiling first evaluation left out
    assert ppo["full_after_s"] == pytest.approx(ppo["after"]["seconds"] + 36 * 1.0 + 8 * 2.0)
    totals = result["totals"]
    assert totals["full_before_s"] == pytest.approx(sum(r["full_before_s"] for r in result["stages"].values()))
    # Half the time per step and evaluation, the same 7 s per stage: (sft + gold_eval + ppo_rto) 219 + 7 + 147
    # before (39 s measured + 90 steps x 2; 7; 43 + 36 x 2 + 8 x 4) against 113 + 7 + 77 after.
    assert totals["full_before_s"] / totals["full_after_s"] == pytest.approx(373 / 197)
    with pytest.raises(ValueError, match="stage sft trained 10 steps and has no full budget"):
        study_seed_time.compare(before, after, {"ppo": (40, 10)})
    proc = _module("benchmarks.study_seed_time", str(before), str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "not a pipeline folder" in proc.stderr and "Traceback" not in proc.stderr
