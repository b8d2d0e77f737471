"""A training step's kernels, ours (XLA) against PyTorch's on the same shapes:
`python -m benchmarks.train_kernels [--shape tiny] [--batch 8] [--seq 512] [--head-tokens 384]`.

The evidence behind docs/results/benchmarks.md#tiny-rows-against-the-peer-kernels-2026-12-07. A training
step's matmuls and attention, each timed alone forward and backward (what the step pays per layer):
every distinct projection of a layer (`[B*T, in] x [in, out]`: the forward, the input's gradient and the
weight's gradient, three matmuls), the tied LM head over the positions the objective reads (`--head-tokens`
per sequence: the SFT row's 3/4 of the tokens) and causal attention over the whole sequence (ours: what
`model.attention="auto"` picks; PyTorch's: `scaled_dot_product_attention`, the fused kernel HF's Llama calls).
The weighted sum over the model's layers is what the step spends in these kernels; set beside the
training row's whole step (`make bench`), it says whether a gap to the peer is in the kernels or around
them (norms, RoPE, activations, the loss, the optimizer). Prints one table (milliseconds, the median of
`--reps`); run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.decode_kernels import _dims, _weight_shapes, torch_side
from benchmarks.timing import measure

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def parts(m: dict, batch: int, seq: int, head_tokens: int) -> list[dict]:
    """The timed kernels: name, kind, operand shapes, how many a step runs and their FLOPs (forward + backward)."""
    out = {}
    for name, (d_in, d_out) in zip(PROJECTIONS, _weight_shapes(m)):
        key = (d_in, d_out)  # k and v, gate and up share a shape: timed once, counted twice
        if key in out:
            out[key]["count"] += m["layers"]
            out[key]["name"] += f"+{name}"
            continue
        out[key] = {"name": name, "kind": "linear", "rows": batch * seq, "in": d_in, "out": d_out, "count": m["layers"]}
    head = {"name": "lm head (tied)", "kind": "linear", "rows": batch * head_tokens, "in": m["d"], "out": m["vocab"]}
    head.update(count=1, tied=True)
    attn = {"name": "attention (causal)", "kind": "attention", "batch": batch, "seq": seq, "count": m["layers"]}
    rows = list(out.values()) + [head, attn]
    for r in rows:
        if r["kind"] == "linear":
            r["gflop"] = 3 * 2 * r["rows"] * r["in"] * r["out"] / 1e9
        else:  # QK^T and PV over the causal half, forward, and the backward's five products (s recomputed)
            r["gflop"] = 7 * 2 * batch * m["heads"] * seq * seq * m["head_dim"] / 2 / 1e9
    return rows


def jax_times(m: dict, rows: list[dict], reps: int) -> list[float]:
    """Milliseconds of each part's forward + backward: `layers.matmul`'s VJP, `attention.attention`'s gradient."""
    import jax
    import jax.numpy as jnp

    from rto_jax.models import attention
    from rto_jax.models.layers import matmul

    key = iter(jax.random.split(jax.random.key(0), 64))
    normal = lambda shape: jax.random.normal(next(key), shape, jnp.float32)  # noqa: E731
    times = []
    for r in rows:
        if r["kind"] == "linear":
            x, g = normal((r["rows"], r["in"])), normal((r["rows"], r["out"]))
            # the projections' kernels are [in, out]; the tied head multiplies by the embedding's transpose, as
            # CausalLM does
            w = 0.02 * normal((r["out"], r["in"]) if r.get("tied") else (r["in"], r["out"]))
            product = (lambda x, e: matmul(x, e.T)) if r.get("tied") else matmul
            # forward, then both gradients: the three matmuls a layer's projection costs a step
            step = jax.jit(lambda x, w, g, product=product: jax.vjp(product, x, w)[1](g))
            fn = lambda step=step, x=x, w=w, g=g: step(x, w, g)  # noqa: E731
        else:
            b, t = r["batch"], r["seq"]
            q, g = normal((b, t, m["heads"], m["head_dim"])), normal((b, t, m["heads"], m["head_dim"]))
            k, v = normal((b, m["kv_heads"], t, m["head_dim"])), normal((b, m["kv_heads"], t, m["head_dim"]))
            mask = attention.Mask(jnp.arange(t), jnp.ones((b, t), jnp.int32))
            step = jax.jit(
                jax.grad(lambda q, k, v, g: jnp.vdot(attention.attention(q, k, v, mask, "auto"), g), argnums=(0, 1, 2))
            )
            fn = lambda step=step, q=q, k=k, v=v, g=g: step(q, k, v, g)  # noqa: E731
        times.append(1e3 * measure(fn, 1, reps, jax.block_until_ready)["median_s"])
    return times


def torch_times(m: dict, rows: list[dict], reps: int) -> list[float]:
    """Milliseconds of the same parts in PyTorch, eager: nn.Linear's layout and autograd, SDPA."""
    import torch

    torch.manual_seed(0)
    times = []
    for r in rows:
        if r["kind"] == "linear":
            x = torch.randn(r["rows"], r["in"], requires_grad=True)
            w = (0.02 * torch.randn(r["out"], r["in"])).requires_grad_()
            g = torch.randn(r["rows"], r["out"])

            def fn(x=x, w=w, g=g):
                y = torch.nn.functional.linear(x, w)
                return torch.autograd.grad(y, (x, w), g)

        else:
            b, t = r["batch"], r["seq"]
            q = torch.randn(b, m["heads"], t, m["head_dim"], requires_grad=True)
            k = torch.randn(b, m["kv_heads"], t, m["head_dim"], requires_grad=True)
            v = torch.randn(b, m["kv_heads"], t, m["head_dim"], requires_grad=True)
            g = torch.randn(b, m["heads"], t, m["head_dim"])
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def fn(q=q, k=k, v=v, g=g):
                return torch.autograd.grad(sdpa(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), g)

        times.append(1e3 * measure(fn, 1, reps)["median_s"])
    return times


def table(rows: list[dict], ours: list[float], peer: list[float] | None) -> str:
    """Per part: ours / torch ms, their GFLOP/s and ratio; then the step's sum over layers."""
    header = ["kernel (forward + backward)", "per step", "ours ms", "torch ms"]
    header += ["ours GFLOP/s", "torch GFLOP/s", "ours/torch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        shape = f"{r['rows']} x {r['in']} x {r['out']}" if r["kind"] == "linear" else f"{r['batch']} x {r['seq']}"
        theirs = f"{peer[i]:.3g}" if peer else "-"
        their_rate = f"{r['gflop'] / peer[i] * 1e3:.0f}" if peer else "-"
        ratio = f"{peer[i] / ours[i]:.2f}x" if peer else "-"
        lines.append(
            f"| {r['name']} `{shape}` | {r['count']} | {ours[i]:.3g} | {theirs} | {r['gflop'] / ours[i] * 1e3:.0f} | "
            f"{their_rate} | {ratio} |"
        )
    total = sum(r["count"] * t for r, t in zip(rows, ours))
    their_total = sum(r["count"] * t for r, t in zip(rows, peer)) if peer else None
    lines.append(
        f"| **the step's kernels** (sum x per step) | | {total:.1f} | "
        + (f"{their_total:.1f} | | | {their_total / total:.2f}x |" if peer else "- | | | - |")
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--head-tokens", type=int, default=None, help="LM head positions per sequence (default 3/4 of seq)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)  # the peer, in its own process
    args = ap.parse_args(argv)
    m = _dims(args.shape)
    rows = parts(m, args.batch, args.seq, args.head_tokens or args.seq - args.seq // 4)
    if args.torch_child:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # as the peer rows run: threads = cores
        print(json.dumps(torch_times(m, rows, args.reps)))
        return 0
    peer = torch_side("benchmarks.train_kernels", argv)
    print(table(rows, jax_times(m, rows, args.reps), peer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
