"""Run the benchmark table: `python -m benchmarks.run [--smoke] [--suite cpu|device] [--only ROWS] [--out DIR]`.

Every row runs in its own worker process (`benchmarks.worker`), so its peak resident memory is its own
(`ru_maxrss` of that child) and no row's compile cache or allocator state leaks into the next. With
`--smoke` (tiny shapes, one rep) all rows of a backend share one process to finish in seconds; its
memory figures are then cumulative and its speeds meaningless: it only checks the harness.

`--suite device` is the accelerator's table (bf16, 135M and 1B, decode, long-sequence attention; run it with
`bash benchmarks/device.sh`); `--budget S` records the rows not started within S seconds as skipped, so a
run that must end inside a device lease still writes its file.

Prints a table, the PPO iteration split, and writes `<out>/<date>[-device][-smoke].json` atomically.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from benchmarks.workloads import (
    SHAPES,
    decode_bytes,
    decode_flops,
    device_rows,
    forward_flops,
    full_rows,
    peer_of,
    prefill_flops,
    smoke_rows,
    train_flops,
    workload_flops,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
SMOKE_OUT = REPO / "runs" / "benchmarks-smoke"  # ignored by git (/runs/)
# google-tunix lives in its own environment (`make tunix-env`); its rows are unavailable without it.
TUNIX_PYTHON = Path(os.environ.get("RTO_BENCH_TUNIX_PYTHON", REPO / ".venv-tunix" / "bin" / "python"))


def _python(backend: str) -> Path | None:
    """The interpreter a backend's worker runs in, or None when that environment is missing."""
    if backend != "tunix":
        return Path(sys.executable)
    return TUNIX_PYTHON if TUNIX_PYTHON.exists() else None


def select(rows: list[dict], only: str | None) -> list[dict]:
    """Rows whose id matches one of the comma-separated patterns (a glob, or a prefix such as `train/sft`).

    Ceiling rows are always kept: every other row's MFU is relative to them.
    """
    if not only:
        return rows
    patterns = [p.strip() for p in only.split(",") if p.strip()]

    def wanted(row):
        return row["group"] == "ceiling" or any(
            fnmatch.fnmatch(row["id"], p) or row["id"].startswith(p) or fnmatch.fnmatch(row["id"], p + "/*")
            for p in patterns
        )

    return [r for r in rows if wanted(r)]


def _run_worker(
    rows: list[dict], timeout: float, log_dir: Path, extra_env: dict | None = None
) -> tuple[list[dict], float | None]:
    """Runs `rows` (one backend) in one child process; returns its per-row results and the child's peak RSS in MB."""
    python = _python(rows[0]["backend"])
    if python is None:
        why = f"no tunix environment at {TUNIX_PYTHON} (make tunix-env creates it)"
        return [{"id": row["id"], "status": "unavailable", "reason": why} for row in rows], None
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=log_dir, delete=False) as f:
        json.dump(rows, f)
        rows_path = f.name
    out_path = rows_path.replace(".json", ".out.json")
    log_path = rows_path.replace(".json", ".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra_env or {})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(python), "-m", "benchmarks.worker", rows_path, out_path],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout ends the child and only it
        )
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            # wait4 rather than Popen.wait: it also returns the child's resource usage (peak RSS).
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    results = json.loads(Path(out_path).read_text()) if Path(out_path).exists() else []
    done = {r["id"] for r in results}
    log_tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-8:]
    for row in rows:
        if row["id"] not in done:
            why = f"timed out after {timeout:.0f} s" if timed_out else f"worker exited with {proc.returncode}"
            results.append({"id": row["id"], "status": "error", "reason": why, "traceback": log_tail})
    for path in (rows_path, out_path, log_path):
        Path(path).unlink(missing_ok=True)
    return results, usage.ru_maxrss / 1024  # KiB on Linux


def _metrics(row: dict, result: dict, ceiling_gflops: float | None, bandwidth_gbs: float | None = None) -> dict:
    """Tokens/s, FLOPs and MFU of one finished row."""
    out: dict = {}
    if result.get("status") != "ok":
        return out
    mfu = lambda flops, seconds: (flops / seconds / 1e9 / ceiling_gflops) if ceiling_gflops and seconds > 0 else None
    if row["kind"] == "train":
        flops = workload_flops(row)
        out["tokens_per_s"] = row["batch"] * row["seq"] / result["median_s"]
        out["step_flops"] = flops
        out["gflops"] = flops / result["median_s"] / 1e9
        out["mfu"] = mfu(flops, result["median_s"])
    elif row["kind"] == "rollout":
        shape = SHAPES[row["shape"]]
        batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
        step = result["decode_step_s"]
        out["decode_tokens_per_s"] = batch / step if step > 0 else None
        out["prefill_tokens_per_s"] = batch * prompt / result["prefill_s"]
        out["tokens_per_s"] = out["decode_tokens_per_s"]
        out["end_to_end_tokens_per_s"] = batch * new / result["median_s"]
        per_step = decode_flops(shape, batch, prompt, new) / new
        out["mfu"] = mfu(per_step, step) if step > 0 else None
        out["prefill_mfu"] = mfu(prefill_flops(shape, batch, prompt), result["prefill_s"])
        if bandwidth_gbs and step > 0:  # the fraction of the machine's read rate a decode step reaches
            # A bf16 row counts 2 bytes per weight and cache value: what a decode step must read at that dtype.
            width = 2 if row.get("dtype") == "bfloat16" else 4
            out["bandwidth_fraction"] = decode_bytes(shape, batch, prompt, new, width) / step / 1e9 / bandwidth_gbs
    elif row["kind"] == "ppo_split":
        shape = SHAPES[row["shape"]]
        batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
        length = prompt + new
        # 1 with a critic, 0 under a critic-free estimator (results files from before the field: every row had one).
        critics = int(result.get("critic", True))
        flops = {
            "rollout": prefill_flops(shape, batch, prompt) + decode_flops(shape, batch, prompt, new),
            # reference and DPO policy log-probs (the policy's come from the sampler); reward score, critic values.
            "scoring": 2 * forward_flops(shape, batch, length, new)
            + (1 + critics) * forward_flops(shape, batch, length, 0, False),
            "update": train_flops(shape, batch, length, new) + critics * train_flops(shape, batch, length, 0, False),
        }
        if row["impl"] == "jax-lora":  # frozen base: no weight gradients, so the backward is one forward, not two
            flops["update"] *= 2 / 3  # (rank-16 adapters add ~4% to the 135M projections' FLOPs: left out)
        if "split_s" in result:  # tunix's iteration is timed whole
            out["split_mfu"] = {k: mfu(flops[k], result["split_s"][k]) for k in result["split_s"]}
        out["tokens_per_s"] = batch * new / result["median_s"]  # generated tokens per second of iteration
        out["mfu"] = mfu(sum(flops.values()), result["median_s"])
    return out


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def print_table(records: list[dict], file=sys.stdout) -> None:
    device_memory = any(rec.get("device_peak_mb") for rec in records)
    header = ["row", "tok/s", "prefill tok/s", "median s", "MFU", "peak RSS GB"]
    header += ["device peak GB"] * device_memory + ["ours/peer"]
    lines = []
    for rec in records:
        if rec["kind"] == "ceiling":
            continue
        if rec["status"] != "ok":
            lines.append([rec["id"], rec["status"], "", "", "", ""] + [""] * device_memory + [(rec.get("reason") or "")[:80]])
            continue
        ratios = " ".join(f"{k}={v:.2f}x" for k, v in rec.get("ratios", {}).items())
        lines.append(
            [
                rec["id"] + (" (!)" if rec.get("noisy") else ""),
                _fmt(rec.get("tokens_per_s"), ",.0f"),
                _fmt(rec.get("prefill_tokens_per_s"), ",.0f", ""),
                _fmt(rec.get("median_s"), ".3f"),
                _fmt(rec.get("mfu") and 100 * rec["mfu"], ".1f", "-") + ("%" if rec.get("mfu") else ""),
                _fmt(rec.get("peak_rss_mb") and rec["peak_rss_mb"] / 1024, ".2f"),
            ]
            + [_fmt(rec.get("device_peak_mb") and rec["device_peak_mb"] / 1024, ".2f")] * device_memory
            + [ratios]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    fmt_line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(fmt_line(header), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for cells in lines:
        print(fmt_line(cells), file=file)


def code_version() -> str:
    """git's short commit hash; in a copy of the working tree without git (as on the device machines) a hash
    of the code the rows run ("tree-" + 12 hex digits of every .py file under rto_jax/, benchmarks/ and
    third_party/), so that `.progress.json` still knows which code measured its rows."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    digest = hashlib.sha256()
    for folder in ("rto_jax", "benchmarks", "third_party"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return "tree-" + digest.hexdigest()[:12]


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = code_version()
    try:  # the accelerator, where there is one (nvidia-smi's name and memory of each GPU)
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.strip().splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        gpus = []
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": gpus,
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "commit": commit,
    }


def write_json(path: Path, payload: dict) -> None:
    """Atomic: a reader sees the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def load_progress(path: Path | None, commit: str | None) -> dict[str, dict]:
    """Rows already measured by an interrupted run of the same commit: `{row id: {"row", "result"}}`."""
    if path is None or not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: unreadable benchmark progress file ({err}); delete it to start afresh") from err
    if commit is None or saved.get("commit") != commit:
        return {}  # other code (or code of no known version): its timings do not describe this one
    return saved.get("rows", {})


def run(
    rows: list[dict],
    *,
    smoke: bool,
    timeout: float,
    log=sys.stderr,
    progress: Path | None = None,
    commit: str | None = None,
    budget: float | None = None,
) -> list[dict]:
    """Runs every row (ceilings first) and returns one record per row: the row, its result and metrics.

    With `progress`, each finished row is saved there (atomically) and a row already saved by an interrupted
    run of the same commit, with the same definition, is not measured again. With `budget` (seconds), a row
    not started within it is recorded as skipped, and the row running when it ends is cut off there.
    """
    deadline = time.monotonic() + budget if budget is not None else None
    rows = sorted(rows, key=lambda r: r["group"] != "ceiling")  # stable: ceilings first, then as listed
    results: dict[str, dict] = {}
    saved = load_progress(progress, commit)
    with tempfile.TemporaryDirectory(prefix="rto-bench-") as tmp:
        if smoke:
            # One process per backend, one after the other (torch's spinning threads crawl when they share
            # the 2 cores with XLA's): seconds instead of a JAX/torch import per row. Smoke speeds mean
            # nothing, so XLA may also skip its slow LLVM optimizations (compiles ~40% faster).
            flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
            for backend in ("jax", "torch", "tunix"):
                group = [r for r in rows if r["backend"] == backend]
                if group:
                    start = time.perf_counter()
                    out, _ = _run_worker(group, timeout * len(group), Path(tmp), {"XLA_FLAGS": flags})
                    for res in out:
                        res["peak_rss_mb"] = res.get("self_maxrss_mb")  # cumulative over the shared process
                        results[res["id"]] = res
                    print(f"[{backend}] {len(group)} rows in {time.perf_counter() - start:.1f} s", file=log)
        else:
            for i, row in enumerate(rows):
                earlier = saved.get(row["id"])
                if earlier and earlier["row"] == row:
                    results[row["id"]] = earlier["result"]
                    print(
                        f"[{i + 1}/{len(rows)}] {row['id']}: {earlier['result']['status']} (kept from {progress})",
                        file=log,
                        flush=True,
                    )
                    continue
                left = deadline - time.monotonic() if deadline is not None else timeout
                if left <= 0:
                    results[row["id"]] = {"id": row["id"], "status": "skipped", "reason": f"not started within --budget {budget:.0f} s"}
                    print(f"[{i + 1}/{len(rows)}] {row['id']}: skipped (budget spent)", file=log, flush=True)
                    continue
                load_before = os.getloadavg()[0]
                start = time.perf_counter()
                (res,), peak = _run_worker([row], min(timeout, left), Path(tmp))
                if res["status"] == "error" and left < timeout and time.monotonic() >= deadline:
                    # Cut off by the budget, not by its own timeout: not measured, and not kept as measured.
                    res = {"id": row["id"], "status": "skipped", "reason": f"cut off by --budget {budget:.0f} s"}
                res["peak_rss_mb"] = peak
                res["loadavg_1m"] = [load_before, os.getloadavg()[0]]
                # This row alone keeps about `cores` threads busy; a higher load means other work shared the CPU.
                res["noisy"] = max(res["loadavg_1m"]) > (os.cpu_count() or 1) + 1
                results[row["id"]] = res
                if progress is not None and res["status"] != "skipped":
                    saved[row["id"]] = {"row": row, "result": res}
                    write_json(progress, {"commit": commit, "rows": saved})
                print(
                    f"[{i + 1}/{len(rows)}] {row['id']}: {res['status']} in {time.perf_counter() - start:.0f} s"
                    + (f" ({res.get('reason')})" if res["status"] != "ok" else ""),
                    file=log,
                    flush=True,
                )
    ceilings = [results[r["id"]].get("gflops") for r in rows if r["kind"] == "ceiling"]
    ceiling = max((c for c in ceilings if c), default=None)
    bandwidths = [results[r["id"]].get("bandwidth_gbs") for r in rows if r["kind"] == "ceiling"]
    bandwidth = max((b for b in bandwidths if b), default=None)
    records = []
    for row in rows:
        res = results[row["id"]]
        records.append({**row, **res, **_metrics(row, res, ceiling, bandwidth), "ceiling_gflops": ceiling})
    by_id = {rec["id"]: rec for rec in records}
    for rec in records:
        ratios = {}
        for peer in peer_of(rec, by_id):
            # tokens/s is None where noise made t_R <= t_1 (a decode step could not be resolved).
            if (
                rec["status"] == "ok"
                and peer["status"] == "ok"
                and rec.get("device") == peer.get("device")  # never a GPU row against a CPU one
                and rec.get("tokens_per_s")
                and peer.get("tokens_per_s")
            ):
                ratios[peer["impl"]] = rec["tokens_per_s"] / peer["tokens_per_s"]
                if rec["kind"] == "rollout" and peer.get("prefill_tokens_per_s"):
                    ratios[f"{peer['impl']}-prefill"] = rec["prefill_tokens_per_s"] / peer["prefill_tokens_per_s"]
        if ratios:
            rec["ratios"] = ratios
    return records


def summary(records: list[dict], file=sys.stdout) -> None:
    """The ceiling line, the table, and the PPO iteration split."""
    for rec in records:
        if rec["kind"] == "ceiling":
            sizes = ", ".join(f"{n}^2: {g:.0f}" for n, g in rec.get("by_size", {}).items())
            text = f"{rec['gflops']:.0f} GFLOP/s ({sizes})" if rec["status"] == "ok" else rec.get("reason")
            print(f"ceiling {rec['impl']} {rec.get('dtype', 'float32')} matmul: {text}", file=file)
            if rec.get("bandwidth_gbs"):
                mb = rec.get("read_mb", 1024)
                size = f"{mb / 1024:g} GiB" if mb >= 1024 else f"{mb} MB"
                print(f"ceiling {rec['impl']} memory read (sum over {size}): {rec['bandwidth_gbs']:.1f} GB/s", file=file)
    ceiling = next((r["ceiling_gflops"] for r in records if r.get("ceiling_gflops")), None)
    print(f"MFU is against the best of those: {_fmt(ceiling, '.0f')} GFLOP/s\n", file=file)
    print_table(records, file)
    if any(rec.get("noisy") for rec in records):
        print("(!) the 1-minute load average exceeded cores + 1 during this row: other work shared the CPU", file=file)
    for rec in records:
        if rec["kind"] == "ppo_split" and rec["status"] == "ok" and "split_s" in rec:
            parts = ", ".join(
                f"{k} {rec['split_s'][k]:.2f} s ({100 * rec['split_share'][k]:.0f}%, MFU "
                f"{_fmt(rec['split_mfu'][k] and 100 * rec['split_mfu'][k], '.1f')}%)"
                for k in ("rollout", "scoring", "update")
            )
            print(f"\nPPO iteration {rec['id']}: {rec['median_s']:.2f} s = {parts}", file=file)
    for rec in records:
        if rec.get("bandwidth_fraction") is not None:
            print(
                f"decode {rec['id']}: {100 * rec['bandwidth_fraction']:.0f}% of the memory read rate "
                "(weights + KV cache per step)",
                file=file,
            )
    weights = {r.get("weights") for r in records if r["kind"] == "rollout" and r.get("impl", "").startswith("jax")}
    if weights - {None}:
        print(f"rollout weights (ours): {', '.join(sorted(w for w in weights if w))}", file=file)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, one process per backend (seconds)")
    ap.add_argument(
        "--suite",
        choices=("cpu", "device"),
        default="cpu",
        help="cpu: the table `make bench` runs; device: the accelerator's (bf16, 135M and 1B, decode, attention)",
    )
    ap.add_argument("--budget", type=float, default=None, help="seconds: rows not started by then are skipped")
    ap.add_argument("--only", default=None, help="comma-separated row-id globs or prefixes, e.g. 'train/sft,rollout'")
    ap.add_argument(
        "--out",
        default=None,
        help="folder for <date>.json (default benchmarks/results; with --smoke runs/benchmarks-smoke, "
        "untracked: a smoke run's figures are meaningless)",
    )
    ap.add_argument("--reps", type=int, default=None, help="override every row's timed repetitions")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per row before its worker is killed")
    ap.add_argument("--list", action="store_true", help="print the selected row ids and exit")
    args = ap.parse_args(argv)

    if args.suite == "device":
        rows = device_rows(smoke=args.smoke)
    else:
        rows = smoke_rows() if args.smoke else full_rows()
    rows = select(rows, args.only)
    if args.reps is not None:
        rows = [{**r, "reps": args.reps} for r in rows]
    if args.list:
        print("\n".join(r["id"] for r in rows))
        return 0
    machine = _machine()
    started = datetime.datetime.now()
    print(
        f"{len(rows)} rows on {machine['cpu']} ({machine['cores']} cores, {machine['memory_gb']} GB)", file=sys.stderr
    )
    name = started.strftime("%Y-%m-%d") + ("-device" if args.suite == "device" else "") + ("-smoke" if args.smoke else "") + ".json"
    out = Path(args.out) if args.out else SMOKE_OUT if args.smoke else DEFAULT_OUT
    path = out / name
    # An interrupted full run (killed, machine taken back) resumes from here on the next call.
    progress = None if args.smoke else out / ".progress.json"
    records = run(
        rows, smoke=args.smoke, timeout=args.timeout, progress=progress, commit=machine["commit"], budget=args.budget
    )
    summary(records)
    write_json(
        path,
        {
            "date": started.isoformat(timespec="seconds"),
            "elapsed_s": (datetime.datetime.now() - started).total_seconds(),
            "smoke": args.smoke,
            "suite": args.suite,
            "only": args.only,
            "machine": machine,
            "ceiling_gflops": next((r["ceiling_gflops"] for r in records if r.get("ceiling_gflops")), None),
            "rows": records,
        },
    )
    if progress is not None and not any(r["status"] == "skipped" for r in records):
        progress.unlink(missing_ok=True)  # kept while rows are left: the next call measures only those
    print(f"\nwrote {path}", file=sys.stderr)
    return 0 if all(r["status"] in ("ok", "unavailable", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
