"""Exports work in transformers: a left-padded batch of two is scored by the exported reward model and
generated from by the exported policy exactly as each prompt alone (and as our own models).

The exporter must write pad/eos ids into config.json (transformers' sequence classifiers refuse a batch
without a pad id) and save the tokenizer with its pad token set to that id. The tokenizers used here
have no pad token of their own: a byte-level BPE trained on a few strings (always runs) and SmolLM2's
GGUF tokenizer (skips when the file is absent).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rto_jax.models import CausalLM, ModelConfig, ScalarHeadModel, save_pretrained
from rto_jax.models.smollm2 import find_smollm2_gguf

PROMPTS = ["hello there, how are you doing today?", "a cat"]
NEW_TOKENS = 6


def _bpe_without_pad(tmp_path):
    """A byte-level BPE from the pipeline's trainer, rewrapped with an eos token and no pad token."""
    from rto_jax.pipeline.tasks import EOS_TOKEN, PAD_TOKEN, train_bpe

    texts = ["hello there, how are you doing today?", "the cat sat on the mat", "a dog and a cat"] * 4
    trained = train_bpe(texts, 300, tmp_path / "bpe")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, eos_token=EOS_TOKEN)
    assert tok.pad_token is None
    return tok, tok.convert_tokens_to_ids(PAD_TOKEN), tok.eos_token_id


def _smollm2_tokenizer():
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: set $RTO_JAX_SMOLLM2_GGUF or run `python -m rto_jax.models.smollm2`")
    pytest.importorskip("gguf")
    from rto_jax.models.gguf_import import read_gguf_tokenizer

    tok = read_gguf_tokenizer(path)
    assert tok.pad_token is None  # the file says pad == eos; left unset
    return tok, tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id


def _models(vocab_size: int, eos_id: int):
    """A random policy and reward model (llama, GQA) whose config has no pad id: the export supplies it."""
    cfg = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    policy = CausalLM(cfg, nnx.Rngs(0))
    # Spread the logits so that greedy decoding has clear winners (no ties within float error).
    policy.lm_head.kernel[...] = policy.lm_head.kernel[...] * 50
    return policy, ScalarHeadModel(cfg, nnx.Rngs(1))


def _export(tmp_path, tok, pad_id, eos_id):
    assert pad_id != eos_id
    policy, reward = _models(len(tok), eos_id)
    save_pretrained(policy, tmp_path / "policy", tokenizer=tok, pad_token_id=pad_id, eos_token_id=eos_id)
    save_pretrained(reward, tmp_path / "reward", tokenizer=tok, pad_token_id=pad_id, eos_token_id=eos_id)
    assert tok.pad_token is None  # the caller's tokenizer is not changed
    for name in ("policy", "reward"):
        folder = tmp_path / name
        config = json.loads((folder / "config.json").read_text())
        assert (config["pad_token_id"], config["eos_token_id"]) == (pad_id, eos_id), name
        assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file(), name
        saved = transformers.AutoTokenizer.from_pretrained(str(folder))
        assert (saved.pad_token_id, saved.eos_token_id) == (pad_id, eos_id), name
    generation = json.loads((tmp_path / "policy" / "generation_config.json").read_text())
    assert (generation["pad_token_id"], generation["eos_token_id"]) == (pad_id, eos_id)
    return policy, reward


def _left_padded(folder, pad_id):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert lengths[0] > lengths[1]  # the second row really is padded, with the pad id
    assert enc["attention_mask"][1, 0] == 0 and enc["input_ids"][1, 0] == pad_id
    return tok, enc


def _until_eos(tokens, eos_id):
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def _check_scoring(tmp_path, reward, pad_id):
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward")).float().eval()
    tok, enc = _left_padded(tmp_path / "reward", pad_id)
    with torch.no_grad():
        theirs = rm(**enc).logits[:, 0].numpy()
    ours = [float(reward(jnp.asarray([tok(p)["input_ids"]]))[0, -1]) for p in PROMPTS]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert abs(ours[0] - ours[1]) > 1e-3  # two different scores, so a row mix-up would show


@nnx.jit
def _logits(model, ids):
    return model(ids)


def _our_greedy(policy, ids, eos_id):
    """Our policy's greedy continuation, one fixed-width call per token (causal: right padding is unseen)."""
    ids = list(ids)
    width = 64
    out = []
    for _ in range(NEW_TOKENS):
        logits = np.asarray(_logits(policy, jnp.asarray([ids + [0] * (width - len(ids))]))[0, len(ids) - 1])
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-3, "near-tie: greedy decoding is ill-posed for this model"
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
    return _until_eos(out, eos_id)


def _check_generation(tmp_path, policy, pad_id, eos_id):
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy")).float().eval()
    tok, enc = _left_padded(tmp_path / "policy", pad_id)
    width = enc["input_ids"].shape[1]
    with torch.no_grad():
        batch = lm.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    for row, prompt in enumerate(PROMPTS):
        single_enc = tok([prompt], return_tensors="pt")
        with torch.no_grad():
            single = lm.generate(
                **single_enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
            )
        batch_row = [int(t) for t in batch[row, width:]]
        alone = _until_eos(single[0, single_enc["input_ids"].shape[1] :], eos_id)
        assert _until_eos(batch_row, eos_id) == alone, (prompt, batch_row, alone)
        assert all(t == pad_id for t in batch_row[len(alone) :])  # after eos: padding only
        assert alone == _our_greedy(policy, single_enc["input_ids"][0].tolist(), eos_id), prompt


def test_bpe_export_scores_a_left_padded_batch_in_transformers(tmp_path):
    tok, pad_id, eos_id = _bpe_without_pad(tmp_path)
    _, reward = _export(tmp_path, tok, pad_id, eos_id)
    _check_scoring(tmp_path, reward, pad_id)


def test_bpe_export_generates_a_left_padded_batch_in_transformers(tmp_path):
    tok, pad_id, eos_id = _bpe_without_pad(tmp_path)
    policy, _ = _export(tmp_path, tok, pad_id, eos_id)
    _check_generation(tmp_path, policy, pad_id, eos_id)


def test_smollm2_tokenizer_export_scores_and_generates_in_transformers(tmp_path):
    tok, pad_id, eos_id = _smollm2_tokenizer()
    policy, reward = _export(tmp_path, tok, pad_id, eos_id)
    _check_scoring(tmp_path, reward, pad_id)
    _check_generation(tmp_path, policy, pad_id, eos_id)


def test_without_a_pad_id_transformers_cannot_score_a_batch(tmp_path):
    """The failure the export prevents: a model config without a pad id, exported as it is."""
    tok, _, eos_id = _bpe_without_pad(tmp_path)
    _, reward = _models(len(tok), eos_id)
    save_pretrained(reward, tmp_path / "reward", tokenizer=tok)
    assert json.loads((tmp_path / "reward" / "config.json").read_text())["pad_token_id"] is None
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "reward")).pad_token_id is None
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward")).eval()
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]] * 2)
    with pytest.raises(ValueError, match="no padding token"), torch.no_grad():
        rm(input_ids=ids)


def test_export_rejects_ids_outside_the_vocabulary(tmp_path):
    tok, _, eos_id = _bpe_without_pad(tmp_path)
    policy, _ = _models(len(tok), eos_id)
    with pytest.raises(ValueError, match="pad_token_id=100000"):
        save_pretrained(policy, tmp_path / "policy", tokenizer=tok, pad_token_id=100_000)
    assert not (tmp_path / "policy").exists()
