"""Bad data files are one DataError each: one line naming the file (as given) and, where there is
one, the row and column. And the prompt-truncation message says what was kept. CPU, fast."""

from __future__ import annotations

import gzip
import json
import logging

import pandas as pd
import pytest

from rto_jax import data
from rto_jax.data.loader import DataFileNotFoundError
from rto_jax.errors import DataError
from rto_jax.pipeline.tasks import train_bpe

GOOD = {"query": "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: body\n\nTL;DR:", "reference_response": " sum"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [
        "SUBREDDIT: r/test TITLE: a title POST: this is the post body TL;DR: a summary",
        "Human: hi Assistant: hello",
    ]
    return train_bpe(texts * 5, 300, tmp_path_factory.mktemp("tok") / "bpe")


def _write(path, content):
    """Writes str (UTF-8) or bytes; returns the path as a str."""
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _error(path, format="tldr_sft", cache_dir=None, **kwargs) -> DataError:  # pylint: disable=redefined-builtin
    """The DataError that loading `path` raises; checks that it is one line starting with the path."""
    with pytest.raises(DataError) as info:
        data.load_examples(path, format, cache_dir=cache_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert info.value.source == str(path)
    return info.value


# ------------------------------------------------------------------------------------------------
# Missing columns.


def test_missing_column_names_it_the_columns_present_and_column_map(tmp_path, cache_dir):
    path = _write(tmp_path / "prefs.jsonl", _jsonl([{"prompt": "p", "chosen": " c", "worse": " r"}]))
    e = _error(path, "tldr_preference", cache_dir)
    message = str(e)
    assert "missing column 'rejected'" in message
    assert "'tldr_preference'" in message
    assert "['prompt', 'chosen', 'worse']" in message  # The columns the file has.
    assert "--config.data.preference.column_map='rejected=COLUMN'" in message
    assert e.row == 0
    # The way out it names works.
    examples, _ = data.load_examples(path, "tldr_preference", cache_dir=cache_dir, column_map={"rejected": "worse"})
    assert examples == [data.PreferenceExample("p", " c", " r")]


def test_missing_sft_column_points_at_the_sft_column_map(tmp_path, cache_dir):
    path = _write(tmp_path / "sft.csv", "query,answer\nq,a\n")
    message = str(_error(path, "tldr_sft", cache_dir))
    assert "missing column 'reference_response' or 'reference_responses'" in message
    assert "--config.data.sft.column_map='response=COLUMN'" in message


# ------------------------------------------------------------------------------------------------
# Unreadable files.


def test_csv_with_an_unterminated_quote(tmp_path, cache_dir):
    path = _write(tmp_path / "quote.csv", 'query,reference_response\nq1,r1\n"q2 never closed,r2\nq3,r3\n')
    e = _error(path, cache_dir=cache_dir)
    assert e.row == 1 and "row 1: line 3:" in str(e)
    assert "unterminated quote" in str(e)


def test_csv_with_a_ragged_row(tmp_path, cache_dir):
    path = _write(tmp_path / "ragged.csv", "query,reference_response\nq1,r1\nq2,r2\nq3,r3,extra,more\n")
    e = _error(path, cache_dir=cache_dir)
    assert e.row == 2
    assert "line 4 has 4 fields but the header has 2" in str(e)


def test_invalid_json_lines_names_row_and_line(tmp_path, cache_dir):
    # A blank line in between: row 1 (0-based, the second row) is on line 3.
    path = _write(tmp_path / "bad.jsonl", json.dumps(GOOD) + "\n\n" + '{"query": "q", oops}\n')
    e = _error(path, cache_dir=cache_dir)
    assert e.row == 1
    assert "row 1: line 3, character 16: invalid JSON: Expecting property name" in str(e)


def test_invalid_json_array_names_row_and_line(tmp_path, cache_dir):
    path = _write(tmp_path / "bad.json", "[\n" + json.dumps(GOOD) + ',\n{"query": "q", oops}\n]\n')
    e = _error(path, cache_dir=cache_dir)
    assert e.row == 1
    assert "row 1: line 3, character 16: invalid JSON: Expecting property name" in str(e)


@pytest.mark.parametrize(
    "name, content, row, kind",
    [
        ("numbers.json", "[1, 2]", 0, "number 1"),
        ("lists.jsonl", _jsonl([GOOD]) + '["a", "b"]\n', 1, "array ['a', 'b']"),
        ("str.json", '"x"', 0, "string 'x'"),
    ],
)
def test_json_rows_that_are_not_objects(tmp_path, cache_dir, name, content, row, kind):
    e = _error(_write(tmp_path / name, content), cache_dir=cache_dir)
    assert e.row == row
    assert f"row {row}: expected a JSON object (named fields), got a JSON {kind}" in str(e)


def test_parquet_that_is_not_parquet(tmp_path, cache_dir):
    path = _write(tmp_path / "data.parquet", _jsonl([GOOD]))
    assert "not a readable parquet file" in str(_error(path, cache_dir=cache_dir))


def test_gz_that_is_not_gzip(tmp_path, cache_dir):
    path = _write(tmp_path / "data.jsonl.gz", _jsonl([GOOD]))
    assert "cannot be read or decompressed: BadGzipFile" in str(_error(path, cache_dir=cache_dir))


def test_unknown_file_type(tmp_path, cache_dir):
    path = _write(tmp_path / "data.txt", "hello")
    assert "unknown data file type" in str(_error(path, cache_dir=cache_dir))


def test_missing_file_is_a_data_error_and_a_file_not_found_error(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataFileNotFoundError) as info:
        data.load_examples(path, "tldr_sft")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    assert str(info.value) == f"{path}: no such data file or folder"


# ------------------------------------------------------------------------------------------------
# Undecodable bytes.


def test_binary_file_named_jsonl(tmp_path, cache_dir):
    content = b'{"query": "q"}\n' + bytes(range(256))
    e = _error(_write(tmp_path / "model.jsonl", content), cache_dir=cache_dir)
    offset = len(b'{"query": "q"}\n') + 0x80  # The first byte >= 0x80 (bytes 0..0x7f are ASCII).
    message = str(e)
    assert f"not UTF-8 text: byte 0x80 at byte offset {offset}" in message
    assert "(line 3)" in message  # bytes(range(256)) holds a newline (0x0a).
    assert "binary file" in message


def test_latin1_bytes_in_a_utf8_csv(tmp_path, cache_dir):
    content = "query,reference_response\nq1,r1\ncafé,r2\n".encode("latin-1")
    e = _error(_write(tmp_path / "latin.csv", content), cache_dir=cache_dir)
    offset = content.index(b"\xe9")
    message = str(e)
    assert f"byte 0xe9 at byte offset {offset} (line 3)" in message
    assert "Latin-1" in message


def test_latin1_bytes_in_jsonl_fail_on_loading_not_on_reading_a_row(tmp_path, cache_dir):
    # Arrow's JSON reader keeps these bytes; without the check they fail later, in row iteration.
    content = (_jsonl([GOOD]) + '{"query": "café", "reference_response": " r"}\n').encode("latin-1")
    path = _write(tmp_path / "latin.jsonl", content)
    with pytest.raises(
        DataError, match=r"latin\.jsonl: row 1: not UTF-8 text: byte 0xe9 at byte offset \d+ \(line 2\)"
    ):
        data.load_table(path, cache_dir=cache_dir)


def test_latin1_bytes_in_gzipped_jsonl(tmp_path, cache_dir):
    content = (_jsonl([GOOD]) + '{"query": "café", "reference_response": " r"}\n').encode("latin-1")
    e = _error(_write(tmp_path / "latin.jsonl.gz", gzip.compress(content)), cache_dir=cache_dir)
    offset = content.index(b"\xe9")
    assert e.row == 1
    assert f"byte offset {offset} of the decompressed data (line 2)" in str(e)


# ------------------------------------------------------------------------------------------------
# Empty files.


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("zero.jsonl", "", "the file is empty (0 bytes)"),
        ("zero.csv", "", "the file is empty (0 bytes)"),
        ("zero.parquet", "", "the file is empty (0 bytes)"),
        ("blank.jsonl", "\n  \n", "the file is empty (no rows)"),
        ("blank.csv", "\n\n", "the file is empty (no header, no rows)"),
        ("array.json", "[ ]\n", "an empty JSON array (no rows)"),
        (
            "header.csv",
            "query,reference_response\n",
            "only a header line ['query', 'reference_response'] and no data rows",
        ),
    ],
)
def test_empty_files(tmp_path, cache_dir, name, content, expected):
    assert str(_error(_write(tmp_path / name, content), cache_dir=cache_dir)).endswith(expected)


def test_parquet_without_rows(tmp_path, cache_dir):
    path = str(tmp_path / "none.parquet")
    pd.DataFrame({"query": pd.Series([], dtype=str), "reference_response": pd.Series([], dtype=str)}).to_parquet(path)
    assert "no rows (a parquet file with columns ['query', 'reference_response'])" in str(
        _error(path, cache_dir=cache_dir)
    )


def test_no_usable_rows_after_skipping(tmp_path, cache_dir):
    rows = [{"query": "q", "reference_response": ""}, {"query": None, "reference_response": " r"}]
    message = str(_error(_write(tmp_path / "holes.jsonl", _jsonl(rows)), cache_dir=cache_dir))
    assert "no usable rows in format 'tldr_sft': all 2 rows were skipped" in message
    assert "1 because a response is empty" in message and "1 because a required field is missing" in message


def test_empty_folder_and_folder_with_a_bad_file(tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "a folder without data files" in str(_error(str(empty), cache_dir=cache_dir))
    folder = tmp_path / "parts"
    folder.mkdir()
    _write(folder / "a.csv", "query,reference_response\nq1,r1\n")
    _write(folder / "b.csv", "query,reference_response\nq2,r2,x,y\n")
    with pytest.raises(DataError) as info:
        data.load_examples(str(folder), "tldr_sft", cache_dir=cache_dir)
    assert str(info.value).startswith(f"{folder / 'b.csv'}: row 0: line 2 has 4 fields")


# ------------------------------------------------------------------------------------------------
# Wrong types.


@pytest.mark.parametrize(
    "row, format, column, expected",
    [
        ({"query": 5, "reference_response": " r"}, "tldr_sft", "query", "expected a string, got int 5"),
        ({"query": "q", "reference_response": ["a", "b"]}, "tldr_sft", "reference_response", "got list ['a', 'b']"),
        ({"prompt": {"text": "p"}, "chosen": " c", "rejected": " r"}, "tldr_preference", "prompt", "got dict"),
        (
            {"info": "a post", "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0},
            "openai_comparisons",
            "info",
            "info: expected a struct/dict, got str 'a post'",
        ),
        (
            {
                "info": {"post": "p", "title": "t", "subreddit": "s"},
                "summaries": [{"text": " a"}, {"text": 3}],
                "choice": 0,
            },
            "openai_comparisons",
            "summaries",
            "summaries[1].text: expected a string, got int 3",
        ),
    ],
)
def test_wrong_types_name_row_column_expected_and_got(tmp_path, cache_dir, row, format, column, expected):  # pylint: disable=redefined-builtin
    first = {"tldr_sft": GOOD, "tldr_preference": {"prompt": "p", "chosen": " c", "rejected": " r"}}.get(format)
    rows = ([first] if first else []) + [row]  # The bad row is the last one.
    e = _error(_write(tmp_path / "typed.jsonl", _jsonl(rows)), format, cache_dir)
    assert (e.row, e.column) == (len(rows) - 1, column)
    assert f"row {len(rows) - 1}, column {column!r}: " in str(e)
    assert expected in str(e)


def test_a_number_in_a_csv_text_column(tmp_path, cache_dir):
    # pandas types an all-number column as numbers.
    e = _error(_write(tmp_path / "num.csv", "query,reference_response\n11,r\n12,r2\n"), cache_dir=cache_dir)
    assert (e.row, e.column) == (0, "query")
    assert "expected a string, got int" in str(e)


def test_chat_messages_of_the_wrong_shape(tmp_path, cache_dir, tokenizer):
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]
    path = _write(tmp_path / "uf.jsonl", _jsonl([{"chosen": ok, "rejected": ok}, {"chosen": ok, "rejected": bad}]))
    e = _error(path, "ultrafeedback", cache_dir, tokenizer=tokenizer)
    assert (e.row, e.column) == (1, "rejected")
    assert "message 1: content: expected a string, got int 7" in str(e)


# ------------------------------------------------------------------------------------------------
# Hub datasets.


def _offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_unreachable_hub_dataset_names_the_id_and_the_offline_alternatives(monkeypatch, tmp_path):
    _offline(monkeypatch)
    e = _error("trl-lib/tldr-preference", "tldr_preference", str(tmp_path / "cache"))
    message = str(e)
    assert "the Hugging Face Hub cannot be reached" in message
    assert "local .jsonl/.json/.parquet/.csv file or folder" in message
    assert "--config.data.sft.path=FILE" in message and "--config.data.preference.path=FILE" in message
    assert "configs/rto_tldr.py:tiny" in message and "smollm2" in message and "../shared/data" in message


def test_hub_errors_that_are_not_the_network_keep_their_traceback(monkeypatch):
    import datasets

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(RuntimeError, match="a bug in the loader"):
        data.load_examples("owner/name", "tldr_sft")


def test_a_loader_bug_on_a_good_file_is_not_turned_into_a_data_error(monkeypatch, tmp_path, cache_dir):
    import datasets

    def broken(*args, **kwargs):
        raise ValueError("a bug in the loader")

    path = _write(tmp_path / "good.csv", "query,reference_response\nq,r\n")
    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(ValueError, match="a bug in the loader") as info:
        data.load_examples(path, "tldr_sft", cache_dir=cache_dir)
    assert not isinstance(info.value, DataError)


# ------------------------------------------------------------------------------------------------
# The truncation message says what was kept.

TLDR = data.tldr_prompt("r/sub", "A title", " ".join(f"word{i}" for i in range(200)))
DIALOGUE = "\n\nHuman: " + "blah " * 100 + "the end\n\nAssistant:"


def _truncation_log(caplog, tokenizer, mode, p=60):
    examples = [data.SFTExample(TLDR, " x"), data.SFTExample(DIALOGUE, " y"), data.SFTExample("short", " z")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rto_jax.data.tokenize"):
        arrays, stats = data.tokenize_sft(examples, tokenizer, p, 4, prompt_truncation=mode)
    messages = [r.getMessage() for r in caplog.records if "tokens truncated" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "(end kept)" not in messages[0]  # The old message, whatever was kept.
    return messages[0], arrays, stats


def test_truncation_message_left(caplog, tokenizer):
    message, arrays, stats = _truncation_log(caplog, tokenizer, "left")
    assert stats.prompts_truncated_by == {"left": 2}
    assert (
        "<examples>: 2 prompts longer than max_prompt_len=60 tokens truncated (prompt_truncation='left'): " in message
    )
    assert "2 prompts: cut from the left (the beginning dropped, the last tokens that fit kept)" in message
    assert "POST shortened" not in message
    kept = tokenizer.decode(arrays["prompt_ids"][0][arrays["prompt_mask"][0] == 1])
    assert kept.endswith("TL;DR:") and "SUBREDDIT" not in kept  # What the message says happened.


def test_truncation_message_tldr_post(caplog, tokenizer):
    message, arrays, stats = _truncation_log(caplog, tokenizer, "tldr_post")
    assert stats.prompts_truncated_by == {"tldr_post": 1, "left": 1}
    assert "(prompt_truncation='tldr_post')" in message
    assert "1 TL;DR prompt: POST shortened at a word boundary (SUBREDDIT, TITLE and the final 'TL;DR:' kept)" in message
    assert "1 prompt not in the TL;DR layout: cut from the left (the beginning dropped" in message
    kept = tokenizer.decode(arrays["prompt_ids"][0][arrays["prompt_mask"][0] == 1])
    assert kept.startswith("SUBREDDIT: r/sub\n\nTITLE: A title\n\nPOST: word0") and kept.endswith("TL;DR:")


def test_truncation_message_auto(caplog, tokenizer):
    message, _, stats = _truncation_log(caplog, tokenizer, "auto")
    assert stats.prompts_truncated_by == {"tldr_post": 1, "left": 1} and stats.prompts_truncated == 2
    assert "(prompt_truncation='auto': 'tldr_post' for prompts in the TL;DR layout, 'left' for the others)" in message
    assert "1 TL;DR prompt: POST shortened at a word boundary" in message
    assert "1 prompt not in the TL;DR layout: cut from the left" in message


def test_truncation_message_when_the_tldr_header_alone_does_not_fit(caplog, tokenizer):
    message, _, stats = _truncation_log(caplog, tokenizer, "auto", p=8)
    assert stats.prompts_truncated_by == {"left": 1, "left_header": 1}
    assert "1 TL;DR prompt whose SUBREDDIT, TITLE and 'TL;DR:' alone do not fit: cut from the left instead" in message
    assert "SUBREDDIT and TITLE included, dropped" in message
