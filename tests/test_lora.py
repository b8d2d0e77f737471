"""Low-rank adapters: the math (identity at init, exact merge, the base switch, dropout), their sharding
axes, and PEFT's format in and out (PEFT itself reproduces our logits when it is installed)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.errors import ModelError
from rto_jax.models import CausalLM, ModelConfig, ScalarHeadModel, lora, merge_adapters, with_adapters
from rto_jax.models.peft_io import load_peft_adapter, read_peft_config, save_peft_adapter

VOCAB = 61


def tiny(**kw):
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        **kw,
    )


def _ids(batch=2, length=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


def _randomize_b(model, seed=1, scale=0.5):
    """Nonzero B everywhere (a trained adapter), so the adapter changes the outputs."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if var[...].shape[-2] == model.config.lora.rank:  # B: [L?, r, out]
            var[...] = scale * jax.random.normal(next(keys), var[...].shape)
    return model


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_fresh_adapter_is_the_identity_and_merge_is_exact(scan, tied):
    base = CausalLM(tiny(scan_layers=scan, tie_word_embeddings=tied), nnx.Rngs(0))
    ids = _ids()
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapted = with_adapters(base, cfg, nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(adapted(ids)), np.asarray(base(ids)))  # B = 0: exactly the base
    _randomize_b(adapted)
    out = np.asarray(adapted(ids))
    assert np.max(np.abs(out - np.asarray(base(ids)))) > 1e-2  # the adapter now does something
    merged = merge_adapters(adapted)
    assert merged.config.lora is None and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(merged(ids)), out, rtol=1e-5, atol=1e-5)
    with lora.disabled():  # the reference of an adapter run: the bare base, from the same arrays
        np.testing.assert_array_equal(np.asarray(adapted(ids)), np.asarray(base(ids)))


def test_merge_is_w_plus_scale_a_b_on_each_target():
    base = CausalLM(tiny(), nnx.Rngs(0))
    cfg = lora.LoraConfig(rank=2, alpha=6.0, targets=("q_proj", "down_proj"))
    adapted = _randomize_b(with_adapters(base, cfg, nnx.Rngs(1)))
    merged = merge_adapters(adapted)
    for i in range(2):
        block, merged_block, base_block = adapted.decoder.layers[i], merged.decoder.layers[i], base.decoder.layers[i]
        for name in ("q_proj", "down_proj"):
            dense = getattr(block, name)
            expected = np.asarray(dense.kernel[...]) + 3.0 * np.asarray(dense.lora_a[...]) @ np.asarray(
                dense.lora_b[...]
            )
            np.testing.assert_allclose(
                np.asarray(getattr(merged_block, name).kernel[...]), expected, rtol=1e-6, atol=1e-7
            )
        for name in ("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):  # untargeted: no adapter, kernel as is
            assert getattr(block, name).lora_a is None
            np.testing.assert_array_equal(
                np.asarray(getattr(merged_block, name).kernel[...]), np.asarray(getattr(base_block, name).kernel[...])
            )


def test_adapters_share_the_base_arrays_and_are_float32_over_a_bfloat16_base():
    base = CausalLM(tiny(dtype="bfloat16"), nnx.Rngs(0))
    adapted = with_adapters(base, lora.LoraConfig(rank=4), nnx.Rngs(1))
    assert adapted.decoder.layers[0].q_proj.kernel[...] is base.decoder.layers[0].q_proj.kernel[...]  # no copy
    adapters = jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam))
    assert adapters and all(a.dtype == jnp.float32 for a in adapters)
    assert lora.count_adapter_parameters(adapted) == 2 * (  # per layer: A [in, 4] + B [4, out] for 7 projections
        4 * (32 + 32) + 4 * (32 + 16) * 2 + 4 * (32 + 32) + 4 * (32 + 48) * 2 + 4 * (48 + 32)
    )
    a = adapted.decoder.layers[0].q_proj.lora_a
    b = adapted.decoder.layers[0].down_proj.lora_b
    assert a.axes == ("embed", "lora_rank") and b.axes == ("lora_rank", "embed")
    bound = 1 / np.sqrt(32)
    assert 0 < np.max(np.abs(np.asarray(a[...]))) <= bound  # PEFT's kaiming-uniform bound


def test_float32_adapters_train_over_a_base_stored_in_bfloat16():
    base = CausalLM(tiny(dtype="bfloat16"), nnx.Rngs(0))
    graphdef, params = nnx.split(base)
    base = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))  # a frozen bf16 copy
    adapted = _randomize_b(with_adapters(base, lora.LoraConfig(rank=4), nnx.Rngs(1)))
    graphdef, adapters, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    assert {x.dtype for x in jax.tree.leaves(rest)} == {jnp.dtype(jnp.bfloat16)}
    grads = jax.grad(lambda a: jnp.mean(nnx.merge(graphdef, a, rest)(_ids()) ** 2))(adapters)
    leaves = jax.tree.leaves(grads)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_gradients_of_the_adapters_alone():
    base = CausalLM(tiny(), nnx.Rngs(0))
    adapted = _randomize_b(with_adapters(base, lora.LoraConfig(rank=4, alpha=4.0), nnx.Rngs(1)))
    graphdef, adapters, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    ids = _ids()

    def loss(adapters):
        return jnp.mean(nnx.merge(graphdef, adapters, rest)(ids) ** 2)

    grads = jax.grad(loss)(adapters)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == 2 * 2 * 7  # A and B of 7 projections in 2 layers, nothing of the base
    assert all(float(jnp.max(jnp.abs(g[...]))) > 0 for _, g in flat)
    # Against a finite difference along the gradient of one B.
    key, g = next((k, g) for k, g in flat if k[-1] == "lora_b")
    step = 1e-3 * g[...] / jnp.linalg.norm(g[...])
    plus = dict(nnx.to_flat_state(adapters))
    plus[key] = plus[key].replace(plus[key][...] + step)
    change = loss(nnx.from_flat_state(plus)) - loss(adapters)
    np.testing.assert_allclose(float(change), float(jnp.sum(g[...] * step)), rtol=2e-2)


def test_dropout_only_with_a_key_and_the_same_masks_in_both_layer_layouts():
    cfg = lora.LoraConfig(rank=4, dropout=0.5)
    loop = _randomize_b(with_adapters(CausalLM(tiny(), nnx.Rngs(0)), cfg, nnx.Rngs(1)))
    scan = CausalLM(tiny(scan_layers=True, lora=cfg), nnx.Rngs(0))
    # The same weights in the stacked layout.
    flat = dict(nnx.to_flat_state(nnx.state(loop)))
    stacked = {}
    for key, var in nnx.to_flat_state(nnx.state(scan)):
        if key[:2] == ("decoder", "layers"):
            stacked[key] = var.replace(jnp.stack([flat[key[:2] + (i,) + key[2:]][...] for i in range(2)]))
        else:
            stacked[key] = var.replace(flat[key][...])
    nnx.update(scan, nnx.from_flat_state(stacked))
    ids = _ids()
    plain = np.asarray(loop(ids))
    np.testing.assert_allclose(np.asarray(scan(ids)), plain, rtol=1e-5, atol=1e-5)
    with lora.dropout_rng(jax.random.key(3)):
        dropped_loop, dropped_scan = np.asarray(loop(ids)), np.asarray(scan(ids))
    assert np.max(np.abs(dropped_loop - plain)) > 1e-3  # units were dropped
    np.testing.assert_allclose(dropped_scan, dropped_loop, rtol=1e-5, atol=1e-5)  # the same masks
    with lora.dropout_rng(jax.random.key(4)):
        assert np.max(np.abs(np.asarray(loop(ids)) - dropped_loop)) > 1e-3  # another key, other masks


def test_bad_lora_configs_name_the_field():
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        lora.LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="query_key_value"):
        tiny(lora=lora.LoraConfig(targets=("query_key_value",)))  # a GPT-NeoX name on a Llama model


@pytest.mark.parametrize("scan", [False, True])
def test_peft_folder_round_trip(tmp_path, scan):
    base = CausalLM(tiny(scan_layers=scan), nnx.Rngs(0))
    adapted = _randomize_b(
        with_adapters(base, lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj")), nnx.Rngs(1))
    )
    folder = save_peft_adapter(adapted, tmp_path / "adapter", base_model="tiny-base")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert (
        config["target_modules"] == ["q_proj", "v_proj", "up_proj"] and config["base_model_name_or_path"] == "tiny-base"
    )
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 32)  # [r, in]
    assert tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].shape == (48, 4)  # [out, r]
    assert len(tensors) == 2 * 3 * 2
    loaded = load_peft_adapter(CausalLM(tiny(scan_layers=scan), nnx.Rngs(0)), folder)
    ids = _ids()
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(adapted(ids)))


def test_peft_folders_we_cannot_honour_are_refused(tmp_path):
    base = CausalLM(tiny(), nnx.Rngs(0))
    folder = save_peft_adapter(with_adapters(base, lora.LoraConfig(rank=2), nnx.Rngs(1)), tmp_path / "a")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for field, value, message in [
        ("use_dora", True, "use_dora=True is not supported"),
        ("target_modules", "q_proj|v_proj", "target_modules must be a list"),
        ("target_modules", ["c_attn"], "not projections of a llama model"),
        ("peft_type", "IA3", "is not 'LORA'"),
    ]:
        config_path.write_text(json.dumps({**config, field: value}))
        with pytest.raises(ModelError, match=message) as err:
            read_peft_config(folder, "llama")
        assert str(config_path) in str(err.value)
    config_path.write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="adapter_model.safetensors is missing"):
        load_peft_adapter(base, folder)


def test_scalar_head_adapter_round_trip(tmp_path):
    base = ScalarHeadModel(tiny(), nnx.Rngs(0))
    adapted = _randomize_b(with_adapters(base, lora.LoraConfig(rank=2), nnx.Rngs(1)))
    adapted.head.kernel[...] = adapted.head.kernel[...] * 2.0  # the head is trained beside the adapters
    folder = save_peft_adapter(adapted, tmp_path / "rm")
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    loaded = load_peft_adapter(ScalarHeadModel(tiny(), nnx.Rngs(0)), folder)
    ids = _ids()
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(adapted(ids)))


def test_peft_reproduces_our_adapter_logits(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT not installed (pip install peft; the test extra has it)")
    import torch
    import transformers

    from rto_jax.models import save_pretrained

    base = CausalLM(tiny(), nnx.Rngs(0))
    save_pretrained(base, tmp_path / "base")
    adapted = _randomize_b(with_adapters(base, lora.LoraConfig(rank=4, alpha=8.0), nnx.Rngs(1)))
    save_peft_adapter(adapted, tmp_path / "adapter")
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    torch_model = peft.PeftModel.from_pretrained(torch_base, tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(adapted(ids)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="merge_adapters"):  # HF's plain architecture has no place for them
        save_pretrained(adapted, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    # Merged export = the adapter forward, in transformers too.
    save_pretrained(merge_adapters(adapted), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            merged(input_ids=torch.tensor(np.asarray(ids))).logits.numpy(), theirs, rtol=1e-4, atol=1e-4
        )


def test_gpt_neox_adapters_merge_exactly_and_round_trip(tmp_path):
    cfg = ModelConfig(
        arch="gpt_neox", model_type="gpt_neox", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, attention_bias=True, rotary_fraction=0.5,
    )  # fmt: skip
    base = CausalLM(cfg, nnx.Rngs(0))
    ids = _ids()
    adapted = with_adapters(
        base, lora.LoraConfig(rank=3, alpha=6.0, targets=("query_key_value", "dense_4h_to_h")), nnx.Rngs(1)
    )
    np.testing.assert_array_equal(np.asarray(adapted(ids)), np.asarray(base(ids)))
    _randomize_b(adapted)
    np.testing.assert_allclose(np.asarray(merge_adapters(adapted)(ids)), np.asarray(adapted(ids)), rtol=1e-5, atol=1e-5)
    folder = save_peft_adapter(adapted, tmp_path / "neox")
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == [
        "query_key_value",
        "dense_4h_to_h",
    ]
    np.testing.assert_array_equal(np.asarray(load_peft_adapter(base, folder)(ids)), np.asarray(adapted(ids)))
