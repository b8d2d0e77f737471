"""Model config fields our decoders do not implement are a ModelError naming the field and the file,
found before any work (`inspect_model_source` reads config.json or the GGUF metadata only).

Configs are written by transformers' own config classes (`XConfig(...).to_dict()`), then changed one
field at a time. No weights are needed: `inspect_model_source` only checks that the weight file is a
whole safetensors file (its header and size), so each folder holds one small tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

from rto_jax.errors import ModelError
from rto_jax.models import ModelConfig, check_supported, from_hf_config, inspect_model_source, to_hf_config
from rto_jax.models.config import _HF_DEFAULTS
from rto_jax.models.smollm2 import find_smollm2_gguf

SMALL = {
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _hf(model_type: str, **changes) -> dict:
    """A config.json dict as transformers writes it for a small model of `model_type`, with `changes`."""
    if model_type == "gpt_neox":
        small = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
        config = transformers.GPTNeoXConfig(**small)
    else:
        config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}.get(
            model_type, transformers.Qwen2Config
        )(**SMALL)
    return {**config.to_dict(), **changes}


def _folder(tmp_path: Path, hf: dict, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    save_file({"placeholder": np.zeros(3, np.float32)}, folder / "model.safetensors")  # header and size are checked
    return folder


def _refused(folder: Path, field: str, max_sequence_len: int | None = None) -> str:
    with pytest.raises(ModelError) as info:
        inspect_model_source(folder, max_sequence_len=max_sequence_len)
    message = str(info.value)
    assert str(folder / "config.json") in message, message
    assert field in message, message
    return message


# ------------------------------------------------------------------------------------------
# fields that are errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_llama_family_activation_other_than_silu_is_refused(tmp_path, model_type, act):
    message = _refused(_folder(tmp_path, _hf(model_type, hidden_act=act)), "hidden_act")
    assert repr(act) in message


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu"])
def test_gpt_neox_accepts_only_the_exact_erf_gelu(tmp_path, act):
    message = _refused(_folder(tmp_path, _hf("gpt_neox", hidden_act=act)), "hidden_act")
    assert repr(act) in message
    assert inspect_model_source(_folder(tmp_path, _hf("gpt_neox", hidden_act="gelu"), "ok")).arch == "gpt_neox"


def test_silu_and_swish_are_the_same_function_in_transformers():
    # Why 'swish' is accepted for the Llama family and 'gelu_python' for GPT-NeoX: the same function.
    import torch
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(ACT2FN["swish"](x), ACT2FN["silu"](x), rtol=0, atol=0)
    torch.testing.assert_close(ACT2FN["gelu_python"](x), ACT2FN["gelu"](x), rtol=0, atol=1e-6)
    assert float((ACT2FN["gelu_new"](x) - ACT2FN["gelu"](x)).abs().max()) > 1e-4


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}},
        {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    ],
)
def test_unimplemented_rope_types_are_refused(tmp_path, rope):
    params = next(iter(rope.values()))
    rope_type = params.get("rope_type", params.get("type"))
    message = _refused(_folder(tmp_path, _hf("llama", **rope)), "rope_type")
    assert repr(rope_type) in message


def test_mlp_bias_is_refused(tmp_path):
    _refused(_folder(tmp_path, _hf("llama", mlp_bias=True)), "mlp_bias")


@pytest.mark.parametrize(
    "field,value",
    [
        ("attn_logit_softcapping", 50.0),
        ("final_logit_softcapping", 30.0),
        ("qk_norm", True),
        ("use_qk_norm", True),
        ("query_pre_attn_scalar", 256),
        ("num_local_experts", 8),
        ("is_causal", False),
        ("quantization_config", {"quant_method": "gptq", "bits": 4}),
        ("layer_types", ["full_attention", "linear_attention"]),
        ("partial_rotary_factor", 0.5),
    ],
)
def test_other_unimplemented_features_are_refused(tmp_path, field, value):
    _refused(_folder(tmp_path, _hf("llama", **{field: value})), field)


def test_reward_model_with_several_labels_is_refused(tmp_path):
    hf = _hf("llama", architectures=["LlamaForSequenceClassification"], id2label={"0": "a", "1": "b"})
    _refused(_folder(tmp_path, hf), "num_labels")


def test_unsupported_model_type_and_missing_field(tmp_path):
    _refused(_folder(tmp_path, {**_hf("llama"), "model_type": "bloom"}, "bloom"), "model_type")
    hf = _hf("llama")
    del hf["hidden_size"]
    _refused(_folder(tmp_path, hf, "missing"), "hidden_size")
    with pytest.raises(ModelError, match="no such model folder"):
        inspect_model_source(tmp_path / "nowhere")
    folder = _folder(tmp_path, _hf("llama"), "no_weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no_weights: no model\.safetensors"):
        inspect_model_source(folder)


def test_damaged_weight_files_are_refused_naming_the_file(tmp_path):
    """A truncated download, a file that is not safetensors, and a shard the index lists but that is
    missing: each a ModelError naming the file, before any weights are read."""
    folder = _folder(tmp_path, _hf("llama"), "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ModelError, match=rf"{weights}: \d+ bytes, but its header describes \d+.*truncated"):
        inspect_model_source(folder)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match=rf"{weights}: not a safetensors file"):
        inspect_model_source(folder)

    sharded = _folder(tmp_path, _hf("llama"), "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelError, match=r"model-00002-of-00002\.safetensors: missing \(listed in .*index\.json\)"):
        inspect_model_source(sharded)


# ------------------------------------------------------------------------------------------
# sliding window and sequence length
# ------------------------------------------------------------------------------------------


def test_mistral_sliding_window_shorter_than_the_sequences_is_refused(tmp_path):
    # Mistral has no switch: a window is on whenever sliding_window is set.
    folder = _folder(tmp_path, _hf("mistral", sliding_window=32, use_sliding_window=False))
    message = _refused(folder, "sliding_window=32", max_sequence_len=33)
    assert "33" in message
    # As long as every sequence fits in the window, windowed attention equals ours (full).
    assert inspect_model_source(folder, max_sequence_len=32).sliding_window == 32
    # Without a length the config loads, and the later check still knows the window.
    cfg = inspect_model_source(folder)
    with pytest.raises(ModelError, match="sliding_window=32"):
        check_supported(cfg, 64, "run")
    assert (
        inspect_model_source(_folder(tmp_path, _hf("mistral", sliding_window=None), "off"), 256).sliding_window is None
    )


def test_mistral_default_window_applies_when_config_json_leaves_it_out(tmp_path):
    hf = _hf("mistral")
    del hf["sliding_window"]
    assert transformers.MistralConfig(**hf).sliding_window == 4096
    _refused(_folder(tmp_path, hf), "sliding_window=4096", max_sequence_len=4097)


def test_qwen2_sliding_window_only_when_switched_on(tmp_path):
    on = _hf("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0, layer_types=None)
    message = _refused(_folder(tmp_path, on), "sliding_window=32", max_sequence_len=64)
    assert "use_sliding_window" in message
    assert inspect_model_source(_folder(tmp_path, on, "fits"), max_sequence_len=32).sliding_window == 32
    off = _hf("qwen2", use_sliding_window=False, sliding_window=32)
    assert inspect_model_source(_folder(tmp_path, off, "off"), max_sequence_len=256).sliding_window is None
    # Qwen2Config windows only the layers from max_window_layers on: none of our 2 here.
    late = {**on, "max_window_layers": 2}
    assert inspect_model_source(_folder(tmp_path, late, "late"), max_sequence_len=256).sliding_window is None
    # What transformers itself builds from such configs.
    assert "sliding_attention" in transformers.Qwen2Config(**{**on, "layer_types": None}).layer_types
    assert "sliding_attention" not in transformers.Qwen2Config(**{**late, "layer_types": None}).layer_types


def test_max_position_embeddings_shorter_than_the_sequences_is_refused(tmp_path):
    folder = _folder(tmp_path, _hf("llama", max_position_embeddings=128))
    _refused(folder, "max_position_embeddings=128", max_sequence_len=129)
    assert inspect_model_source(folder, max_sequence_len=128).max_position_embeddings == 128


# ------------------------------------------------------------------------------------------
# fields that are harmless or implemented, and the configs our tests use
# ------------------------------------------------------------------------------------------


def test_harmless_fields_pass(tmp_path):
    hf = _hf("llama", attention_dropout=0.1, pretraining_tp=2, initializer_range=0.5, use_cache=False)
    assert inspect_model_source(_folder(tmp_path, hf), max_sequence_len=256).vocab_size == 97
    neox = _hf("gpt_neox", hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.3, is_decoder=True)
    assert inspect_model_source(_folder(tmp_path, neox, "neox"), max_sequence_len=256).arch == "gpt_neox"


def test_defaults_for_absent_fields_are_transformers_class_defaults():
    """When config.json leaves a field out, transformers uses its class default; so do we."""
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "gpt_neox": transformers.GPTNeoXConfig,
    }
    for model_type, defaults in _HF_DEFAULTS.items():
        fields = {f.name: f.default for f in dataclasses.fields(classes[model_type])}
        for key, value in defaults.items():
            if model_type == "gpt_neox" and key in ("rotary_pct", "rotary_emb_base"):
                rope = transformers.GPTNeoXConfig().rope_parameters
                theirs = rope["partial_rotary_factor" if key == "rotary_pct" else "rope_theta"]
            else:
                theirs = fields[key]
            assert theirs == value, (model_type, key, theirs, value)
    # e.g. a GPT-NeoX config.json without rotary_pct rotates a quarter of each head, as in transformers.
    hf = _hf("gpt_neox")
    hf.pop("rope_parameters")
    assert from_hf_config(hf).rotary_fraction == 0.25


def test_model_configs_of_our_tests_still_load():
    from tests.test_models import HF_CONFIGS

    for name, make in HF_CONFIGS.items():
        cfg = check_supported(make().to_dict(), 64, name)
        assert cfg.sliding_window is None, name


@pytest.mark.parametrize(
    "arch,model_type", [("llama", "llama"), ("llama", "qwen2"), ("llama", "mistral"), ("gpt_neox", "gpt_neox")]
)
def test_exported_configs_load_back(arch, model_type):
    cfg = ModelConfig(
        arch=arch,
        model_type=model_type,
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        num_kv_heads=4 if arch == "gpt_neox" else 2,
        head_dim=8,
        rotary_fraction=0.5 if arch == "gpt_neox" else 1.0,
        attention_bias=model_type in ("qwen2", "gpt_neox"),
        pad_token_id=0,
        eos_token_id=1,
    )
    hf = to_hf_config(cfg, "X")
    assert check_supported(hf, 2048, "export") == cfg
    # transformers reads the export with full attention, as our model computes it.
    hf_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "gpt_neox": transformers.GPTNeoXConfig,
    }[model_type]
    theirs = hf_class(**{k: v for k, v in hf.items() if k != "model_type"})
    assert getattr(theirs, "sliding_window", None) is None


# ------------------------------------------------------------------------------------------
# GGUF metadata
# ------------------------------------------------------------------------------------------


def _gguf(path: Path, arch: str = "llama", metadata: dict | None = None, tensors: dict | None = None) -> Path:
    """A GGUF with a config's metadata (the tensors given, none by default)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {
        "block_count": 2,
        "context_length": 256,
        "embedding_length": 16,
        "feed_forward_length": 24,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "vocab_size": 300,
    }.items():
        w.add_uint32(f"{arch}.{key}", value)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, value in (tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "key,value",
    [
        ("llama.rope.scaling.type", "yarn"),
        ("llama.attn_logit_softcapping", 50.0),
        ("llama.final_logit_softcapping", 30.0),
        ("llama.expert_count", 8),
        ("llama.attention.causal", False),
    ],
)
def test_gguf_metadata_of_unimplemented_features_is_refused(tmp_path, key, value):
    path = _gguf(tmp_path / "m.gguf", metadata={key: value})
    with pytest.raises(ModelError) as info:
        inspect_model_source(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_gguf_sliding_window_and_extra_tensors(tmp_path):
    path = _gguf(tmp_path / "swa.gguf", metadata={"llama.attention.sliding_window": 64})
    assert inspect_model_source(path, max_sequence_len=64).sliding_window == 64
    with pytest.raises(ModelError, match=r"swa\.gguf.*sliding_window=64"):
        inspect_model_source(path, max_sequence_len=65)
    path = _gguf(tmp_path / "qknorm.gguf", tensors={"blk.0.attn_q_norm.weight": np.ones(4, np.float32)})
    with pytest.raises(ModelError, match=r"qknorm\.gguf.*blk\.0\.attn_q_norm\.weight"):
        inspect_model_source(path)
    # llama.cpp's Llama-3.x RoPE scaling (per-frequency divisors) changes every angle: refused unless all 1.
    freqs = np.ones(2, np.float32)
    assert inspect_model_source(_gguf(tmp_path / "ones.gguf", tensors={"rope_freqs.weight": freqs})).vocab_size == 300
    path = _gguf(tmp_path / "llama3.gguf", tensors={"rope_freqs.weight": np.array([1.0, 8.0], np.float32)})
    with pytest.raises(ModelError, match=r"llama3\.gguf.*rope_freqs"):
        inspect_model_source(path)


def test_tiny_gguf_files_of_our_tests_still_load(tmp_path):
    pytest.importorskip("gguf")
    from tests.test_gguf import _write_tiny

    for arch in ("llama", "qwen2"):
        _write_tiny(tmp_path / f"{arch}.gguf", arch=arch)
        cfg = inspect_model_source(tmp_path / f"{arch}.gguf", max_sequence_len=128)
        assert (cfg.model_type, cfg.vocab_size, cfg.sliding_window) == (arch, 300, None)


def test_smollm2_gguf_passes_and_reports_its_vocabulary():
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: set $RTO_JAX_SMOLLM2_GGUF or run `python -m rto_jax.models.smollm2`")
    cfg = inspect_model_source(path, max_sequence_len=2048)
    assert cfg.vocab_size == 49152 and cfg.model_type == "llama" and cfg.sliding_window is None
    assert cfg.max_position_embeddings == 8192
    with pytest.raises(ModelError, match="max_position_embeddings=8192"):
        inspect_model_source(path, max_sequence_len=8193)
