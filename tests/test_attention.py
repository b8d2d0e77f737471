"""Attention implementations (rto_jax.models.attention): the blockwise online softmax against the plain
one in values and gradients (masks, grouped-query heads, cache offsets, block sizes that do not divide
the lengths), jax.nn's wrapper, the models and the sampler with each implementation, and `auto`'s
choices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.models import attention as A
from rto_jax.models.config import ModelConfig
from rto_jax.models.transformer import CausalLM
from rto_jax.sampling import SamplingConfig, sample


def _inputs(batch, length, num_keys, heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, kv_heads, num_keys, head_dim), dtype)
    v = jax.random.normal(kv, (batch, kv_heads, num_keys, head_dim), dtype)
    weights = jax.random.normal(kw, (batch, length, heads, head_dim), jnp.float32)  # a loss that reads every output
    return q, k, v, weights


def _sees_a_key(mask: A.Mask):
    """`[B, T]`: query rows that see at least one key (the others are padding; implementations differ there)."""
    return np.asarray(mask.dense()[:, 0].any(-1))


# (T, S, start, left padding per row, block size): self-attention with padding, a cache with unwritten
# slots (queries at slots start..start+T-1), decode (T = 1), and block sizes 1, 4, 5 (not dividing), 16.
CASES = [
    (12, 12, 0, [0, 3, 11], 4),
    (12, 12, 0, [0, 3, 11], 5),
    (13, 13, 0, [2, 0, 6], 1),
    (9, 20, 6, [0, 2, 5], 4),
    (1, 20, 14, [0, 4, 9], 5),
    (37, 37, 0, [0, 10, 30], 16),
]


def _mask(batch, length, num_keys, start, pads):
    key_mask = np.zeros((batch, num_keys), np.int32)
    for row, pad in enumerate(pads):
        key_mask[row, pad : start + length] = 1  # slots after the queries are not written yet
    return A.Mask(jnp.arange(length) + start, jnp.asarray(key_mask))


@pytest.mark.parametrize("length,num_keys,start,pads,block", CASES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_blockwise_equals_xla_in_values_and_gradients(length, num_keys, start, pads, block, heads, kv_heads):
    q, k, v, weights = _inputs(len(pads), length, num_keys, heads, kv_heads, 8)
    mask = _mask(len(pads), length, num_keys, start, pads)
    live = jnp.asarray(_sees_a_key(mask), jnp.float32)[:, :, None, None]

    def loss(impl):
        def f(q, k, v):
            out = impl(q, k, v)
            return jnp.sum(out * weights * live), out

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

    (_, expected), expected_grads = loss(lambda q, k, v: A.xla_attention(q, k, v, mask.dense()))(q, k, v)
    (_, got), grads = jax.jit(loss(lambda q, k, v: A.blockwise_attention(q, k, v, mask, block)))(q, k, v)
    seen = _sees_a_key(mask)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(expected)[seen], atol=2e-6, rtol=1e-5)
    assert np.all(np.asarray(got)[~seen] == 0)  # a padding query reads nothing
    for name, g, e in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=5e-6, rtol=1e-4, err_msg=f"d{name}")


def test_blockwise_in_bfloat16_is_as_close_as_xla_in_bfloat16():
    """bf16 inputs: both against the float32 answer, blockwise no worse than a small factor of xla's error."""
    q, k, v, _ = _inputs(2, 40, 40, 4, 2, 16)
    mask = _mask(2, 40, 40, 0, [0, 9])
    exact = np.asarray(A.xla_attention(q, k, v, mask.dense()))
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    xla_err = np.abs(np.asarray(A.xla_attention(*low, mask.dense()), np.float32) - exact)
    blockwise = A.blockwise_attention(*low, mask, 16)
    assert blockwise.dtype == jnp.bfloat16
    seen = _sees_a_key(mask)
    err = np.abs(np.asarray(blockwise, np.float32) - exact)[seen]
    assert err.max() < 0.05 and err.mean() <= 2 * xla_err[seen].mean() + 1e-3, (err.max(), xla_err.mean())


def test_jax_nn_wrapper_passes_layouts_and_mask():
    """The cuDNN path's wrapper (k/v swapped to jax.nn's `[B, S, K, D]`, the mask made dense), run with
    jax.nn's XLA implementation, which exists on every backend."""
    q, k, v, _ = _inputs(3, 9, 20, 6, 2, 8)
    mask = _mask(3, 9, 20, 6, [0, 2, 5])
    seen = _sees_a_key(mask)
    got = np.asarray(A.fused_attention(q, k, v, mask, "xla"))
    np.testing.assert_allclose(got[seen], np.asarray(A.xla_attention(q, k, v, mask.dense()))[seen], atol=2e-6)


def test_blockwise_keeps_no_queries_by_keys_array():
    """At T = S = 1024, 8 heads: the compiled forward+backward's temporaries stay far below one float32
    `[B, H, T, S]` score array (what xla's needs several of)."""
    batch, length, heads = 1, 1024, 8
    q, k, v, _ = _inputs(batch, length, length, heads, heads, 16)
    mask = A.Mask(jnp.arange(length), jnp.ones((batch, length), jnp.int32))
    scores_bytes = batch * heads * length * length * 4

    def temp_bytes(impl):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(impl(q, k, v) ** 2), argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(lambda q, k, v: A.xla_attention(q, k, v, mask.dense())) >= scores_bytes
    assert temp_bytes(lambda q, k, v: A.blockwise_attention(q, k, v, mask, 128)) < scores_bytes / 4


def test_auto_resolves_per_backend_dtype_and_size():
    def auto(backend, dtype, keys, queries, batch_heads=32):
        return A.resolve("auto", backend=backend, dtype=dtype, num_keys=keys, num_queries=queries, batch_heads=batch_heads)

    assert auto("gpu", jnp.bfloat16, 64, 64) == "cudnn"
    assert auto("gpu", jnp.float32, 4096, 64) == "xla"
    assert auto("gpu", jnp.bfloat16, 4096, 1) == "xla"  # decode
    # CPU: blockwise once xla's float32 scores [B, H, T, S] would exceed 8 MiB: batch 8 x 4 heads x 256^2 x 4 bytes
    # is exactly 8 MiB (xla), one more key slot is over it; batch 64 x 4 heads passes it at 91 tokens.
    assert A.CPU_SCORE_BYTES == 8 * 2**20
    assert auto("cpu", jnp.float32, 256, 256) == "xla"
    assert auto("cpu", jnp.float32, 257, 256) == "blockwise"
    assert auto("cpu", jnp.float32, 91, 91, batch_heads=256) == "blockwise"
    assert auto("cpu", jnp.float32, 90, 90, batch_heads=256) == "xla"
    assert auto("cpu", jnp.float32, 4096, 1) == "xla"  # decode
    assert auto("tpu", jnp.bfloat16, 4096, 64) == "xla"
    for pinned in ("xla", "blockwise", "cudnn", "splash"):
        assert A.resolve(pinned, backend="cpu", dtype=jnp.float32, num_keys=8, num_queries=8, batch_heads=1) == pinned
    # splash is self-attention only: a call against a KV cache (prefill, decode) takes what auto would
    assert A.resolve("splash", backend="tpu", dtype=jnp.bfloat16, num_keys=96, num_queries=64, batch_heads=8) == "xla"
    assert A.resolve("splash", backend="cpu", dtype=jnp.float32, num_keys=4096, num_queries=1, batch_heads=8) == "xla"
    assert A.resolve("splash", backend="cpu", dtype=jnp.float32, num_keys=512, num_queries=300, batch_heads=32) == (
        "blockwise"
    )


def test_splash_equals_xla_in_values_and_gradients_in_the_pallas_interpreter():
    """Pallas's TPU splash kernel, interpreted on CPU: GQA 4/2, left padding, a length (40) it pads to its
    128-slot blocks. Padding queries differ by design (splash: they see padding), so only tokens are compared."""
    pads = [0, 7]
    q, k, v, weights = _inputs(len(pads), 40, 40, 4, 2, 8, seed=3)
    mask = _mask(len(pads), 40, 40, 0, pads)
    live = jnp.asarray(_sees_a_key(mask), jnp.float32)[:, :, None, None]

    def loss(impl):
        return jax.value_and_grad(lambda q, k, v: (jnp.sum(impl(q, k, v) * weights * live), impl(q, k, v)),
                                  argnums=(0, 1, 2), has_aux=True)  # fmt: skip

    (_, expected), expected_grads = loss(lambda q, k, v: A.xla_attention(q, k, v, mask.dense()))(q, k, v)
    (_, got), grads = jax.jit(loss(lambda q, k, v: A.attention(q, k, v, mask, "splash")))(q, k, v)
    seen = _sees_a_key(mask)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(expected)[seen], atol=2e-6, rtol=1e-5)
    for name, g, e in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=5e-6, rtol=1e-4, err_msg=f"d{name}")
    # A second trace at the same shape reuses the cached kernel (its tables built outside any trace)
    again = jax.jit(lambda q, k, v: A.attention(q, k, v, mask, "splash"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_block_size_is_the_longest_whose_score_tile_fits_with_three_blocks():
    """The choices measured fastest (docs/performance.md#attention): tiny rows (batch 8 x 4 heads) 128 at 294-512
    tokens and 256 from 1024; SmolLM2-135M (8 x 9 heads) 64 at 256 and 128 above (256's tile is 18.9 MB);
    the synthetic study (64 x 4) 64 at every length, also 102 (two blocks: nothing shorter than 64)."""
    expected = {
        (294, 32): 128, (512, 32): 128, (1024, 32): 256, (2048, 32): 256,
        (256, 72): 64, (294, 72): 128, (512, 72): 128, (2048, 72): 128,
        (102, 256): 64, (294, 256): 64, (2048, 256): 64,
    }  # fmt: skip
    assert {key: A.block_size_for(*key) for key in expected} == expected


def _config(arch, attention, **changes):
    fields = dict(
        arch=arch, vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2 if arch == "llama" else 4, head_dim=8, max_position_embeddings=128, attention=attention,
    )  # fmt: skip
    if arch == "gpt_neox":
        fields.update(rotary_fraction=0.5, attention_bias=True)
    return ModelConfig(**{**fields, **changes})


def _left_padded(lengths, total, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n :] = rng.integers(2, 61, n)
        mask[row, total - n :] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("arch,scan_layers", [("llama", False), ("llama", True), ("gpt_neox", False)])
def test_models_give_the_same_logits_and_gradients_with_either_implementation(arch, scan_layers, monkeypatch):
    """blockwise everywhere; splash (in Pallas's interpreter: slow) in the GQA Llama with its layers as a list."""
    monkeypatch.setattr(A, "BLOCK_SIZE", 8)  # several blocks at this length
    ids, mask = _left_padded([30, 17, 4], 30)
    live = mask.astype(jnp.float32)[..., None]
    results = {}
    for impl in ("xla", "blockwise") + (("splash",) if (arch, scan_layers) == ("llama", False) else ()):
        model = CausalLM(_config(arch, impl, scan_layers=scan_layers), nnx.Rngs(3))  # same weights for all
        graph, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graph, params)(ids, attention_mask=mask)
            return jnp.sum(jax.nn.log_softmax(logits) * live * 0.01), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[impl] = (np.asarray(logits), jax.tree.leaves(grads))
    xla_logits, xla_grads = results.pop("xla")
    valid = np.asarray(mask, bool)
    for impl, (logits, grads) in results.items():
        np.testing.assert_allclose(logits[valid], xla_logits[valid], atol=2e-5, err_msg=impl)
        for g, e in zip(grads, xla_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=2e-5, rtol=1e-3, err_msg=impl)


def test_sampler_decodes_the_same_tokens_with_either_implementation(monkeypatch):
    """Prefill and every cached decode step (T = 1 against the cache) through blockwise attention."""
    monkeypatch.setattr(A, "BLOCK_SIZE", 4)
    prompt_ids, prompt_mask = _left_padded([9, 3, 6], 9, seed=1)
    config = SamplingConfig(max_new_tokens=12, eos_id=1, pad_id=0, greedy=True)
    outs = {
        impl: sample(CausalLM(_config("llama", impl), nnx.Rngs(5)), prompt_ids, prompt_mask, jax.random.key(0), config)
        for impl in ("xla", "blockwise")
    }
    np.testing.assert_array_equal(np.asarray(outs["blockwise"].tokens), np.asarray(outs["xla"].tokens))
    np.testing.assert_allclose(outs["blockwise"].logprobs, outs["xla"].logprobs, atol=1e-5)


def test_unknown_implementation_is_refused_by_the_model():
    # The config's check (config.model.attention) is one of test_configs' bad values.
    with pytest.raises(ValueError, match="ModelConfig.attention='flash'"):
        _config("llama", "flash")


def test_the_memory_planner_counts_no_scores_for_attention_without_them():
    """remat 'none': `xla` keeps 8 h T float32 bytes of scores and probs per token and layer, `blockwise`
    only the 4 h bytes of its log-sum-exp (rto_jax.tools.plan.activation_bytes_per_device)."""
    from rto_jax.tools import plan

    cfg = _config("llama", "xla")
    rows, length = 4, 64
    xla = plan.activation_bytes_per_device(cfg, rows, length, 8, (1, 1, 1))
    blockwise = plan.activation_bytes_per_device(cfg.replace(attention="blockwise"), rows, length, 8, (1, 1, 1))
    per_token = cfg.num_layers * (8 * cfg.num_heads * length - 4 * cfg.num_heads)
    assert xla - blockwise == rows * length * per_token
    for fused in ("cudnn", "splash"):
        assert plan.activation_bytes_per_device(cfg.replace(attention=fused), rows, length, 8, (1, 1, 1)) == blockwise


_SHARDED_SCRIPT = r"""
import json, os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rto_jax.models import attention as A

batch, length, heads, kv_heads, dim = 4, 40, 4, 2, 8
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (batch, length, heads, dim))
k = jax.random.normal(keys[1], (batch, kv_heads, length, dim))
v = jax.random.normal(keys[2], (batch, kv_heads, length, dim))
w = jax.random.normal(keys[3], (batch, length, heads, dim))
key_mask = jnp.ones((batch, length), jnp.int32).at[1, :9].set(0)
mask = A.Mask(jnp.arange(length), key_mask)

def loss(q, k, v):
    return jnp.sum(A.blockwise_attention(q, k, v, mask, 16) * w * key_mask[:, :, None, None])

grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
expected = jax.device_get(grad(q, k, v))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
got = grad(put(q, P(("data", "fsdp"), None, "tensor")), put(k, P(("data", "fsdp"), "tensor")),
           put(v, P(("data", "fsdp"), "tensor")))
errors = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))]
print("RESULT " + json.dumps({"devices": len(jax.devices()), "errors": errors}))
"""


def test_blockwise_attention_sharded_over_batch_and_heads_equals_one_device():
    """8 simulated devices (a subprocess: the device count is fixed when JAX starts), batch split over
    data x fsdp and kv heads over tensor: the loss and its gradients equal the unsharded ones."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["devices"] == 8
    assert max(result["errors"]) < 1e-4, result
