"""Attention implementations behind one switch, `ModelConfig.attention`.

Every implementation takes q `[B, T, H, D]`, k and v `[B, K, S, D]` (kv-head major: the KV cache's
layout; H % K == 0, grouped-query attention when K < H) and a `Mask`, and returns `[B, T, H, D]`:

  xla        the scores `[B, K, G, T, S]` in float32, masked, softmax, weighted sum (G = H / K). Plain
             XLA, every backend; its memory grows with T x S per head.
  blockwise  FlashAttention's recurrence (Dao et al. 2022; Dao 2023) in jax.numpy: query blocks x key
             blocks with an online softmax, and a custom VJP that recomputes each block's scores from
             the saved log-sum-exp. No T x S array exists in the forward or the backward, and key
             blocks wholly in the future of a query block are never visited (at T = S about half the
             blocks of a causal mask). Exact up to float32 rounding. Every backend.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused kernel (NVIDIA GPUs,
             bfloat16 or float16 inputs).
  splash     Pallas's splash attention (jax.experimental.pallas.ops.tpu), the TPU kernel MaxText
             trains with: for self-attention over the whole sequence (T = S: training and
             scoring); a call with a KV cache (prefill into longer cache, decode) takes what `auto`
             would. Off TPU it runs in Pallas's interpreter (slow: for tests). Not in shard_map: on
             a mesh XLA gathers its inputs (docs/scaling.md).
  auto       chosen per backend, dtype and shape by `resolve` (the choices and their measurements:
             docs/performance.md#attention).

A query row that sees no key (a left-padding position) is padding: `xla` gives it the mean of v
(a uniform softmax), `blockwise` gives it 0, `splash` what the padding at or before it holds (it sees
padding only, right padding included). No loss, score or cache entry reads it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
# The implementations that keep no T x S scores (a float32 log-sum-exp per query and head instead).
WITHOUT_SCORES = ("blockwise", "cudnn", "splash")
# On CPU (docs/performance.md#attention, measured with `python -m benchmarks.attention_blocks`): `auto` is
# blockwise once xla's float32 scores `[B, H, T, S]` would exceed this many bytes, and blockwise's block is the
# longest whose float32 score tile `[B, H, block, block]` stays within it.
CPU_SCORE_BYTES = 8 * 2**20
BLOCK_SIZE = 256  # the longest query and key block of `blockwise` (blocks are then fitted to the length)
MIN_BLOCK_SIZE = 64  # shorter blocks were never the fastest measured


class Mask(NamedTuple):
    """Key slot s is visible from query t iff s <= query_slots[t] and key_mask[b, s].

    query_slots `[T]` int: each query token's slot in the key sequence (its position in the cache);
    key_mask `[B, S]`: the key slots that hold tokens (0: padding or an unwritten cache slot)."""

    query_slots: jax.Array
    key_mask: jax.Array

    def dense(self) -> jax.Array:
        """Boolean `[B, 1, T, S]`."""
        return _visible(self.query_slots, jnp.arange(self.key_mask.shape[1]), self.key_mask)


def _visible(query_slots, key_slots, key_mask):
    """Boolean `[B, 1, T, S']`: key slot `key_slots[s]` is visible from query t (the rule of `Mask`), for
    query_slots `[T]`, key_slots `[S']` and their key_mask `[B, S']`."""
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S']
    return causal[None, None] & (key_mask[:, None, None, :] > 0)


def resolve(implementation: str, *, backend: str, dtype, num_keys: int, num_queries: int, batch_heads: int) -> str:
    """The implementation `auto` stands for on `backend` with inputs of `dtype`, these lengths and batch x query
    heads `batch_heads` (global shapes)."""
    if implementation == "splash" and num_queries != num_keys:  # a cache: splash's masks are static
        implementation = "auto"
    if implementation != "auto":
        return implementation
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and num_queries > 1:
        return "cudnn"
    if backend == "cpu" and num_queries > 1 and 4 * batch_heads * num_queries * num_keys > CPU_SCORE_BYTES:
        return "blockwise"
    return "xla"


def block_size_for(num_keys: int, batch_heads: int) -> int:
    """The longest query/key block `blockwise` uses over `num_keys` key slots with batch x heads `batch_heads`
    (blocks are then fitted to the length): halved from BLOCK_SIZE down to MIN_BLOCK_SIZE until its float32
    score tile fits CPU_SCORE_BYTES and the keys span at least 3 blocks. On 2 CPU cores that was within 6% of
    the fastest of 32/64/128/256 at every measured shape (docs/performance.md#attention). BLOCK_SIZE is read at
    call time, so a test can shorten it."""
    block = BLOCK_SIZE
    while block > MIN_BLOCK_SIZE and (4 * batch_heads * block * block > CPU_SCORE_BYTES or -(-num_keys // block) < 3):
        block //= 2
    return block


def attention(q, k, v, mask: Mask, implementation: str = "xla"):
    """Grouped-query attention with `implementation` (see the module docstring): `[B, T, H, D]`."""
    batch_heads = q.shape[0] * q.shape[2]
    implementation = resolve(
        implementation,
        backend=jax.default_backend(),
        dtype=q.dtype,
        num_keys=k.shape[2],
        num_queries=q.shape[1],
        batch_heads=batch_heads,
    )
    if implementation == "xla":
        return xla_attention(q, k, v, mask.dense())
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, mask, block_size_for(k.shape[2], batch_heads))
    if implementation == "cudnn":
        return fused_attention(q, k, v, mask, "cudnn")
    if implementation == "splash":
        return splash_attention(q, k, v, mask)
    raise ValueError(f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")


# ----------------------------------------------------------------------------------------------
# xla


def xla_attention(q, k, v, mask):
    """q `[B, T, H, D]`, k/v `[B, K, S, D]`, boolean mask `[B, 1, T, S]` -> `[B, T, H, D]`.

    Softmax in float32; fully masked rows stay finite. Both matmuls have their batch dims (B, K)
    leading, so XLA feeds the cache to them as it is; with `[B, S, K, D]` it copied the whole cache into
    this order at every decode step (17% of a batch-32 decode; docs/results/benchmarks.md#decode).
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Output in the matmul's natural order, then moved: asking einsum for `btkgd` directly made XLA:CPU
    # pick a slow matmul (4.9x the decode attention's time at batch 32).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


# ----------------------------------------------------------------------------------------------
# cudnn (and any other implementation of jax.nn.dot_product_attention)


def fused_attention(q, k, v, mask: Mask, implementation: str | None):
    """`jax.nn.dot_product_attention` with `implementation` ("cudnn"; "xla"/None elsewhere, which the
    tests use on CPU to check this wrapper's layouts and mask): `[B, T, H, D]`."""
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, S, K, D], jax.nn's layout
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation=implementation)


# ----------------------------------------------------------------------------------------------
# splash (Pallas, TPU)

SPLASH_BLOCK = 128  # splash's query and key blocks must be multiples of 128 (a TPU vector's lanes)


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, groups: int, interpret: bool):
    """Splash's multi-query kernel for `groups` query heads sharing one kv head, causal over `length`
    slots (a multiple of SPLASH_BLOCK); built once per shape (its block-sparsity tables are static)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    causal = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(groups)])
    with jax.ensure_compile_time_eval():  # concrete tables even when first built inside a traced step (cached)
        return kernel.make_splash_mqa_single_device(
            causal, block_sizes=kernel.BlockSizes.get_default(), interpret=interpret
        )


def splash_attention(q, k, v, mask: Mask):
    """Splash attention of queries at slots 0..T-1 over the same T slots (q `[B, T, H, D]`, k/v `[B, K, T, D]`):
    `[B, T, H, D]`.

    Causality is splash's static mask; padding is its segment ids: a slot's segment is its key_mask
    (1 a token, 0 padding), so a token sees the tokens at or before it, and a padding query sees padding
    (it reads no token; no loss reads it). The length is padded to a multiple of SPLASH_BLOCK with padding
    slots. One multi-query kernel call per (row, kv head): the group's G query heads share its keys.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if k.shape[2] != length:
        raise ValueError(f"splash attention needs as many key slots as queries: {k.shape[2]} vs {length}")
    groups = heads // kv_heads
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    extra = padded - length
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    kernel = _splash_kernel(padded, groups, jax.default_backend() != "tpu")
    q = (q / math.sqrt(head_dim)).reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))  # [B, K, G, T', D]
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in (k, v))  # [B, K, T', D]
    segments = jnp.pad(mask.key_mask.astype(jnp.int32) > 0, ((0, 0), (0, extra))).astype(jnp.int32)  # [B, T']
    per_head = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=SegmentIds(seg, seg)), (0, 0, 0, None))
    out = jax.vmap(per_head)(q, k, v, segments)  # [B, K, G, T', D]
    return out[:, :, :, :length].transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(v.dtype)


# ----------------------------------------------------------------------------------------------
# blockwise


def blockwise_attention(q, k, v, mask: Mask, block_size: int = BLOCK_SIZE):
    """FlashAttention's blockwise online softmax, exact, with a recomputing backward: `[B, T, H, D]`."""
    batch, length, heads, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    block_q, block_k = _fitted_block(length, block_size), _fitted_block(num_keys, block_size)
    # [B, K, G, T, D]: the query heads of each kv head together, as k and v are laid out.
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    pad_q, pad_k = -length % block_q, -num_keys % block_k
    qg = jnp.pad(qg, ((0, 0),) * 3 + ((0, pad_q), (0, 0)))
    slots = jnp.pad(mask.query_slots.astype(jnp.int32), (0, pad_q), constant_values=-1)  # padding sees nothing
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad_k), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad_k), (0, 0)))
    key_mask = jnp.pad(mask.key_mask > 0, ((0, 0), (0, pad_k)))
    out = _flash(qg, k, v, slots, key_mask, block_q, block_k)[:, :, :, :length]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


_NEG = float(jnp.finfo(jnp.float32).min)


def _fitted_block(n: int, block_size: int) -> int:
    """The block length that covers n in as few blocks of at most block_size as possible with the least
    padding: 294 tokens are 3 blocks of 98, not 3 of 128 (30% padding, 1.7x the time measured)."""
    blocks = -(-n // block_size)
    return -(-n // blocks)


def _block(x, index, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _scores(qi, kj, slots_i, key_mask_j, j, block_k):
    """Block (i, j)'s scaled scores `[B, K, G, bq, bk]` (float32) and visibility (broadcastable)."""
    s = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=jnp.float32) / math.sqrt(qi.shape[-1])
    visible = _visible(slots_i, j * block_k + jnp.arange(block_k), key_mask_j)[:, :, None]  # [B, 1, 1, bq, bk]
    return s, visible


def _latest_slot(slots, block_q):
    """Per query block, the latest key slot any of its queries may see: `[nq]` (-1: a block of padding)."""
    return jnp.max(slots.reshape(-1, block_q), axis=1)


def _last_block_seen(slots, block_q, block_k, num_key_blocks):
    """Per query block, one past the last key block any of its queries sees: `[nq]` int32."""
    return jnp.clip(_latest_slot(slots, block_q) // block_k + 1, 0, num_key_blocks)


def _forward(qg, k, v, slots, key_mask, block_q, block_k):
    """Output `[B, K, G, Tp, D]` (q's dtype) and the rows' log-sum-exp `[B, K, G, Tp]` (float32)."""
    num_q_blocks, num_k_blocks = qg.shape[3] // block_q, k.shape[2] // block_k
    stop = _last_block_seen(slots, block_q, block_k, num_k_blocks)

    def query_block(i):
        qi, slots_i = _block(qg, i, block_q, 3), _block(slots, i, block_q, 0)
        b, kh, g, _, d = qi.shape

        def key_block(j, carry):
            acc, row_max, row_sum = carry
            kj, vj, key_mask_j = _block(k, j, block_k, 2), _block(v, j, block_k, 2), _block(key_mask, j, block_k, 1)
            s, visible = _scores(qi, kj, slots_i, key_mask_j, j, block_k)
            new_max = jnp.maximum(row_max, jnp.max(jnp.where(visible, s, _NEG), axis=-1))
            p = jnp.where(visible, jnp.exp(s - new_max[..., None]), 0.0)
            rescale = jnp.exp(row_max - new_max)
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            return acc * rescale[..., None] + pv, new_max, row_sum * rescale + jnp.sum(p, axis=-1)

        init = (
            jnp.zeros((b, kh, g, block_q, d), jnp.float32),
            jnp.full((b, kh, g, block_q), _NEG, jnp.float32),
            jnp.zeros((b, kh, g, block_q), jnp.float32),
        )
        acc, row_max, row_sum = jax.lax.fori_loop(0, stop[i], key_block, init)
        seen = row_sum > 0
        out = acc / jnp.where(seen, row_sum, 1.0)[..., None]
        lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), 0.0)
        return out.astype(qg.dtype), lse

    out, lse = jax.lax.map(query_block, jnp.arange(num_q_blocks))  # [nq, B, K, G, bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(qg.shape)
    lse = jnp.moveaxis(lse, 0, 3).reshape(qg.shape[:-1])
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qg, k, v, slots, key_mask, block_q, block_k):
    return _forward(qg, k, v, slots, key_mask, block_q, block_k)[0]


def _flash_fwd(qg, k, v, slots, key_mask, block_q, block_k):
    out, lse = _forward(qg, k, v, slots, key_mask, block_q, block_k)
    return out, (qg, k, v, slots, key_mask, out, lse)


def _flash_bwd(block_q, block_k, residuals, d_out):
    """FlashAttention-2's backward: per key block j, over the query blocks that see it, recompute
    p = exp(s - lse); dv_j += p^T do; ds = p (do v_j^T - rowsum(do o)); dk_j += ds^T q; dq_i += ds k_j."""
    qg, k, v, slots, key_mask, out, lse = residuals
    scale = 1.0 / math.sqrt(qg.shape[-1])
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B, K, G, Tp]
    num_q_blocks, num_k_blocks = qg.shape[3] // block_q, k.shape[2] // block_k
    # The first query block that sees key block j: query blocks before it see none of its keys. (The
    # running max keeps this right for any order of query slots; ours ascend.)
    latest = jax.lax.cummax(_latest_slot(slots, block_q))  # [nq]
    start = jnp.sum(latest[None, :] < (jnp.arange(num_k_blocks) * block_k)[:, None], axis=1)  # [nk]

    def key_block(dq, j):
        kj, vj, key_mask_j = _block(k, j, block_k, 2), _block(v, j, block_k, 2), _block(key_mask, j, block_k, 1)

        def query_block(i, carry):
            dq, dk_j, dv_j = carry
            qi, slots_i = _block(qg, i, block_q, 3), _block(slots, i, block_q, 0)
            doi, lse_i, delta_i = _block(d_out, i, block_q, 3), _block(lse, i, block_q, 3), _block(delta, i, block_q, 3)
            s, visible = _scores(qi, kj, slots_i, key_mask_j, j, block_k)
            p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)  # [B, K, G, bq, bk]
            dv_j = dv_j + jnp.einsum("bkgts,bkgtd->bksd", p, doi)
            dp = jnp.einsum("bkgtd,bksd->bkgts", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dk_j = dk_j + jnp.einsum("bkgts,bkgtd->bksd", ds, qi, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgts,bksd->bkgtd", ds, kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, block_q, 3) + dq_i, i * block_q, axis=3)
            return dq, dk_j, dv_j

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(start[j], num_q_blocks, query_block, (dq, zeros, zeros))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qg.shape, jnp.float32), jnp.arange(num_k_blocks))
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)  # [nk, B, K, bk, D] -> [B, K, S, D]
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    return dq.astype(qg.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
