"""Tests of rto_jax.data: formats, loading, tokenization/collation, batching. CPU, fast."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rto_jax import data
from rto_jax.pipeline.config import shared_data_dir
from tests.conftest import shared_data_skip_reason

PAD, EOS, BOS = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _make_tokenizer(with_bos: bool = False) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE: any text encodes; pad=0, eos=1, bos=2; a simple chat template."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "SUBREDDIT: r/test TITLE: a title POST: this is the post body TL;DR: a short summary",
        "Human: hello there Assistant: hi, how can I help you today?",
    ]
    tk.train_from_iterator(corpus * 5, trainer)
    if with_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    t = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    t.chat_template = CHAT_TEMPLATE
    assert (t.pad_token_id, t.eos_token_id, t.bos_token_id) == (PAD, EOS, BOS)
    return t


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    return _make_tokenizer(with_bos=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def _write(path, rows, kind=None):
    """Writes rows (list of dicts) as jsonl / json / parquet / csv, .gz allowed for json(l)/csv."""
    path = str(path)
    kind = kind or path.replace(".gz", "").rsplit(".", 1)[-1]
    if kind == "parquet":
        pd.DataFrame(rows).to_parquet(path)
        return path
    if kind == "csv":
        pd.DataFrame(rows).to_csv(path, index=True)  # An unnamed index column, like the shared CSV.
        return path
    text = json.dumps(rows) if kind == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def _decode(tokenizer, ids, mask):
    return tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])


SFT_ROWS = [
    {"query": "SUBREDDIT: r/a\n\nTITLE: t1\n\nPOST: body one\n\nTL;DR:", "reference_response": " sum one"},
    {"query": "SUBREDDIT: r/b\n\nTITLE: t2\n\nPOST: body two\n\nTL;DR:", "reference_response": " sum two"},
    {"query": "SUBREDDIT: r/c\n\nTITLE: t3\n\nPOST: body three\n\nTL;DR:", "reference_response": " sum 3"},
]

# ------------------------------------------------------------------------------------------------
# Formats and files.


def test_registry_has_every_format():
    for name, kind in [
        ("tldr_sft", "sft"),
        ("tldr_preference", "preference"),
        ("openai_comparisons", "preference"),
        ("ultrafeedback", "preference"),
        ("hh_rlhf", "preference"),
        ("prompt_chosen_rejected", "preference"),
        ("ultrafeedback_sft", "sft"),
        ("prompt_response", "sft"),
    ]:
        assert data.FORMATS[name].kind == kind
    with pytest.raises(ValueError, match="unknown data format"):
        data.get_format("nope")


@pytest.mark.parametrize("suffix", ["jsonl", "json", "jsonl.gz", "json.gz", "parquet", "csv", "csv.gz"])
def test_every_file_type_loads(tmp_path, cache_dir, suffix):
    path = _write(tmp_path / f"sft.{suffix}", SFT_ROWS)
    examples, stats = data.load_examples(path, "tldr_sft", cache_dir=cache_dir)
    assert examples == [data.SFTExample(r["query"], r["reference_response"]) for r in SFT_ROWS]
    assert (stats.num_rows, stats.num_examples, stats.skipped) == (3, 3, {})
    examples, _ = data.load_examples(path, "tldr_sft", cache_dir=cache_dir, max_rows=2)
    assert len(examples) == 2


def test_tldr_sft_reference_responses_column_and_column_map(tmp_path, cache_dir):
    rows = [
        {"query": r["query"], "reference_responses": r["reference_response"], "postprocessed_response": " pp"}
        for r in SFT_ROWS
    ]
    path = _write(tmp_path / "oai.csv", rows)
    examples, _ = data.load_examples(path, "tldr_sft", cache_dir=cache_dir)
    assert [e.response for e in examples] == [" sum one", " sum two", " sum 3"]
    examples, _ = data.load_examples(
        path, "tldr_sft", cache_dir=cache_dir, column_map={"response": "postprocessed_response"}
    )
    assert {e.response for e in examples} == {" pp"}


def test_tldr_sft_raw_hub_layout_and_endoftext(tmp_path, cache_dir):
    rows = [
        {"id": "1", "subreddit": "tifu", "title": "T", "post": "P", "summary": "S"},
        {"id": "2", "subreddit": "r/x", "title": "T2", "post": "P2", "summary": ""},
    ]
    examples, stats = data.load_examples(_write(tmp_path / "raw.jsonl", rows), "tldr_sft", cache_dir=cache_dir)
    assert examples == [data.SFTExample("SUBREDDIT: r/tifu\n\nTITLE: T\n\nPOST: P\n\nTL;DR:", " S")]
    assert stats.skipped == {"empty_response": 1}
    rows = [{"query": "q TL;DR:", "reference_response": " a summary<|endoftext|>"}]
    examples, _ = data.load_examples(_write(tmp_path / "oai.jsonl", rows), "tldr_sft", cache_dir=cache_dir)
    assert examples == [data.SFTExample("q TL;DR:", " a summary")]


def test_hub_ids_go_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(SFT_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples, stats = data.load_examples(
        "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
        "tldr_sft",
        split="validation",
        max_rows=2,
    )
    path, name, kwargs = calls[0]
    assert path.startswith("vwxyzjn/") and name is None
    assert kwargs["split"] == "validation[:2]"
    assert len(examples) == 2 and "[validation]" in stats.source
    data.load_examples("Anthropic/hh-rlhf", "tldr_sft", data_dir="harmless-base", split="test")
    assert calls[1][2]["data_dir"] == "harmless-base"


def test_tldr_preference_normalises_one_line_layout(tmp_path, cache_dir):
    rows = [
        # Layout of shared/data/tldr_comparisons_10k.parquet.
        {
            "prompt": "SUBREDDIT: relationships TITLE: Hi there POST: My post\nsecond line",
            "chosen": "TL;DR:  good",
            "rejected": "TL;DR:  bad",
        },
        # Layout of trl-lib/tldr-preference: kept as is.
        {"prompt": "SUBREDDIT: r/x\n\nTITLE: T\n\nPOST: P\n\nTL;DR:", "chosen": " c", "rejected": " r"},
    ]
    examples, _ = data.load_examples(_write(tmp_path / "p.parquet", rows), "tldr_preference", cache_dir=cache_dir)
    assert examples[0] == data.PreferenceExample(
        "SUBREDDIT: r/relationships\n\nTITLE: Hi there\n\nPOST: My post\nsecond line\n\nTL;DR:", "  good", "  bad"
    )
    assert examples[1] == data.PreferenceExample(rows[1]["prompt"], " c", " r")
    # The generic format uses the strings verbatim.
    examples, _ = data.load_examples(_write(tmp_path / "g.jsonl", rows), "prompt_chosen_rejected", cache_dir=cache_dir)
    assert examples[0] == data.PreferenceExample(rows[0]["prompt"], "TL;DR:  good", "TL;DR:  bad")


def test_openai_comparisons(tmp_path, cache_dir):
    def row(choice):
        return {
            "info": {"id": "x", "post": "My post.", "title": "Title", "subreddit": "tifu", "site": None},
            "summaries": [
                {"text": " first", "policy": "a", "note": None},
                {"text": " second", "policy": "b", "note": None},
            ],
            "choice": choice,
            "worker": "w",
        }

    examples, _ = data.load_examples(
        _write(tmp_path / "c.jsonl", [row(0), row(1)]), "openai_comparisons", cache_dir=cache_dir
    )
    prompt = "SUBREDDIT: r/tifu\n\nTITLE: Title\n\nPOST: My post.\n\nTL;DR:"
    assert examples == [
        data.PreferenceExample(prompt, "  first", "  second"),
        data.PreferenceExample(prompt, "  second", "  first"),
    ]
    assert data.tldr_prompt("r/tifu", "Title", "My post.") == prompt


def test_ultrafeedback_uses_chat_template(tmp_path, cache_dir, tokenizer):
    user = {"role": "user", "content": "What is 2+2?"}
    rows = [
        {
            "prompt": "What is 2+2?",
            "chosen": [user, {"role": "assistant", "content": "4"}],
            "rejected": [user, {"role": "assistant", "content": "5"}],
            "score_chosen": 9.0,
        },
        {
            "prompt": "multi",
            "chosen": [
                user,
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "sure?"},
                {"role": "assistant", "content": "yes"},
            ],
            "rejected": [
                user,
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "sure?"},
                {"role": "assistant", "content": "no"},
            ],
            "score_chosen": 1.0,
        },
    ]
    path = _write(tmp_path / "uf.parquet", rows)
    examples, _ = data.load_examples(path, "ultrafeedback", tokenizer=tokenizer, cache_dir=cache_dir)
    assert examples[0] == data.PreferenceExample("<|user|>What is 2+2?\n<|assistant|>", "4", "5")
    assert examples[1].prompt == "<|user|>What is 2+2?\n<|assistant|>4\n<|user|>sure?\n<|assistant|>"
    assert (examples[1].chosen, examples[1].rejected) == ("yes", "no")
    with pytest.raises(ValueError, match="tokenizer"):
        data.load_examples(path, "ultrafeedback", cache_dir=cache_dir)
    no_template = _make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        data.load_examples(path, "ultrafeedback", tokenizer=no_template, cache_dir=cache_dir)
    sft_path = _write(tmp_path / "uf_sft.jsonl", [{"messages": rows[0]["chosen"]}])
    examples, _ = data.load_examples(sft_path, "ultrafeedback_sft", tokenizer=tokenizer, cache_dir=cache_dir)
    assert examples == [data.SFTExample("<|user|>What is 2+2?\n<|assistant|>", "4")]


def test_hh_rlhf_split_at_last_assistant_turn(tmp_path, cache_dir):
    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me"
    rows = [
        {"chosen": base + "\n\nAssistant: a story", "rejected": base + "\n\nAssistant: no"},
        # The rejected response itself contains an "Assistant:" turn: the split stays put.
        {"chosen": base + "\n\nAssistant: ok", "rejected": base + "\n\nAssistant: x\n\nHuman: y\n\nAssistant: z"},
        # Same first letter in both responses.
        {"chosen": base + "\n\nAssistant: sure", "rejected": base + "\n\nAssistant: sorry"},
    ]
    examples, _ = data.load_examples(_write(tmp_path / "hh.jsonl.gz", rows), "hh_rlhf", cache_dir=cache_dir)
    prompt = base + "\n\nAssistant:"
    assert examples == [
        data.PreferenceExample(prompt, " a story", " no"),
        data.PreferenceExample(prompt, " ok", " x\n\nHuman: y\n\nAssistant: z"),
        data.PreferenceExample(prompt, " sure", " sorry"),
    ]


def test_missing_column_is_an_error_naming_path_and_row(tmp_path, cache_dir):
    path = _write(tmp_path / "bad.jsonl", [{"query": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=r"bad\.jsonl.*row 0.*missing column 'reference_response' or 'reference_responses'"
    ):
        data.load_examples(path, "tldr_sft", cache_dir=cache_dir)
    path = _write(tmp_path / "bad.parquet", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=r"bad\.parquet.*row 0.*'rejected'"):
        data.load_examples(path, "hh_rlhf", cache_dir=cache_dir)


def test_wrong_types_are_an_error_naming_the_first_bad_row(tmp_path, cache_dir):
    ok = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    # Not HH dialogues (the TL;DR comparisons layout passed as hh_rlhf).
    path = _write(tmp_path / "not_hh.jsonl", [ok, ok, {"chosen": "TL;DR: x", "rejected": "TL;DR: y"}])
    with pytest.raises(ValueError, match=r"not_hh\.jsonl.*'hh_rlhf'.*row 2.*Assistant"):
        data.load_examples(path, "hh_rlhf", cache_dir=cache_dir)
    # A list where a string belongs (arrow cannot type the column: read row by row).
    path = _write(tmp_path / "mixed.jsonl", [ok, {"chosen": ["x"], "rejected": "y"}])
    with pytest.raises(ValueError, match=r"mixed\.jsonl.*row 1.*string"):
        data.load_examples(path, "hh_rlhf", cache_dir=cache_dir)
    # Strings where message lists belong.
    path = _write(tmp_path / "uf.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"uf\.jsonl.*row 0.*messages"):
        data.load_examples(path, "ultrafeedback", tokenizer=_make_tokenizer(), cache_dir=cache_dir)
    # Numbers where strings belong.
    path = _write(tmp_path / "num.csv", [{"query": 1, "reference_response": 2}])
    with pytest.raises(ValueError, match=r"num\.csv.*row 0.*'query'"):
        data.load_examples(path, "tldr_sft", cache_dir=cache_dir)


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_examples(missing, "tldr_sft")
    with pytest.raises(FileNotFoundError, match="relative/dir/file"):
        data.load_table("relative/dir/file")


def test_bad_rows_are_skipped_counted_and_warned_once(tmp_path, cache_dir, caplog, tokenizer):
    rows = [dict(r) for r in SFT_ROWS] + [
        {"query": "q1", "reference_response": None},
        {"query": None, "reference_response": " r"},
        {"query": "q2", "reference_response": "   "},
        {"query": "q3", "reference_response": ""},
        {"query": "", "reference_response": " r"},
    ]
    path = _write(tmp_path / "holes.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        arrays, stats = data.load(
            path, "tldr_sft", tokenizer, max_prompt_len=64, max_response_len=8, cache_dir=cache_dir
        )
    assert stats.skipped == {"missing_field": 2, "empty_response": 2, "empty_prompt": 1}
    assert (stats.num_rows, stats.num_examples) == (8, 3)
    assert arrays["input_ids"].shape == (3, 72)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(messages) == 3, messages
    assert any("holes.jsonl" in m and "skipped 2 of 8" in m and "missing" in m for m in messages)
    # A row missing a key entirely (jsonl) counts as a missing field too.
    path = _write(tmp_path / "nokey.jsonl", SFT_ROWS + [{"query": "q"}])
    _, stats = data.load_examples(path, "tldr_sft", cache_dir=cache_dir)
    assert stats.skipped == {"missing_field": 1}
    # HH: the two dialogues do not share a prompt.
    path = _write(
        tmp_path / "hh.jsonl",
        [
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
            {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        ],
    )
    examples, stats = data.load_examples(path, "hh_rlhf", cache_dir=cache_dir)
    assert len(examples) == 1 and stats.skipped == {"prompt_mismatch": 1, "empty_response": 1}
    # Nothing usable at all is an error.
    path = _write(tmp_path / "empty.jsonl", [{"query": "q", "reference_response": ""}])
    with pytest.raises(ValueError, match="no usable rows"):
        data.load_examples(path, "tldr_sft", cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------------
# Tokenization and collation.


def _check_layout(arrays, prefix, p, r):
    ids, mask, pos = (arrays[prefix + k] for k in ("input_ids", "attention_mask", "positions"))
    resp_mask = arrays[prefix + "response_mask"]
    n = ids.shape[0]
    assert ids.shape == mask.shape == pos.shape == (n, p + r)
    assert ids.dtype == mask.dtype == pos.dtype == np.int32 and resp_mask.dtype == np.float32
    assert resp_mask.shape == (n, r)
    np.testing.assert_array_equal(pos, np.maximum(np.cumsum(mask, -1) - 1, 0))
    np.testing.assert_array_equal(ids[:, :p], arrays["prompt_ids"])
    np.testing.assert_array_equal(mask[:, :p], arrays["prompt_mask"])
    np.testing.assert_array_equal(mask[:, p:], resp_mask.astype(np.int32))
    np.testing.assert_array_equal(ids[mask == 0], PAD)
    for i in range(n):
        pm, rm = mask[i, :p], mask[i, p:]
        k, m = int(pm.sum()), int(rm.sum())
        assert (pm[: p - k] == 0).all() and (pm[p - k :] == 1).all()  # Left-padded prompt.
        assert (rm[:m] == 1).all() and (rm[m:] == 0).all()  # Right-padded response.
        resp = ids[i, p : p + m]
        assert (resp[:-1] != EOS).all()  # At most one EOS, at the end.


def test_sft_layout_padding_positions_and_eos(tokenizer):
    examples = [data.SFTExample("ab", " c"), data.SFTExample("hello there prompt", " a longer answer")]
    p, r = 24, 20
    arrays, stats = data.tokenize_sft(examples, tokenizer, p, r)
    assert set(arrays) == set(data.SFT_KEYS)
    _check_layout(arrays, "", p, r)
    for i, e in enumerate(examples):
        prompt_ids = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        resp_ids = tokenizer(e.response, add_special_tokens=False)["input_ids"] + [EOS]
        np.testing.assert_array_equal(arrays["prompt_ids"][i, p - len(prompt_ids) :], prompt_ids)
        assert (arrays["prompt_ids"][i, : p - len(prompt_ids)] == PAD).all()
        np.testing.assert_array_equal(arrays["input_ids"][i, p : p + len(resp_ids)], resp_ids)
        assert arrays["response_mask"][i].sum() == len(resp_ids)  # EOS counted.
        assert arrays["positions"][i, p - len(prompt_ids)] == 0
        assert arrays["positions"][i, p] == len(prompt_ids)  # Response continues the positions.
    assert stats.responses_truncated == 0 and stats.prompts_truncated == 0


def test_response_truncation_and_drop(tokenizer):
    examples = [data.SFTExample("p", " a rather long response text here"), data.SFTExample("p", " ok")]
    n_long = len(tokenizer(examples[0].response, add_special_tokens=False)["input_ids"])
    r = n_long  # One short of response + EOS.
    arrays, stats = data.tokenize_sft(examples, tokenizer, 4, r)
    assert stats.responses_truncated == 1
    assert arrays["response_mask"][0].sum() == r and EOS not in arrays["input_ids"][0]  # No EOS.
    assert arrays["input_ids"][1, 4 + int(arrays["response_mask"][1].sum()) - 1] == EOS
    arrays, stats = data.tokenize_sft(examples, tokenizer, 4, r, drop_truncated_responses=True)
    assert arrays["input_ids"].shape[0] == 1 and stats.skipped == {"response_too_long": 1}
    # An EOS inside the response text ends the response there.
    arrays, _ = data.tokenize_sft([data.SFTExample("p", " yes<eos> junk")], tokenizer, 4, 16)
    resp = arrays["input_ids"][0, 4:][arrays["response_mask"][0] == 1]
    assert tokenizer.decode(resp[:-1]) == " yes" and resp[-1] == EOS


def test_prompt_truncation_keeps_the_end(tokenizer):
    long_prompt = "\n\nHuman: " + "blah " * 100 + "the end\n\nAssistant:"
    p = 24
    arrays, stats = data.tokenize_sft([data.SFTExample(long_prompt, " x")], tokenizer, p, 4)
    assert stats.prompts_truncated == 1 and arrays["prompt_mask"].sum() == p
    assert long_prompt.endswith(_decode(tokenizer, arrays["prompt_ids"][0], arrays["prompt_mask"][0]))
    assert _decode(tokenizer, arrays["prompt_ids"][0], arrays["prompt_mask"][0]).endswith("the end\n\nAssistant:")
    arrays, stats = data.tokenize_sft(
        [data.SFTExample(long_prompt, " x"), data.SFTExample("short", " y")], tokenizer, p, 4, skip_long_prompts=True
    )
    assert arrays["input_ids"].shape[0] == 1 and stats.skipped == {"prompt_too_long": 1}


def test_tldr_truncation_shortens_the_post_body(tokenizer):
    prompt = data.tldr_prompt("r/sub", "A title", " ".join(f"word{i}" for i in range(200)))
    p = 60
    for mode in ("auto", "tldr_post"):
        (ids,), (long,) = data.encode_prompts([prompt], tokenizer, p, prompt_truncation=mode)
        text = tokenizer.decode(ids)
        assert long and len(ids) <= p
        assert text.startswith("SUBREDDIT: r/sub\n\nTITLE: A title\n\nPOST: word0 word1")
        assert text.endswith("\n\nTL;DR:")
        assert prompt.startswith(text[: -len("\n\nTL;DR:")])  # Cut at a word boundary.
    (ids,), _ = data.encode_prompts([prompt], tokenizer, p, prompt_truncation="left")
    text = tokenizer.decode(ids)
    assert len(ids) == p and text.endswith("word199\n\nTL;DR:") and "SUBREDDIT" not in text
    # The header alone does not fit: fall back to keeping the end.
    (ids,), _ = data.encode_prompts([prompt], tokenizer, 8, prompt_truncation="tldr_post")
    assert len(ids) == 8 and tokenizer.decode(ids).endswith("TL;DR:")
    with pytest.raises(ValueError, match="prompt_truncation"):
        data.encode_prompts([prompt], tokenizer, p, prompt_truncation="middle")


def test_bos_tokenizer_gets_one_bos(bos_tokenizer):
    assert data.start_tokens(bos_tokenizer) == [BOS]
    assert data.start_tokens(bos_tokenizer, add_bos=False) == []
    ids, _ = data.encode_prompts(["hello", "<bos>hello", "x " * 50 + "end"], bos_tokenizer, 10)
    assert ids[0][0] == BOS and ids[0][1] != BOS and ids[1] == ids[0]
    assert len(ids[2]) == 10 and ids[2][0] == BOS and bos_tokenizer.decode(ids[2][1:]).endswith("end")
    arrays, _ = data.tokenize_sft([data.SFTExample("hello", " x")], bos_tokenizer, 8, 4)
    assert (arrays["input_ids"][0, 8:] != BOS).all()  # Responses never get start tokens.


def test_pad_must_differ_from_eos(tokenizer):
    examples = [data.SFTExample("p", " r")]
    same = _make_tokenizer()
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="pad_id"):
        data.tokenize_sft(examples, same, 4, 4)
    arrays, _ = data.tokenize_sft(examples, same, 4, 4, pad_id=5)
    assert arrays["prompt_ids"][0, 0] == 5 and arrays["input_ids"][0, -1] == 5
    with pytest.raises(ValueError, match="must differ"):
        data.tokenize_sft(examples, tokenizer, 4, 4, pad_id=EOS)
    none = _make_tokenizer()
    none.pad_token = None
    with pytest.raises(ValueError, match="pad_id"):
        data.tokenize_prompts(["p"], none, 4)


def test_preference_arrays_share_the_prompt(tokenizer):
    examples = [
        data.PreferenceExample("prompt one", " good", " bad answer"),
        data.PreferenceExample("p2", " yes", " no"),
        data.PreferenceExample("prompt one", " again", " x"),
    ]
    p, r = 16, 12
    arrays, _ = data.tokenize_preference(examples, tokenizer, p, r)
    assert set(arrays) == set(data.PREFERENCE_KEYS)
    for side in ("chosen_", "rejected_"):
        _check_layout(arrays, side, p, r)
    for i, e in enumerate(examples):
        for side, text in (("chosen", e.chosen), ("rejected", e.rejected)):
            m = arrays[f"{side}_response_mask"][i] == 1
            resp = arrays[f"{side}_input_ids"][i, p:][m]
            assert tokenizer.decode(resp[:-1]) == text and resp[-1] == EOS
    np.testing.assert_array_equal(arrays["prompt_ids"][0], arrays["prompt_ids"][2])


def test_prompt_only_batches(tokenizer):
    examples = [
        data.PreferenceExample("aa", " x", " y"),
        data.PreferenceExample("b", " x", " y"),
        data.PreferenceExample("aa", " z", " w"),
    ]
    arrays, _ = data.tokenize_prompts(examples, tokenizer, 8, unique=True)
    assert set(arrays) == set(data.PROMPT_KEYS) and arrays["prompt_ids"].shape == (2, 8)
    assert _decode(tokenizer, arrays["prompt_ids"][1], arrays["prompt_mask"][1]) == "b"
    np.testing.assert_array_equal(arrays["prompt_positions"], np.maximum(np.cumsum(arrays["prompt_mask"], -1) - 1, 0))
    full, _ = data.tokenize_preference(examples, tokenizer, 8, 4)
    only = data.prompt_only(full)
    everything, _ = data.tokenize_prompts(examples, tokenizer, 8)
    for k in data.PROMPT_KEYS:
        np.testing.assert_array_equal(only[k], everything[k])


def test_collate_rejects_overlong_rows():
    with pytest.raises(ValueError, match="max_prompt_len"):
        data.collate([[5] * 5], [[6]], 4, 4, PAD)
    with pytest.raises(ValueError, match="max_response_len"):
        data.collate([[5]], [[6] * 5], 4, 4, PAD)


def test_load_and_config_end_to_end(tmp_path, cache_dir, tokenizer):
    path = _write(tmp_path / "sft.parquet", SFT_ROWS)
    cfg = data.default_config()
    cfg.path = path
    cfg.format = "tldr_sft"
    cfg.max_prompt_len = 48
    cfg.max_response_len = 8
    cfg.cache_dir = cache_dir
    cfg.pad_id = PAD
    arrays, stats = data.from_config(cfg, tokenizer)
    assert arrays["input_ids"].shape == (3, 56) and stats.num_examples == 3
    prompts, _ = data.from_config(cfg, tokenizer, prompts_only=True)
    assert set(prompts) == set(data.PROMPT_KEYS) and prompts["prompt_ids"].shape == (3, 48)
    direct, _ = data.load_sft(path, tokenizer, max_prompt_len=48, max_response_len=8, cache_dir=cache_dir)
    for k in direct:
        np.testing.assert_array_equal(direct[k], arrays[k])
    with pytest.raises(ValueError, match="is a sft format"):
        data.load_preference(path, tokenizer, format="tldr_sft", max_prompt_len=48, max_response_len=8)


# ------------------------------------------------------------------------------------------------
# Splitting and batching.


def _arrays(n):
    return {"x": np.arange(n), "y": np.arange(n) * 10}


def test_shuffling_is_deterministic_per_seed():
    def epoch(seed, epochs=1):
        it = data.BatchIterator(_arrays(20), 4, seed)
        return np.concatenate([next(it)["x"] for _ in range(5 * epochs)])

    np.testing.assert_array_equal(epoch(0), epoch(0))
    assert not np.array_equal(epoch(0), epoch(1))
    assert sorted(epoch(3)) == list(range(20))  # Each epoch sees every row once.
    two = epoch(0, epochs=2)
    assert not np.array_equal(two[:20], two[20:]) and sorted(two[20:]) == list(range(20))
    it = data.BatchIterator(_arrays(20), 4, 0)
    np.testing.assert_array_equal(it.order(1), np.random.default_rng([0, 1]).permutation(20))
    batch = next(data.BatchIterator(_arrays(20), 4, 0))
    np.testing.assert_array_equal(batch["y"], batch["x"] * 10)  # Arrays stay aligned.


def test_iterator_state_restore_resumes_exactly():
    it = data.BatchIterator(_arrays(10), 3, seed=7)  # 3 batches per epoch, one row dropped.
    assert len(it) == 3
    for _ in range(4):
        next(it)
    state = it.state()
    assert state == {"epoch": 1, "index": 1}
    expected = [next(it)["x"] for _ in range(6)]
    resumed = data.BatchIterator(_arrays(10), 3, seed=7)
    resumed.restore(json.loads(json.dumps(state)))  # The state survives JSON.
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["x"], e)
    with pytest.raises(ValueError, match="bad iterator state"):
        resumed.restore({"epoch": 0, "index": 9})


def test_iterator_process_slices_and_last_batch():
    full = data.BatchIterator(_arrays(16), 8, seed=1)
    parts = [data.BatchIterator(_arrays(16), 8, seed=1, process_index=i, process_count=4) for i in range(4)]
    for _ in range(4):
        expected = next(full)["x"]
        got = [next(p)["x"] for p in parts]
        assert all(len(g) == 2 for g in got)
        np.testing.assert_array_equal(np.concatenate(got), expected)
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.BatchIterator(_arrays(16), 6, process_count=4)
    it = data.BatchIterator(_arrays(10), 4, seed=0, drop_last=False, num_epochs=1)
    sizes = [len(b["x"]) for b in it]
    assert sizes == [4, 4, 2]
    it = data.BatchIterator(_arrays(10), 4, shuffle=False, drop_last=False)
    last = [next(it) for _ in range(3)][-1]
    padded, valid = data.pad_batch(last, 4)
    assert valid == 2 and list(padded["x"]) == [8, 9, 8, 8]
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.BatchIterator(_arrays(3), 4)


def test_train_eval_split_groups_prompts():
    examples = [data.PreferenceExample(f"p{i % 5}", " a", " b") for i in range(20)]
    train, evals = data.train_eval_split(examples, 0.2, seed=0)
    assert len(train) + len(evals) == 20 and len(evals) == 4
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    again, evals2 = data.train_eval_split(examples, 0.2, seed=0)
    assert evals2 == evals and again == train


# ------------------------------------------------------------------------------------------------
# Real data (../shared/data).


def _shared(name):
    """The offline sample `name` where shared_data_dir() finds it ($RTO_JAX_SHARED_DATA, else ../shared/data)."""
    if reason := shared_data_skip_reason():
        pytest.skip(reason)
    return str(shared_data_dir() / name)


def test_real_tldr_sft(cache_dir, tokenizer):
    path = _shared("tldr_sft_oai1b.csv")
    examples, stats = data.load_examples(path, "tldr_sft", max_rows=200, cache_dir=cache_dir)
    assert len(examples) == 200 and stats.skipped == {}
    assert all(e.prompt.startswith("SUBREDDIT: r/") and e.prompt.endswith("TL;DR:") for e in examples)
    assert all(e.response.strip() for e in examples)
    arrays, _ = data.load(
        path, "tldr_sft", tokenizer, max_prompt_len=512, max_response_len=64, max_rows=200, cache_dir=cache_dir
    )
    assert arrays["input_ids"].shape == (200, 576)
    _check_layout(arrays, "", 512, 64)
    for i in range(0, 200, 37):
        text = _decode(tokenizer, arrays["prompt_ids"][i], arrays["prompt_mask"][i])
        assert text.startswith("SUBREDDIT: r/") and text.endswith("\n\nTL;DR:")


def test_real_tldr_comparisons(cache_dir, tokenizer):
    path = _shared("tldr_comparisons_10k.parquet")
    examples, stats = data.load_examples(path, "tldr_preference", max_rows=200, cache_dir=cache_dir)
    assert len(examples) == 200 and stats.skipped == {}
    assert all(e.prompt.startswith("SUBREDDIT: r/") and e.prompt.endswith("\n\nTL;DR:") for e in examples)
    assert all("\n\nPOST: " in e.prompt and "\n\nTITLE: " in e.prompt for e in examples)
    assert not any(e.chosen.startswith("TL;DR") or e.rejected.startswith("TL;DR") for e in examples)
    arrays, _ = data.load(
        path, "tldr_preference", tokenizer, max_prompt_len=512, max_response_len=64, max_rows=200, cache_dir=cache_dir
    )
    assert arrays["chosen_input_ids"].shape == arrays["rejected_input_ids"].shape == (200, 576)
    prompts, _ = data.load_prompts(
        path, tokenizer, format="tldr_preference", max_prompt_len=512, max_rows=200, cache_dir=cache_dir
    )
    assert prompts["prompt_ids"].shape[0] == len({e.prompt for e in examples}) < 200


def test_real_hh_rlhf(cache_dir, tokenizer):
    path = _shared("hh_rlhf_harmless_test.jsonl.gz")
    with gzip.open(path, "rt") as f:
        raw = [json.loads(next(f)) for _ in range(200)]

    def blank_last_turn(r):
        return any(not r[k].rsplit("\n\nAssistant:", 1)[1].strip() for k in ("chosen", "rejected"))

    empty = sum(map(blank_last_turn, raw))
    examples, stats = data.load_examples(path, "hh_rlhf", max_rows=200, cache_dir=cache_dir)
    assert len(examples) == 200 - empty and stats.num_rows == 200
    assert sum(stats.skipped.values()) == empty
    for e, r in zip(examples, [r for r in raw if not blank_last_turn(r)]):
        assert e.prompt.endswith("\n\nAssistant:") and e.prompt.startswith("\n\nHuman:")
        assert e.prompt + e.chosen == r["chosen"] and e.prompt + e.rejected == r["rejected"]
    arrays, _ = data.load(
        path, "hh_rlhf", tokenizer, max_prompt_len=256, max_response_len=64, max_rows=200, cache_dir=cache_dir
    )
    for i in range(0, arrays["prompt_ids"].shape[0], 29):
        assert _decode(tokenizer, arrays["prompt_ids"][i], arrays["prompt_mask"][i]).endswith("Assistant:")
