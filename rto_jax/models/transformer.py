"""Decoder-only transformers (Llama family, GPT-NeoX) with a KV cache, and their two heads.

`CausalLM(ids, attention_mask=..., positions=...)` -> float32 logits `[B, T, V]`.
`ScalarHeadModel(ids, attention_mask=..., positions=...)` -> float32 scalars `[B, T]` (reward/value).
The models know nothing of RL: callers pick which positions to read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rto_jax.models import lora as lora_lib
from rto_jax.models import attention as attention_lib
from rto_jax.models.config import ModelConfig
from rto_jax.models.layers import (
    Dense,
    Embed,
    LayerNorm,
    RMSNorm,
    apply_rope,
    compute_dtype,
    kv_head_major,
    matmul,
    rope_inverse_frequencies,
    update_cache,
)


def default_positions(attention_mask):
    """Positions of left-padded rows: `max(cumsum(mask) - 1, 0)` `[B, T]`."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _projection(cfg: ModelConfig, name: str, *args, **kwargs) -> Dense:
    """The block's projection `name`, with an adapter when `cfg.lora` targets it."""
    targeted = cfg.lora is not None and name in cfg.lora.target_names(cfg.arch)
    site = lora_lib.PROJECTIONS[cfg.arch].index(name)
    return Dense(*args, dtype=compute_dtype(cfg), lora=cfg.lora if targeted else None, lora_site=site, **kwargs)


class LlamaBlock(nnx.Module):
    """Pre-norm block: RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, hd, dt = cfg.hidden_size, cfg.head_dim, compute_dtype(cfg)
        heads, kv_heads, mlp = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
        self.input_layernorm = RMSNorm(d, cfg.norm_eps, dtype=dt)
        self.q_proj = _projection(cfg, "q_proj", d, heads, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs)
        self.k_proj = _projection(
            cfg, "k_proj", d, kv_heads, ("embed", "kv_heads"), use_bias=cfg.attention_bias, rngs=rngs
        )
        self.v_proj = _projection(
            cfg, "v_proj", d, kv_heads, ("embed", "kv_heads"), use_bias=cfg.attention_bias, rngs=rngs
        )
        self.o_proj = _projection(
            cfg, "o_proj", heads, d, ("heads", "embed"), use_bias=cfg.attention_out_bias, rngs=rngs
        )
        self.post_attention_layernorm = RMSNorm(d, cfg.norm_eps, dtype=dt)
        self.gate_proj = _projection(cfg, "gate_proj", d, mlp, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.up_proj = _projection(cfg, "up_proj", d, mlp, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.down_proj = _projection(cfg, "down_proj", mlp, d, ("mlp", "embed"), use_bias=False, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attention = cfg.attention

    def __call__(self, x, positions, mask, inv_freq, kv=None, cache_index=None):
        batch, length, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(h).reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).reshape(batch, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v, kv = _with_cache(k, v, kv, cache_index)
        attn = attention_lib.attention(q, k, v, mask, self.attention).reshape(batch, length, -1)
        x = x + self.o_proj(attn)
        h = self.post_attention_layernorm(x)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, kv


class GPTNeoXBlock(nnx.Module):
    """Pythia block: LayerNorms, fused QKV with biases, partial rotary, GELU MLP, parallel residual."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, dt = cfg.hidden_size, compute_dtype(cfg)
        self.input_layernorm = LayerNorm(d, cfg.norm_eps, dtype=dt)
        self.post_attention_layernorm = LayerNorm(d, cfg.norm_eps, dtype=dt)
        # Output features are laid out per head as [q | k | v], as in HF's query_key_value.
        mlp = cfg.intermediate_size
        self.query_key_value = _projection(
            cfg, "query_key_value", d, 3 * d, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs
        )
        self.dense = _projection(cfg, "dense", d, d, ("heads", "embed"), use_bias=cfg.attention_bias, rngs=rngs)
        self.dense_h_to_4h = _projection(cfg, "dense_h_to_4h", d, mlp, ("embed", "mlp"), use_bias=True, rngs=rngs)
        self.dense_4h_to_h = _projection(cfg, "dense_4h_to_h", mlp, d, ("mlp", "embed"), use_bias=True, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.parallel_residual = cfg.use_parallel_residual
        self.attention = cfg.attention

    def __call__(self, x, positions, mask, inv_freq, kv=None, cache_index=None):
        batch, length, _ = x.shape
        qkv = self.query_key_value(self.input_layernorm(x)).reshape(batch, length, self.num_heads, 3, self.head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v, kv = _with_cache(k, v, kv, cache_index)
        attn = self.dense(attention_lib.attention(q, k, v, mask, self.attention).reshape(batch, length, -1))
        mlp = lambda h: self.dense_4h_to_h(jax.nn.gelu(self.dense_h_to_4h(h), approximate=False))
        if self.parallel_residual:
            return x + attn + mlp(self.post_attention_layernorm(x)), kv
        x = x + attn
        return x + mlp(self.post_attention_layernorm(x)), kv


def _with_cache(k, v, kv, cache_index):
    """k, v `[B, T, K, D]` -> `[B, K, S, D]`: the new keys and values alone, or the cache with them written."""
    k, v = kv_head_major(k), kv_head_major(v)
    if kv is None:
        return k, v, None
    kv = {"k": update_cache(kv["k"], k, cache_index), "v": update_cache(kv["v"], v, cache_index)}
    return kv["k"], kv["v"], kv


BLOCKS = {"llama": LlamaBlock, "gpt_neox": GPTNeoXBlock}
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _stack_blocks(blocks: list[nnx.Module]) -> nnx.Module:
    """One block whose every parameter has a leading `layers` axis."""
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(b)[1] for b in blocks[1:]]
    stacked = jax.tree.map(
        lambda *vs: vs[0].replace(jnp.stack([v[...] for v in vs]), axes=("layers",) + tuple(vs[0].axes)),
        *states,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, stacked)


class Decoder(nnx.Module):
    """Embeddings, the blocks (a list, or one stacked block scanned over) and the final norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        dt = compute_dtype(cfg)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, rngs=rngs)
        blocks = [BLOCKS[cfg.arch](cfg, rngs) for _ in range(cfg.num_layers)]
        self.layers = _stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        norm = RMSNorm if cfg.arch == "llama" else LayerNorm
        self.final_norm = norm(cfg.hidden_size, cfg.norm_eps, dtype=dt)

    def init_cache(self, batch: int, length: int, dtype=jnp.float32):
        """Zeroed KV cache for `length` slots: per layer `{'k','v'}` of `[B, K, S, D]` (stacked if scanned)."""
        cfg = self.config
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        if cfg.scan_layers:
            shape = (cfg.num_layers,) + shape
            return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers))

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None):
        """Final hidden states `[B, T, d]` and the updated cache.

        Without a cache, attention_mask is `[B, T]`. With one, it is `[B, S]` over all cache slots and
        the T new tokens are written at slots `cache_index .. cache_index + T - 1`.
        """
        cfg = self.config
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        start = 0 if cache is None else cache_index
        mask = attention_lib.Mask(jnp.arange(length) + start, attention_mask)
        inv_freq = rope_inverse_frequencies(cfg)
        x = self.embed(input_ids)

        def run_block(block_graph, block_state, x, kv, layer):
            block = nnx.merge(block_graph, block_state)
            with lora_lib.layer_scope(layer):  # each layer draws its own adapter-dropout masks
                return block(x, positions, mask, inv_freq, kv, cache_index)

        if cfg.remat != "none":
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,))

        if cfg.scan_layers:
            graph, stacked = nnx.split(self.layers)

            def body(x, layer):
                state, kv, index = layer
                x, kv = run_block(graph, state, x, kv, index)
                return x, kv

            x, cache = jax.lax.scan(body, x, (stacked, cache, jnp.arange(cfg.num_layers)))
        else:
            new_cache = []
            for i, block in enumerate(self.layers):
                graph, state = nnx.split(block)
                x, kv = run_block(graph, state, x, None if cache is None else cache[i], i)
                new_cache.append(kv)
            cache = None if cache is None else tuple(new_cache)
        return self.final_norm(x), cache


class CausalLM(nnx.Module):
    """Decoder plus the language-model head (tied to the embedding or its own `[embed, vocab]` matrix)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.decoder = Decoder(cfg, rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Dense(
                cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=compute_dtype(cfg), rngs=rngs
            )
        )

    def logits_from_hidden(self, hidden):
        out = self.decoder.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def logits_for_vocab_slice(self, hidden, start, size: int):
        """Float32 logits `[..., size]` of vocabulary ids `start .. start + size - 1` (start may be traced,
        size static, start + size <= V): one slice of `logits_from_hidden`, for heads computed in chunks."""
        dtype = compute_dtype(self.config)
        if self.lm_head is None:
            rows = jax.lax.dynamic_slice_in_dim(self.decoder.embed.embedding[...], start, size, axis=0)
            out = matmul(hidden.astype(dtype), rows.astype(dtype).T)
        else:
            columns = jax.lax.dynamic_slice_in_dim(self.lm_head.kernel[...], start, size, axis=1)
            out = matmul(hidden.astype(dtype), columns.astype(dtype))
        return out.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """Float32 logits `[B, T, V]`."""
        hidden, _ = self.decoder(input_ids, attention_mask, positions)
        return self.logits_from_hidden(hidden)

    def init_cache(self, batch: int, length: int, dtype=jnp.float32):
        return self.decoder.init_cache(batch, length, dtype)

    def forward_cached(self, input_ids, attention_mask, positions, cache, cache_index):
        """One prefill or decode call: logits `[B, T, V]` and the cache with the T new tokens written."""
        hidden, cache = self.decoder(input_ids, attention_mask, positions, cache, cache_index)
        return self.logits_from_hidden(hidden), cache


class ScalarHeadModel(nnx.Module):
    """Decoder plus a linear scalar head (reward model, critic): float32 `[B, T]`, one value per token.

    The head has no bias so that export matches HF's `*ForSequenceClassification` (`score.weight`);
    its init is normal with std 1/sqrt(d+1) (the N+ implementation details of RLHF).
    `with_affine_output` gives a copy whose head has a bias (exported as `score.bias`, which
    transformers' classifiers do not have and ignore; our loader reads it).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, decoder: Decoder | None = None, head_bias: bool = False):
        self.config = cfg
        self.decoder = decoder if decoder is not None else Decoder(cfg, rngs)
        self.head = Dense(
            cfg.hidden_size,
            1,
            ("embed", "score"),
            use_bias=head_bias,
            dtype=jnp.float32,
            rngs=rngs,
            std=1.0 / (cfg.hidden_size + 1) ** 0.5,
        )

    def __call__(self, input_ids, attention_mask=None, positions=None):
        hidden, _ = self.decoder(input_ids, attention_mask, positions)
        return self.head(hidden.astype(jnp.float32))[..., 0]

    def with_affine_output(self, scale, shift) -> "ScalarHeadModel":
        """A copy whose outputs are exactly `scale * self(x) + shift`, folded into the head (kernel
        times `scale`, a bias `scale * bias + shift`): e.g. a reward model's head rescaled to emit
        normalized scores `(r - mean) / std` with scale=1/std, shift=-mean/std."""
        graph, state = nnx.split(self.decoder)
        out = ScalarHeadModel(
            self.config, nnx.Rngs(0), decoder=nnx.merge(graph, jax.tree.map(jnp.copy, state)), head_bias=True
        )
        scale, shift = jnp.float32(scale), jnp.float32(shift)
        out.head.kernel[...] = self.head.kernel[...] * scale
        bias = self.head.bias[...] if self.head.bias is not None else jnp.zeros_like(out.head.bias[...])
        out.head.bias[...] = bias * scale + shift
        return out

    @classmethod
    def from_causal_lm(cls, lm: CausalLM, rngs: nnx.Rngs) -> "ScalarHeadModel":
        """A scalar-head model on a copy of `lm`'s decoder (reward model from SFT, critic from reward model)."""
        graph, state = nnx.split(lm.decoder)
        return cls(lm.config, rngs, decoder=nnx.merge(graph, jax.tree.map(jnp.copy, state)))


def _abstract_like(model: CausalLM | ScalarHeadModel, cfg: ModelConfig):
    """An abstract (shape-only) model of `model`'s class under `cfg`: nothing is initialized."""
    if isinstance(model, ScalarHeadModel):
        has_bias = model.head.bias is not None
        return nnx.eval_shape(lambda: ScalarHeadModel(cfg, nnx.Rngs(0), head_bias=has_bias))
    return nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0)))


def with_adapters(model: CausalLM | ScalarHeadModel, lora: lora_lib.LoraConfig, rngs: nnx.Rngs):
    """`model` with fresh adapters on the projections `lora` targets: the base arrays are the same ones
    (not copied), `lora_b` is zero (the outputs are unchanged), `lora_a` is drawn from `rngs`."""
    if model.config.lora is not None:
        raise ValueError("the model already has adapters; merge them first (merge_adapters)")
    graphdef, abstract = nnx.split(_abstract_like(model, model.config.replace(lora=lora)))
    base = dict(nnx.to_flat_state(nnx.state(model)))
    filled = {}
    for key, var in nnx.to_flat_state(abstract):
        if key in base:
            filled[key] = var.replace(base[key][...])  # the same (immutable) array in a variable of its own
        elif key[-1] == "lora_a":
            filled[key] = var.replace(lora_lib.init_a(rngs.params(), var.shape))
        elif key[-1] == "lora_b":
            filled[key] = var.replace(jnp.zeros(var.shape, jnp.float32))
        else:
            raise KeyError(f"{'.'.join(map(str, key))}: neither in the base model nor an adapter")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def merge_adapters(model: CausalLM | ScalarHeadModel):
    """A copy of `model` without adapters whose kernels are `W + (alpha / r) * A @ B` (float32): the same
    function as the adapter model (up to float rounding), in the plain architecture HF loads."""
    lora = model.config.lora
    if lora is None:
        return model
    graphdef, abstract = nnx.split(_abstract_like(model, model.config.replace(lora=None)))
    current = dict(nnx.to_flat_state(nnx.state(model)))
    filled = {}
    for key, var in nnx.to_flat_state(abstract):
        value = current[key][...]
        a_key, b_key = key[:-1] + ("lora_a",), key[:-1] + ("lora_b",)
        if key[-1] == "kernel" and a_key in current:
            value = value + lora.scale * jnp.matmul(current[a_key][...], current[b_key][...])  # [L?, in, out]
        filled[key] = var.replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
