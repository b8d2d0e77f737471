"""GGUF import: config, dequantized HF-layout tensors, tokenizer.

Synthetic tests (tiny GGUF files written with `gguf.GGUFWriter`) always run. Tests on the real
SmolLM2-135M-Instruct Q4_1 GGUF skip when the file is absent (set $RTO_JAX_SMOLLM2_GGUF or run
`python -m rto_jax.models.smollm2` to fetch it). They compare against transformers' own GGUF
loader and run a greedy chat completion with a torch LlamaForCausalLM holding our tensors
(both through third_party/transformers_reference).
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from rto_jax.models.gguf_import import (  # noqa: E402
    read_gguf,
    read_gguf_config,
    read_gguf_metadata,
    read_gguf_tensors,
    unpermute_rotary_rows,
)
from rto_jax.models.smollm2 import find_smollm2_gguf  # noqa: E402

ROUND_TRIP = [
    "Hello, world! How are you today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Ünïcödé — “quotes” façade naïve 日本語 中文 👍🏽 Ελληνικά",
    "  leading spaces,   inner   runs,\ttabs\n\n\nnewlines\r\nand trailing   ",
    "In 2024 there were 3 cats, 1,000,000 dogs and ½ a horse.",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n",
    "",
]
# For the comparison with transformers' GGUF tokenizer: it does not know llama.cpp's `smollm`
# pre-tokenizer (digits split one by one, which we and llama.cpp do), so keep digits/numeric
# characters out of these.
COMPARE = [
    "Hello, world! How are you today?",
    "def fib(n):\n    return n if n < two else fib(n - one)\n",
    "Ünïcödé — “quotes” façade naïve 日本語 👍🏽",
    "  leading spaces,   inner   runs,\ttabs\n\n\nnewlines\r\nand trailing   ",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
]


# ------------------------------------------------------------------------------------------
# synthetic GGUF files
# ------------------------------------------------------------------------------------------


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf(arch: str, tied: bool, rng: np.random.Generator):
    V, D, F, L, H, K, hd = 300, 16, 24, 2, 4, 2, 4
    t = {
        "model.embed_tokens.weight": rng.standard_normal((V, D)),
        "model.norm.weight": rng.standard_normal(D),
    }
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((V, D))
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = rng.standard_normal(D)
        t[p + "post_attention_layernorm.weight"] = rng.standard_normal(D)
        t[p + "self_attn.q_proj.weight"] = rng.standard_normal((H * hd, D))
        t[p + "self_attn.k_proj.weight"] = rng.standard_normal((K * hd, D))
        t[p + "self_attn.v_proj.weight"] = rng.standard_normal((K * hd, D))
        t[p + "self_attn.o_proj.weight"] = rng.standard_normal((D, H * hd))
        t[p + "mlp.gate_proj.weight"] = rng.standard_normal((F, D))
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((F, D))
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((D, F))
        if arch == "qwen2":
            t[p + "self_attn.q_proj.bias"] = rng.standard_normal(H * hd)
            t[p + "self_attn.k_proj.bias"] = rng.standard_normal(K * hd)
            t[p + "self_attn.v_proj.bias"] = rng.standard_normal(K * hd)
    dims = dict(V=V, D=D, F=F, L=L, H=H, K=K, hd=hd)
    return {k: v.astype(np.float32) for k, v in t.items()}, dims


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest]}"


def _byte_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def _write_tiny(path, arch="llama", tied=True, drop=None, bad_shape=None, seed=0, tokenizer=True):
    rng = np.random.default_rng(seed)
    hf, d = _tiny_hf(arch, tied, rng)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", d["L"])
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_uint32(f"{arch}.embedding_length", d["D"])
    w.add_uint32(f"{arch}.feed_forward_length", d["F"])
    w.add_uint32(f"{arch}.attention.head_count", d["H"])
    w.add_uint32(f"{arch}.attention.head_count_kv", d["K"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 5000.0)
    w.add_uint32(f"{arch}.vocab_size", d["V"])
    if tokenizer:
        # byte alphabet + 40 merges' worth of tokens + 4 specials = 300
        tokens = _byte_vocab()
        merges = []
        for a, b in [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]:
            merges.append(f"{a} {b}")
            tokens.append(a + b)
        specials = ["<s>", "</s>", "<pad>", "<unk>"]
        while len(tokens) < d["V"] - len(specials):
            tokens.append(f"<unused{len(tokens)}>")
        tokens += specials
        types = [1] * (d["V"] - 4) + [3, 3, 3, 2]
        for i, t in enumerate(tokens):
            if t.startswith("<unused"):
                types[i] = 5
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", d["V"] - 4)
        w.add_uint32("tokenizer.ggml.eos_token_id", d["V"] - 3)
        w.add_uint32("tokenizer.ggml.padding_token_id", d["V"] - 2)
        w.add_uint32("tokenizer.ggml.unknown_token_id", d["V"] - 1)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_string("tokenizer.chat_template", "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    for name, arr in hf.items():
        if name == drop:
            continue
        g = arr
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            g = _llamacpp_permute(arr, d["H"] if ".q_proj." in name else d["K"])
        if name == bad_shape:
            g = g[:-1]
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(g))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, d


def test_unpermute_rotary_rows_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    for n_heads, hd in [(1, 2), (3, 8), (9, 64)]:
        w = rng.standard_normal((n_heads * hd, 5)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rotary_rows(_llamacpp_permute(w, n_heads), n_heads), w)
        b = rng.standard_normal(n_heads * hd).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rotary_rows(_llamacpp_permute(b, n_heads), n_heads), b)
    # Semantics: GGUF rows (h, 2j) and (h, 2j+1) are HF rows (h, j) and (h, j + hd/2),
    # i.e. the rotate_half pair.
    hd = 8
    hf_rows = np.arange(2 * hd, dtype=np.float32)[:, None]  # 2 heads
    g = _llamacpp_permute(hf_rows, 2)[:, 0]
    assert g[:hd].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert g[hd:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_tiny_gguf_round_trip(tmp_path, arch, tied):
    path = tmp_path / f"tiny-{arch}.gguf"
    hf, d = _write_tiny(path, arch=arch, tied=tied)
    cfg, tensors, tok = read_gguf(path)
    assert cfg["model_type"] == arch
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["qkv_bias"] is (arch == "qwen2")
    assert cfg["attention_bias"] is False
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (d["D"], d["F"], d["L"])
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (d["H"], d["K"], d["hd"])
    assert cfg["rope_theta"] == 5000.0 and cfg["max_position_embeddings"] == 128
    assert "rope_scaling" not in cfg
    assert set(tensors) == set(hf)
    for k, v in hf.items():
        assert tensors[k].dtype == np.float32
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)

    # tokenizer: distinct pad is kept, add_bos_token prepends bos, merges apply, ids = GGUF ids
    V = d["V"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (V - 4, V - 3, V - 2, V - 1)
    assert cfg["pad_token_id"] == V - 2
    ids = tok.encode("hello world")
    assert ids[0] == V - 4
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["hell", "o"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"


def test_tiny_gguf_errors(tmp_path):
    p = tmp_path / "missing.gguf"
    _write_tiny(p, drop="model.layers.1.mlp.up_proj.weight", tokenizer=False)
    with pytest.raises(ValueError, match=r"missing\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight"):
        read_gguf_tensors(p)

    p = tmp_path / "badshape.gguf"
    _write_tiny(p, bad_shape="model.layers.0.self_attn.k_proj.weight", tokenizer=False)
    with pytest.raises(ValueError, match=r"badshape\.gguf.*blk\.0\.attn_k\.weight"):
        read_gguf_tensors(p)

    p = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_uint32("gpt2.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"other\.gguf.*'gpt2'"):
        read_gguf(p)
    with pytest.raises(ValueError, match=r"other\.gguf.*'gpt2'"):
        read_gguf_config(p)


# ------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 GGUF
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_path():
    p = find_smollm2_gguf()
    if p is None:
        pytest.skip(
            "SmolLM2 GGUF not found: set $RTO_JAX_SMOLLM2_GGUF or run `python -m rto_jax.models.smollm2` to download it"
        )
    return p


@pytest.fixture(scope="module")
def smol(smol_path):
    return read_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_meta(smol_path):
    return read_gguf_metadata(smol_path)


def test_smollm2_config(smol, smol_meta):
    cfg, tensors, _ = smol
    m = smol_meta
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == len(m["tokenizer.ggml.tokens"]) == 49152
    assert cfg["hidden_size"] == m["llama.embedding_length"] == 576
    assert cfg["intermediate_size"] == m["llama.feed_forward_length"] == 1536
    assert cfg["num_hidden_layers"] == m["llama.block_count"] == 30
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    # the file says pad == eos == 2: left unset on purpose (the data code picks a distinct pad)
    assert m["tokenizer.ggml.padding_token_id"] == 2 and cfg["pad_token_id"] is None
    assert cfg["attention_bias"] is False

    import transformers

    c = transformers.LlamaConfig(**cfg)
    assert c.num_key_value_heads == 3 and c.head_dim == 64


def test_smollm2_tensors(smol):
    cfg, tensors, _ = smol
    assert len(tensors) == 2 + 9 * 30
    for k, v in tensors.items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert tensors["model.norm.weight"].shape == (576,)


def test_smollm2_tokenizer_vocab_and_specials(smol, smol_meta):
    _, _, tok = smol
    m = smol_meta
    tokens = m["tokenizer.ggml.tokens"]
    assert len(tok) == len(tokens)
    assert tok.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    assert tok.bos_token_id == m["tokenizer.ggml.bos_token_id"] == 1
    assert tok.eos_token_id == m["tokenizer.ggml.eos_token_id"] == 2
    assert tok.unk_token_id == m["tokenizer.ggml.unknown_token_id"] == 0
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.pad_token is None  # pad == eos in the file: documented, left to the data code
    control = {i for i, t in enumerate(m["tokenizer.ggml.token_type"]) if t == 3}
    assert control and control <= set(tok.all_special_ids)
    assert tok.encode("<|im_start|>") == [1]  # add_bos_token is False for this file


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_smollm2_tokenizer_round_trip(smol, text):
    _, _, tok = smol
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_smollm2_digits_split(smol):
    # llama.cpp's `smollm` pre-tokenizer (= the HF tokenizer.json) splits numbers digit by digit
    _, _, tok = smol
    assert tok.convert_ids_to_tokens(tok.encode("12345")) == list("12345")


def test_smollm2_chat_template(smol):
    _, _, tok = smol
    s = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in s
    assert s.endswith("<|im_start|>assistant\n")


def test_smollm2_matches_transformers_gguf_loader(smol, smol_path):
    """Independent reference: transformers' own GGUF reader (dequantize + q/k un-permute)."""
    pytest.importorskip("torch")
    from third_party import transformers_reference as reference

    cfg, tensors, tok = smol
    try:
        theirs_cfg = reference.gguf_config_via_transformers(smol_path)
    except ImportError as e:
        pytest.skip(f"transformers GGUF loader unavailable: {e}")
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_theta",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert cfg[k] == theirs_cfg[k], k
    theirs = reference.gguf_tensors_via_transformers(smol_path, theirs_cfg)
    assert set(theirs) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_allclose(v, theirs[k], rtol=0, atol=1e-6, err_msg=k)

    ref = reference.gguf_tokenizer_via_transformers(smol_path)
    for s in COMPARE:
        assert tok.encode(s) == ref.encode(s), s
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == ref.convert_ids_to_tokens(list(range(len(ref))))


def test_smollm2_greedy_chat_completion(smol):
    pytest.importorskip("torch")
    from third_party import transformers_reference as reference

    cfg, tensors, tok = smol
    model, missing, unexpected = reference.llama_from_tensors(cfg, tensors, seed=0)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    completion = reference.greedy_chat_completion(
        model,
        tok,
        [{"role": "user", "content": "What is the capital of France?"}],
        max_new_tokens=32,
        eos_token_id=cfg["eos_token_id"],
    )
    print(f"\nSmolLM2 greedy completion: {completion!r}")
    assert "Paris" in completion
