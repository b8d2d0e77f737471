"""Building blocks shared by the decoders: dense layers, norms, RoPE and the KV cache's layout (attention
itself: rto_jax.models.attention).

Every parameter carries `axes`, its logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`vocab`, `layers`), which `rto_jax.train.sharding` maps onto a device mesh. Parameters are float32;
`dtype` is the compute dtype of the matmuls.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from rto_jax.models import lora as lora_lib
from rto_jax.models.config import ModelConfig


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


# Set by a sharded step while it is traced (rto_jax.train.sharding): `fn(x, logical_names) -> x` pins an
# activation's sharding so XLA gathers weights instead of resharding activations. Unset: a no-op.
_ACTIVATION_CONSTRAINT: contextvars.ContextVar = contextvars.ContextVar("activation_constraint", default=None)


@contextlib.contextmanager
def activation_constraint(fn):
    token = _ACTIVATION_CONSTRAINT.set(fn)
    try:
        yield
    finally:
        _ACTIVATION_CONSTRAINT.reset(token)


def constrain(x, names: tuple):
    """`x` with its sharding pinned to the logical `names` (its last dims) when a sharded step is traced."""
    fn = _ACTIVATION_CONSTRAINT.get()
    return x if fn is None else fn(x, names)


def _constrain_hidden(x):
    # Norm outputs feed the matmuls: pinning them batch-split makes XLA all-gather the fsdp-split weights.
    return constrain(x, ("batch", "length", "embed")) if x.ndim == 3 else x


def matmul(x, w):
    """`x @ w` for x `[..., in]`, w `[in, out]`, as one 2-D matmul over the flattened leading dims.

    Same numbers as `jnp.dot`, but its gradient is a plain `[in, N] @ [N, out]`: with 3-D `x`, the
    weight gradient contracts two dims, and XLA:CPU then lays the activation gradient out with a
    transpose fused into the elementwise ops before it, which measured 35 ms per MLP matrix of the
    135M step (18% of the step; docs/results/benchmarks.md#profile-of-the-training-step).
    """
    if x.ndim <= 2:
        return jnp.dot(x, w)
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) (+ a low-rank adapter's update); kernel `[in, out]` with logical axes `axes`.

    With `lora`, adapter weights `lora_a` `[in, r]` and `lora_b` `[r, out]` (rto_jax.models.lora); `lora_site`
    tells this projection's dropout masks from its block's others.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str, str],
        *,
        use_bias: bool,
        dtype,
        rngs: nnx.Rngs,
        std: float = 0.02,
        lora: lora_lib.LoraConfig | None = None,
        lora_site: int = 0,
    ):
        self.kernel = nnx.Param(
            std * jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32), axes=axes
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32), axes=(axes[1],)) if use_bias else None
        self.dtype = dtype
        self.axes = tuple(axes)
        self.lora_a = (
            None
            if lora is None
            else nnx.LoRAParam(lora_lib.init_a(rngs.params(), (in_features, lora.rank)), axes=(axes[0], "lora_rank"))
        )
        self.lora_b = (
            None
            if lora is None
            else nnx.LoRAParam(jnp.zeros((lora.rank, out_features), jnp.float32), axes=("lora_rank", axes[1]))
        )
        self.lora_scale = lora.scale if lora is not None else 0.0
        self.lora_dropout = lora.dropout if lora is not None else 0.0
        self.lora_site = lora_site

    def __call__(self, x):
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None and lora_lib.enabled():
            # float32 whatever the compute dtype: the adapter is small, its update precise.
            h = lora_lib.dropout(x.astype(jnp.float32), self.lora_dropout, self.lora_site)
            y = y + (matmul(matmul(h, self.lora_a[...]), self.lora_b[...]) * self.lora_scale).astype(y.dtype)
        return constrain(y, ("batch", "length", self.axes[1])) if y.ndim == 3 else y


class Embed(nnx.Module):
    """Token embedding `[vocab, embed]`; `attend` gives the tied output projection."""

    def __init__(self, vocab_size: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (vocab_size, features), jnp.float32), axes=("vocab", "embed")
        )
        self.dtype = dtype

    def __call__(self, ids):
        x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed")) if x.ndim == 3 else x

    def attend(self, x):
        y = matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
        return constrain(y, ("batch", "length", "vocab")) if y.ndim == 3 else y


class RMSNorm(nnx.Module):
    def __init__(self, features: int, eps: float, *, dtype):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), axes=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        # The statistics are float32 whatever the compute dtype, as in HF's LlamaRMSNorm.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _constrain_hidden((self.scale[...] * x32).astype(self.dtype))


class LayerNorm(nnx.Module):
    def __init__(self, features: int, eps: float, *, dtype):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32), axes=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return _constrain_hidden((y * self.scale[...] + self.bias[...]).astype(self.dtype))


def rope_inverse_frequencies(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies `[rotary_dim // 2]`, with the config's scaling applied."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        wavelen = 2 * jnp.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = jnp.where(in_band, blended, scaled)
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """Rotates the first `2 * len(inv_freq)` features of `x` `[B, T, H, D]` (HF's rotate-half layout)."""
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, rot/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    half1, half2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = x_rot * cos + jnp.concatenate([-half2, half1], axis=-1) * sin
    return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)


def kv_head_major(x):
    """`[B, T, K, D]` (a projection's output) -> `[B, K, T, D]` (the layout of the cache and attention)."""
    return jnp.swapaxes(x, 1, 2)


def update_cache(cache_kv, new, index):
    """Writes `new` `[B, K, T, D]` into `cache_kv` `[B, K, S, D]` at slot `index`."""
    return jax.lax.dynamic_update_slice(cache_kv, new.astype(cache_kv.dtype), (0, 0, index, 0))
