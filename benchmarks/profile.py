"""Where a benchmark row's time goes, per XLA op: `python -m benchmarks.profile ROW_ID [--top N] [--out F]`.

Runs one of our (jax) rows' timed units under `jax.profiler` (XLA:CPU records one event per executed
thunk, i.e. per HLO instruction of the optimized module, with its start and the `end:` of its work), and
joins each op with its line in the optimized HLO (dumped by XLA for this run) to get its shape, kind and
the JAX operation it came from. Prints, per timed unit (a training step; the sampler, make_experience and
the update of a PPO iteration row): op time by category (matmul, transpose/copy, elementwise, reduce,
gather/scatter, other) and the top ops. Op times are summed over XLA's threads, so they can add up to
more than the wall time; the shares are what to compare before and after a change.

It is a diagnostic, not a benchmark: the profiler adds a little overhead, and one traced call is one
sample. `make bench` is where speed is measured.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

CATEGORIES = ("matmul", "transpose/copy", "elementwise", "reduce", "gather/scatter", "other")


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> {shape, op, source} for every instruction of an optimized HLO module; `op` of a
    fusion is its category, read from the fused computation's body."""
    bodies: dict[str, list[str]] = {}
    instructions: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(1)
            bodies[current] = []
            continue
        m = re.match(r"\s+(?:ROOT )?%(\S+) = (.+?) (\w[\w-]*)\(", line)
        if m and current is not None:
            bodies[current].append(line)
            calls = re.search(r"calls=%([\w.-]+)", line)
            source = re.search(r'op_name="([^"]+)"', line)
            instructions[m.group(1)] = {
                "shape": m.group(2),
                "hlo": m.group(3),
                "calls": calls.group(1) if calls else None,
                "source": source.group(1) if source else "",
            }
    for inst in instructions.values():
        inst["category"] = _category(inst["hlo"], bodies.get(inst["calls"], []) if inst["calls"] else [])
    return instructions


def _category(hlo: str, body: list[str]) -> str:
    ops = {m.group(1) for line in body for m in [re.search(r"= .+? (\w[\w-]*)\(", line)] if m} or {hlo}
    if ops & {"dot", "convolution"}:
        return "matmul"
    if ops & {"transpose", "copy"}:
        return "transpose/copy"
    if ops & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
        return "gather/scatter"
    if ops & {"reduce", "reduce-window", "sort"}:
        return "reduce"
    if hlo in ("fusion", "add", "multiply", "subtract", "divide", "exponential", "select", "convert", "broadcast"):
        return "elementwise"
    return "other"


def op_times(trace_events: list[dict]) -> dict[tuple[str, str], dict]:
    """(hlo_module, hlo_op) -> {"run": s, "span": s} from XLA:CPU's thunk events, summed over executions.

    `run` is the op's own event; `span` runs from its start to its `end:` event. For most ops the two
    agree, or `span` is longer only by waiting for a free thread; Eigen's matmuls (HLO `dot`) run
    asynchronously, so their event is only the launch and `span` is their time.
    """
    pending: dict[tuple[int, str], list[tuple[str, float, float]]] = collections.defaultdict(list)
    times: dict[tuple[str, str], dict] = collections.defaultdict(lambda: {"run": 0.0, "span": 0.0})
    for event in sorted((e for e in trace_events if e.get("ph") == "X"), key=lambda e: e["ts"]):
        name, args = event["name"], event.get("args", {})
        if "hlo_op" in args:
            pending[(event["pid"], name)].append((args.get("hlo_module", ""), event["ts"], event["dur"]))
        elif name.startswith("end: "):
            queue = pending.get((event["pid"], name[5:]))
            if queue:
                module, start, run = queue.pop(0)
                t = times[(module, name[5:])]
                t["run"] += run / 1e6
                t["span"] += (event["ts"] + event["dur"] - start) / 1e6
    return dict(times)


def summarize(times: dict[tuple[str, str], dict], modules: dict[str, dict], top: int) -> dict:
    """Category totals and the `top` ops (with shape, kind and JAX source) of one traced call."""
    by_category = collections.Counter({c: 0.0 for c in CATEGORIES})
    rows = []
    for (module, op), t in times.items():
        inst = modules.get(module, {}).get(op, {"shape": "?", "hlo": "?", "category": "other", "source": ""})
        seconds = t["span"] if inst["hlo"] == "dot" else t["run"]
        by_category[inst["category"]] += seconds
        rows.append(
            {"op": op, "module": module, "seconds": seconds, **{k: inst[k] for k in ("shape", "category", "source")}}
        )
    total = sum(by_category.values())
    rows.sort(key=lambda r: -r["seconds"])
    return {
        "op_seconds": total,
        "categories": {c: {"seconds": s, "share": s / total if total else 0.0} for c, s in by_category.most_common()},
        "top": rows[:top],
    }


def _load_modules(dump_dir: str) -> dict[str, dict]:
    """Module name -> parsed instructions, from the newest optimized dump of each name."""
    modules = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "module_*.cpu_after_optimizations.txt"))):
        name = os.path.basename(path).split(".")[1]
        with open(path) as f:
            modules[name] = parse_hlo(f.read())
    return modules


def _capture_units(row: dict) -> list[tuple[str, object, object]]:
    """The row's timed callables, in the order the row times them, each with its sync, without timing."""
    from benchmarks import jax_rows

    units = []
    names = {
        "train": ["step"],
        "ppo_split": ["sampler", "make_experience", "update"],
        "rollout": ["generate", "generate_one_token"],
    }.get(row["kind"])
    if names is None:
        raise SystemExit(
            f"error: row {row['id']}: kind {row['kind']!r} has no profile (train, rollout and ppo_split rows do)"
        )

    def capture(fn, warmup, reps, sync):
        units.append((names[len(units)], fn, sync))
        return {"median_s": 0.0, "times_s": [], "first_s": 0.0}

    jax_rows.RUNNERS[row["kind"]](row, measure=capture)
    return units


def profile_row(row: dict, top: int, dump_dir: str, trace_dir: str) -> dict:
    import jax

    out = {"id": row["id"], "units": {}}
    for name, fn, sync in _capture_units(row):
        sync(fn())  # compiles
        sync(fn())
        unit_dir = os.path.join(trace_dir, name)
        jax.profiler.start_trace(unit_dir, create_perfetto_trace=True)
        sync(fn())
        jax.profiler.stop_trace()
        (trace_path,) = glob.glob(os.path.join(unit_dir, "plugins/profile/*/perfetto_trace.json.gz"))
        with gzip.open(trace_path) as f:
            events = json.load(f)["traceEvents"]
        out["units"][name] = summarize(op_times(events), _load_modules(dump_dir), top)
    return out


def print_report(report: dict) -> None:
    print(f"# {report['id']}")
    for name, unit in report["units"].items():
        print(f"\n## {name}: {unit['op_seconds']:.2f} s of op time (summed over XLA's threads)\n")
        print("| category | s | share |\n|---|---|---|")
        for category, v in unit["categories"].items():
            print(f"| {category} | {v['seconds']:.3f} | {100 * v['share']:.1f}% |")
        print("\n| op | ms | category | shape | from |\n|---|---|---|---|---|")
        for r in unit["top"]:
            print(
                f"| {r['op']} | {1e3 * r['seconds']:.1f} | {r['category']} | `{_short(r['shape'])}` | {r['source'][:60]} |"
            )


def _short(shape: str, width: int = 40) -> str:
    return shape if len(shape) <= width else shape[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("row", help="a jax row id of `python -m benchmarks.run --list` (or --smoke's)")
    ap.add_argument("--smoke", action="store_true", help="look the row up among the smoke rows")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)

    from benchmarks.workloads import full_rows, smoke_rows

    rows = {r["id"]: r for r in (smoke_rows() if args.smoke else full_rows())}
    row = rows.get(args.row)
    if row is None or row["backend"] != "jax":
        ours = sorted(
            i for i, r in rows.items() if r["backend"] == "jax" and r["kind"] in ("train", "rollout", "ppo_split")
        )
        print(f"error: {args.row!r} is not one of our rows; one of: {', '.join(ours)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rto-profile-") as tmp:
        dump_dir, trace_dir = os.path.join(tmp, "hlo"), os.path.join(tmp, "trace")
        # Before jax is imported: XLA reads its flags once. Only the optimized module text is needed.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
            " --xla_dump_hlo_pass_re=^$ --xla_dump_hlo_module_re=.*"
        ).strip()
        report = profile_row(row, args.top, dump_dir, trace_dir)
    print_report(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
