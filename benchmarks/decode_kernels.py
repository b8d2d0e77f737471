"""One decode step's kernels, ours (XLA) against PyTorch's on the same shapes:
`python -m benchmarks.decode_kernels [--shape smollm2-135m] [--batches 1,8,32] [--cache 192]`.

The evidence behind docs/results/benchmarks.md#decode-against-the-peers-kernels-2026-12-07. A decode
step at batch B is every layer's seven projections of `[B, d]` rows (q, k, v, o, gate, up, down), the
LM head's `[B, d] x [d, V]` and the attention of one query per head over the KV cache. Each part is
timed alone, every layer's weights distinct (the whole model's projection weights, far larger than the
caches, streamed once per step as decode streams them) and the layers chained as a step chains them:
ours as one jitted program, PyTorch's eagerly in nn.Linear's weight layout (the kernels HF `generate`
calls, with their per-op dispatch but none of the Python around the step). The columns say whether a
gap to the peer's whole step is in the kernels or around them. Prints one table (milliseconds per step,
the median of `--reps`) and the machine's memory read rate; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

from benchmarks.timing import measure
from benchmarks.workloads import SHAPES

PARTS = ("projections", "head", "attention")


def _dims(shape: str) -> dict:
    s = SHAPES[shape]
    return {
        "layers": s["num_layers"],
        "d": s["hidden_size"],
        "ffn": s["intermediate_size"],
        "heads": s["num_heads"],
        "kv_heads": s["num_kv_heads"],
        "head_dim": s["head_dim"],
        "vocab": s["vocab_size"],
    }


def _weight_shapes(m: dict) -> list[tuple[int, int]]:
    """One layer's projections `[in, out]`: q, k, v, o, gate, up, down."""
    d, q, kv, f = m["d"], m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"], m["ffn"]
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def projection_bytes(m: dict) -> int:
    """Float32 bytes of every layer's projection weights: what one decode step's projections read."""
    return 4 * m["layers"] * sum(a * b for a, b in _weight_shapes(m))


def jax_times(m: dict, batches: list[int], cache: int, reps: int) -> dict:
    """{batch: {part: ms}} of our kernels: `rto_jax.models.layers.matmul`, `attention.xla_attention`."""
    import jax
    import jax.numpy as jnp

    from rto_jax.models import attention
    from rto_jax.models.layers import matmul

    draws = iter(range(1 << 30))
    normal = lambda shape: 0.02 * jax.random.normal(jax.random.key(next(draws)), shape, jnp.float32)  # noqa: E731
    weights = [[normal(s) for s in _weight_shapes(m)] for _ in range(m["layers"])]
    embedding = normal((m["vocab"], m["d"]))  # tied: the head multiplies by its transpose, as CausalLM does
    caches = [(normal((1, m["kv_heads"], cache, m["head_dim"])),) * 2 for _ in range(m["layers"])]

    @jax.jit
    def projections(x, weights):
        # the layers chained as a decode step chains them (q, k, v of the same rows; o of q; gate and up of
        # the sum; down of their product): the kernels and their order, not the model's math
        keys_values = []
        for wq, wk, wv, wo, wg, wu, wd in weights:
            q = matmul(x, wq)
            keys_values += [matmul(x, wk), matmul(x, wv)]
            x = x + matmul(q, wo)
            x = x + matmul(matmul(x, wg) * matmul(x, wu), wd)
        return x, keys_values

    head = jax.jit(lambda x, e: matmul(x, e.T))

    @jax.jit
    def attend(q, caches, mask):
        for k, v in caches:  # each layer's query from the one before: the layers in sequence
            q = attention.xla_attention(q, k, v, mask)
        return q

    out = {}
    for b in batches:
        x = normal((b, m["d"]))
        q = normal((b, 1, m["heads"], m["head_dim"]))
        kv = [tuple(jnp.broadcast_to(c, (b,) + c.shape[1:]) + 0.0 for c in pair) for pair in caches]
        mask = jnp.ones((b, 1, 1, cache), bool)
        time_ms = lambda fn: 1e3 * measure(fn, 1, reps, jax.block_until_ready)["median_s"]  # noqa: E731
        out[b] = {
            "projections": time_ms(lambda: projections(x, weights)),
            "head": time_ms(lambda: head(x, embedding)),
            "attention": time_ms(lambda: attend(q, kv, mask)),
        }
    return out


def torch_times(m: dict, batches: list[int], cache: int, reps: int) -> dict:
    """{batch: {part: ms}} of PyTorch's kernels on the same shapes (eager, inference mode)."""
    import torch

    torch.manual_seed(0)
    normal = lambda *shape: 0.02 * torch.randn(*shape)  # noqa: E731
    linear, sdpa = torch.nn.functional.linear, torch.nn.functional.scaled_dot_product_attention
    # nn.Linear's layout, [out, in], as HF's layers hold their weights
    weights = [[normal(b, a) for a, b in _weight_shapes(m)] for _ in range(m["layers"])]
    embedding = normal(m["vocab"], m["d"])
    caches = [(normal(1, m["kv_heads"], cache, m["head_dim"]),) * 2 for _ in range(m["layers"])]

    def projections(x):
        keys_values = []
        for wq, wk, wv, wo, wg, wu, wd in weights:  # chained as in jax_times
            q = linear(x, wq)
            keys_values += [linear(x, wk), linear(x, wv)]
            x = x + linear(q, wo)
            x = x + linear(linear(x, wg) * linear(x, wu), wd)
        return x, keys_values

    def attend(q, kv):
        # HF's default ("sdpa") Llama attention for one query: PyTorch's fused kernel, kv heads shared by groups
        for k, v in kv:
            q = sdpa(q, k, v, enable_gqa=True)
        return q

    out = {}
    with torch.inference_mode():
        for b in batches:
            x = normal(b, m["d"])
            q = normal(b, m["heads"], 1, m["head_dim"])
            kv = [tuple(c.expand(b, -1, -1, -1).clone() for c in pair) for pair in caches]
            time_ms = lambda fn: 1e3 * measure(fn, 1, reps)["median_s"]  # noqa: E731
            out[b] = {
                "projections": time_ms(lambda: projections(x)),
                "head": time_ms(lambda: linear(x, embedding)),
                "attention": time_ms(lambda: attend(q, kv)),
            }
    return out


def table(m: dict, ours: dict, peer: dict | None, read_gbs: float | None) -> str:
    """The markdown table: per batch and part, ours / torch's milliseconds, their sums and our projections' read rate."""
    lines = ["| batch | " + " | ".join(f"{p} ours / torch ms" for p in PARTS) + " | sum ours / torch ms | projections GB/s |"]
    lines.append("|" + "---|" * (len(PARTS) + 3))
    for b, parts in ours.items():
        theirs = (peer or {}).get(b, {})
        cells = [f"{parts[p]:.2f} / {theirs[p]:.2f}" if p in theirs else f"{parts[p]:.2f} / -" for p in PARTS]
        total = sum(parts.values())
        their_total = f"{sum(theirs.values()):.2f}" if theirs else "-"
        rate = projection_bytes(m) / (parts["projections"] / 1e3) / 1e9
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {total:.2f} / {their_total} | {rate:.1f} |")
    if read_gbs is not None:
        lines.append(f"\nMemory read rate (jitted sum over 1 GiB): {read_gbs:.1f} GB/s; "
                     f"projection weights: {projection_bytes(m) / 1e6:.0f} MB a step.")
    return "\n".join(lines)


def torch_side(module: str, argv: list[str] | None):
    """`module`'s PyTorch side: `python -m module --torch-child ARGV` in a child process (its thread pool never
    shares a process with XLA's), the JSON of its last line; None, with the reason on stderr, if it fails."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, "--torch-child", *(sys.argv[1:] if argv is None else argv)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(proc.stdout.splitlines()[-1])
    except subprocess.CalledProcessError as e:
        print(f"PyTorch's side unavailable: {e}\n{e.stderr[-2000:]}", file=sys.stderr)
    except (json.JSONDecodeError, IndexError) as e:
        print(f"PyTorch's side unavailable: {e}", file=sys.stderr)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--cache", type=int, default=192, help="KV cache slots (the benchmark's 64 + 128 tokens)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)  # the peer, in its own process
    args = ap.parse_args(argv)
    m, batches = _dims(args.shape), [int(b) for b in args.batches.split(",")]
    if args.torch_child:
        print(json.dumps(torch_times(m, batches, args.cache, args.reps)))
        return 0
    peer = torch_side("benchmarks.decode_kernels", argv)
    if peer is not None:
        peer = {int(b): parts for b, parts in peer.items()}
    ours = jax_times(m, batches, args.cache, args.reps)
    from benchmarks.jax_rows import _read_bandwidth

    print(table(m, ours, peer, float(np.round(_read_bandwidth(1, max(args.reps // 4, 1)), 1))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
