"""Attention's forward + backward per layer, `xla` against `blockwise` at several block lengths:
`python -m benchmarks.attention_blocks [--shapes tiny,smollm2-135m,study] [--lengths 128,256,512,1024]`.

The evidence behind `rto_jax.models.attention`'s CPU choices (`CPU_SCORE_BYTES`, `block_size_for`): for
each head layout and batch, a causal full-length mask, the median time of one jitted
`grad(sum(attention(q, k, v) * g))` with respect to q, k and v (what a training step pays per layer). Run it on
an otherwise idle machine; it prints one table (milliseconds; the fastest of each row marked *).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.timing import measure
from rto_jax.models import attention

# (batch, query heads, kv heads, head dim) of the models our CPU runs train, with the batch they train at.
LAYOUTS = {
    "tiny": (8, 4, 2, 32),  # benchmarks' tiny shape, batch 8
    "smollm2-135m": (8, 9, 3, 64),  # SmolLM2-135M, batch 8
    "study": (64, 4, 4, 16),  # the synthetic study's model (configs/rto_synthetic.py), batch 64
}
BLOCKS = (32, 64, 128, 256)


def _inputs(batch, heads, kv_heads, head_dim, length):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, kv_heads, length, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, kv_heads, length, head_dim), jnp.float32)
    g = jax.random.normal(keys[3], (batch, length, heads, head_dim), jnp.float32)
    mask = attention.Mask(jnp.arange(length), jnp.ones((batch, length), jnp.int32))
    return q, k, v, g, mask


def time_ms(fn, q, k, v, g, mask, reps: int) -> float:
    """Median milliseconds of the jitted gradient of <fn(q, k, v, mask), g> with respect to q, k, v."""
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * g), argnums=(0, 1, 2)))
    return 1e3 * measure(lambda: step(q, k, v), 1, reps, jax.block_until_ready)["median_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(LAYOUTS))
    ap.add_argument("--lengths", default="64,128,256,294,512,1024,2048")
    ap.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",")]
    header = ["shape", "T", "xla"] + [f"block {b}" for b in blocks] + ["chosen"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name in args.shapes.split(","):
        batch, heads, kv_heads, head_dim = LAYOUTS[name]
        for length in (int(t) for t in args.lengths.split(",")):
            q, k, v, g, mask = _inputs(batch, heads, kv_heads, head_dim, length)
            times = {"xla": time_ms(lambda q, k, v, m: attention.xla_attention(q, k, v, m.dense()), q, k, v, g, mask, args.reps)}
            for b in blocks:
                if b <= length:  # a block longer than the sequence is the same as one of its length
                    fn = lambda q, k, v, m, b=b: attention.blockwise_attention(q, k, v, m, b)
                    times[f"block {b}"] = time_ms(fn, q, k, v, g, mask, args.reps)
            best = min(times, key=times.get)
            chosen = attention.resolve(
                "auto", backend="cpu", dtype=jnp.float32, num_keys=length, num_queries=length, batch_heads=batch * heads
            )
            if chosen == "blockwise":
                chosen += f" {attention.block_size_for(length, batch * heads)}"
            cells = [f"{times[c]:.1f}" + ("*" if c == best else "") if c in times else "-" for c in header[2:-1]]
            print(f"| {name} | {length} | " + " | ".join(cells) + f" | {chosen} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
