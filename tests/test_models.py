"""Our NNX decoders against transformers' PyTorch implementations, through our safetensors I/O.

The transformers side (building, saving and running its PyTorch models) lives in
third_party/transformers_reference.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from rto_jax.models import CausalLM, ModelConfig, ScalarHeadModel, load_pretrained, save_pretrained
from third_party import transformers_reference as reference

VOCAB = 97

HF_CONFIGS = {
    "llama_mha": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "llama_gqa_tied_rope3": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
    ),
    "llama_attention_bias": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
    ),
    "qwen2_gqa_bias": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "mistral_linear_rope": lambda: transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=None,
        rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "gpt_neox_parallel": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=64,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.5,
        max_position_embeddings=64,
        use_parallel_residual=False,
        tie_word_embeddings=False,
    ),
}


def _left_padded_batch(rng, lengths, total):
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        ids[row, total - n :] = rng.integers(1, VOCAB, n)
        mask[row, total - n :] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, positions


def _torch_model(name, tmp_path):
    # Seed 0, pad id 0, random biases and norms too (so a dropped or transposed tensor cannot hide).
    return reference.random_causal_lm(HF_CONFIGS[name](), tmp_path, pad_token_id=0, seed=0)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers_with_left_padding(name, scan_layers, tmp_path):
    torch_model = _torch_model(name, tmp_path)
    model = load_pretrained(tmp_path, scan_layers=scan_layers)
    ids, mask, positions = _left_padded_batch(np.random.default_rng(0), [11, 4, 1], 11)
    expected = reference.causal_lm_logits(torch_model, ids, attention_mask=mask, position_ids=positions)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    assert got.dtype == np.float32 and got.shape == expected.shape
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name", ["llama_gqa_tied_rope3", "gpt_neox_parallel", "qwen2_gqa_bias", "llama_attention_bias"]
)
def test_save_pretrained_round_trip_through_transformers(name, tmp_path):
    _torch_model(name, tmp_path / "src")
    ours = load_pretrained(tmp_path / "src")
    save_pretrained(ours, tmp_path / "out")
    reloaded = reference.load_causal_lm(tmp_path / "out")
    ids, mask, positions = _left_padded_batch(np.random.default_rng(1), [7, 3], 7)
    theirs = reference.causal_lm_logits(reloaded, ids, attention_mask=mask, position_ids=positions)
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    np.testing.assert_allclose(got[mask.astype(bool)], theirs[mask.astype(bool)], atol=1e-4, rtol=0)
    # And our own loader reads back exactly what we wrote.
    again = load_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(ours(jnp.asarray(ids))))


def test_scalar_head_exports_as_sequence_classification(tmp_path):
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        pad_token_id=0,
    )
    model = ScalarHeadModel(cfg, nnx.Rngs(3))
    save_pretrained(model, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    torch_rm = reference.load_sequence_classifier(tmp_path / "rm")
    ids = np.random.default_rng(2).integers(1, VOCAB, (3, 9))
    theirs = reference.sequence_classifier_scores(torch_rm, ids)
    ours = np.asarray(model(jnp.asarray(ids)))[:, -1]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    reloaded = load_pretrained(tmp_path / "rm")
    assert isinstance(reloaded, ScalarHeadModel)
    np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))


def test_affine_output_is_folded_into_the_head_exactly_and_round_trips(tmp_path):
    """PPO's critic: the reward model rescaled to emit (r - mean) / std. The fold is exact, leaves the
    original alone, and its bias survives export and reload (as score.bias)."""
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    model = ScalarHeadModel(cfg, nnx.Rngs(3))
    ids = jnp.asarray(np.random.default_rng(2).integers(1, VOCAB, (3, 9)))
    raw = np.asarray(model(ids))
    mean, std = 1.7, 0.35
    critic = model.with_affine_output(1.0 / std, -mean / std)
    np.testing.assert_allclose(np.asarray(critic(ids)), (raw - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model(ids)), raw)  # a copy: the reward model is unchanged
    twice = critic.with_affine_output(2.0, 0.5)  # an existing bias is scaled and shifted too
    np.testing.assert_allclose(np.asarray(twice(ids)), 2.0 * (raw - mean) / std + 0.5, rtol=1e-5, atol=1e-5)
    save_pretrained(critic, tmp_path / "critic")
    reloaded = load_pretrained(tmp_path / "critic")
    assert reloaded.head.bias is not None
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(critic(ids)))


def test_bfloat16_compute_stays_close_and_returns_float32(tmp_path):
    _torch_model("llama_mha", tmp_path)
    f32 = load_pretrained(tmp_path)
    bf16 = load_pretrained(tmp_path, dtype="bfloat16")
    ids = jnp.asarray(np.random.default_rng(3).integers(1, VOCAB, (2, 8)))
    a, b = f32(ids), bf16(ids)
    assert b.dtype == jnp.float32
    assert jax.tree.leaves(nnx.state(bf16, nnx.Param))[0].dtype == jnp.float32  # master weights stay float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.05


def test_loader_errors_name_the_file_and_tensor(tmp_path):
    _torch_model("llama_mha", tmp_path)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_pretrained(tmp_path)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj\.weight.*shape \(3, 3\).*expects \(80, 48\)"):
        load_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bloom"}))
    with pytest.raises(ValueError, match=r"model_type 'bloom' is not supported"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_pretrained(tmp_path / "nowhere")


def test_sharded_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=4, head_dim=8
    )
    model = CausalLM(cfg, nnx.Rngs(0))
    save_pretrained(model, tmp_path / "m", max_shard_bytes=20_000)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    reloaded = load_pretrained(tmp_path / "m")
    ids = jnp.arange(10)[None] % VOCAB
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(model(ids)))
