"""Loading (hub id or local file, through `datasets`), splitting, and a resumable batch iterator.

  arrays, stats = load(path, "tldr_sft", tokenizer, max_prompt_len=512, max_response_len=53)
  it = BatchIterator(arrays, batch_size=64, seed=0)
  batch = next(it); ckpt["data"] = it.state(); ...; it.restore(ckpt["data"])

`path` is a local file (.jsonl, .json, .parquet, .csv, optionally .gz) or a folder of them, or a
Hugging Face hub dataset id (then `split`, `name` and `revision` apply). A path that looks local
(exists, starts with '/', '.', '~', or ends with a data-file suffix) and does not exist raises
DataFileNotFoundError (a DataError and a FileNotFoundError); it is never sent to the hub.

Bad data raises `rto_jax.errors.DataError`: one line naming the path as given and, where there is
one, the row (0-based, a CSV header not counted) and column. Missing columns, unreadable CSV / JSON /
parquet, bytes that are not UTF-8 (byte offset and line), empty files, values of the wrong type, no
usable rows, a hub dataset that cannot be reached. `datasets` reads the files; only when it fails
(or loads no rows, or strings that are not UTF-8) is the file read again here, in plain Python, to
say where it is bad. Exceptions that bad input does not cause propagate with their traceback.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rto_jax.data import formats as formats_lib
from rto_jax.data import tokenize as tok
from rto_jax.errors import DataError

__all__ = [
    "BatchIterator",
    "DataFileNotFoundError",
    "default_config",
    "from_config",
    "load",
    "load_examples",
    "load_preference",
    "load_prompts",
    "load_sft",
    "load_table",
    "pad_batch",
    "train_eval_split",
]


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A local data path that does not exist (a DataError, and a FileNotFoundError for callers that
    catch that)."""


_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def _builder(path: str) -> str | None:
    """The `datasets` builder of a local data file from its suffix(es), or None."""
    name = path.lower()
    for comp in _COMPRESSION:
        name = name.removesuffix(comp)
    return _BUILDERS.get(os.path.splitext(name)[1])


def _looks_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.startswith(("/", ".", "~"))
        or _builder(path) is not None
        or path.count("/") >= 2  # Hub ids are "owner/name".
    )


# ----------------------------------------------------------------------------------------------
# Reading local files, and saying where a bad one is bad.

_SUFFIXES = "'.jsonl', '.json', '.parquet' or '.csv' (optionally compressed: .gz, .bz2, .xz, .zst)"
_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", type(None): "null"}


# A compressed file that is not (gzip.BadGzipFile is an OSError) or is cut short.
_DECOMPRESSION_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError)


def _one_line(text: Any, limit: int = 300) -> str:
    """`text` (e.g. a library's error message) on one line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(source: str, local_root: str, local: str) -> str:
    """The name to show for file `local` inside the folder `source` (as the user gave it)."""
    return source if local == local_root else os.path.join(source, os.path.relpath(local, local_root))


def _read_bytes(source: str, local: str) -> bytes:
    """The (decompressed) bytes of a local file; DataError when it cannot be read or decompressed."""
    name = local.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(local, "rb") as f:
                return f.read()
        if name.endswith(".bz2"):
            with bz2.open(local, "rb") as f:
                return f.read()
        if name.endswith(".xz"):
            with lzma.open(local, "rb") as f:
                return f.read()
        if name.endswith(".zst"):
            import zstandard  # pylint: disable=import-outside-toplevel

            with open(local, "rb") as f:
                return zstandard.ZstdDecompressor().stream_reader(f).read()
        with open(local, "rb") as f:
            return f.read()
    except (*_DECOMPRESSION_ERRORS, OSError) as e:
        raise DataError(source, f"cannot be read or decompressed: {type(e).__name__}: {_one_line(e)}") from e


def _read_text(source: str, local: str, *, lines_are_rows: bool = False) -> str:
    """The UTF-8 text of a local file; DataError naming the byte offset and line of the first byte
    that is not UTF-8 (and its row when `lines_are_rows`, every non-blank line a row: JSON lines)."""
    raw = _read_bytes(source, local)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        row = None
        if lines_are_rows and not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):  # Not a JSON array.
            row = sum(1 for chunk in raw[: e.start].split(b"\n")[:-1] if chunk.strip())
        decompressed = " of the decompressed data" if local.lower().endswith(_COMPRESSION) else ""
        if b"\x00" in raw[:4096]:
            hint = "it looks like a binary file, not text"
        else:
            hint = "save it as UTF-8 (it may be Latin-1 / Windows-1252 text)"
        raise DataError(
            source,
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start}{decompressed} (line {line}) "
            f"cannot be decoded ({e.reason}); {hint}",
            row=row,
        ) from None
    return text.removeprefix("\ufeff")  # A byte-order mark is not data.


def _json_array_rows(source: str, text: str) -> list:
    """The elements of a JSON array, parsed one by one so that an error names its row."""
    decoder = json.JSONDecoder()
    rows: list = []
    n = len(text)

    def skip(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    def fail(pos: int, what: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        char = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return DataError(source, f"line {line}, character {char}: invalid JSON: {what}", row=len(rows))

    i = skip(skip(0) + 1)  # After the '['.
    if i < n and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                value, i = decoder.raw_decode(text, skip(i))
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from None
            rows.append(value)
            i = skip(i)
            if i < n and text[i] == ",":
                i += 1
            elif i < n and text[i] == "]":
                i += 1
                break
            else:
                raise fail(i, "expected ',' or ']' after the element" if i < n else "the array is never closed")
    i = skip(i)
    if i < n:
        raise DataError(source, f"line {text.count(chr(10), 0, i) + 1}: invalid JSON: text after the array's ']'")
    return rows


def _read_json_rows(source: str, local: str) -> list[dict]:
    """Plain-Python reading of a JSON / JSON-lines file (fallback that keeps row indices).

    DataError for bytes that are not UTF-8, an empty file or array, invalid JSON (row, line and
    character) and rows that are not JSON objects."""
    text = _read_text(source, local, lines_are_rows=True)
    stripped = text.strip()
    if not stripped:
        raise DataError(source, "the file is empty (no rows)")
    if stripped.startswith("["):
        rows = _json_array_rows(source, text)
        if not rows:
            raise DataError(source, "an empty JSON array (no rows)")
    else:
        rows = []
        for i, line in enumerate(text.split("\n")):  # Not splitlines(): JSON strings may hold U+2028.
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if not rows:  # One JSON value over several lines (a pretty-printed object)?
                    try:
                        rows = [json.loads(text)]
                        break
                    except json.JSONDecodeError:
                        pass
                raise DataError(
                    source, f"line {i + 1}, character {e.colno}: invalid JSON: {e.msg}", row=len(rows)
                ) from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            kind = _JSON_TYPES.get(type(row), type(row).__name__)
            raise DataError(
                source, f"expected a JSON object (named fields), got a JSON {kind} {formats_lib._preview(row)}", row=i
            )
    return rows


def _check_csv(source: str, local: str) -> None:
    """DataError naming the row and line of what makes a CSV file unreadable, if anything does:
    bytes that are not UTF-8, a quote that is never closed, a row with more fields than the header,
    no data rows."""
    text = _read_text(source, local)
    if not text.strip():
        raise DataError(source, "the file is empty (no header, no rows)")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, expected, row = None, 0, 0
    while True:
        line = reader.line_num + 1  # The first line of the next record.
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "end of data" in str(e):
                what = "a quoted field starts on this line and its closing '\"' is missing (unterminated quote)"
            else:
                what = f"not valid CSV: {_one_line(e)}"
            raise DataError(source, f"line {line}: {what}", row=None if header is None else row) from None
        if not any(f.strip() for f in fields):
            continue  # Blank lines are skipped (as pandas does).
        if header is None:
            header, expected = fields, len(fields)
            continue
        if row == 0 and len(fields) == len(header) + 1:
            expected = len(fields)  # A first column without a header name: pandas' index column.
        if len(fields) > expected:
            raise DataError(
                source,
                f"line {line} has {len(fields)} fields but the header has {len(header)} {header}; "
                "an unquoted comma in a value?",
                row=row,
            )
        row += 1
    if row == 0:
        raise DataError(source, f"only a header line {header} and no data rows")


def _check_parquet(source: str, local: str) -> None:
    """DataError when a file is not parquet or has no rows."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    try:
        meta = pq.ParquetFile(local).metadata
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid: no parquet magic bytes / bad footer.
        raise DataError(source, f"not a readable parquet file: {_one_line(e)}") from None
    if meta.num_rows == 0:
        raise DataError(source, f"no rows (a parquet file with columns {meta.schema.to_arrow_schema().names})")


def _check_file(source: str, local: str, builder: str) -> list[dict] | None:
    """Reads one local file in plain Python and raises DataError where it is bad; returns the rows
    of a JSON file that is good (None for the other types)."""
    if os.path.getsize(local) == 0:
        raise DataError(source, "the file is empty (0 bytes)")
    if builder == "json":
        return _read_json_rows(source, local)
    if builder == "csv":
        _check_csv(source, local)
    elif builder == "parquet":
        _check_parquet(source, local)
    return None


def _data_files(folder: str) -> list[str]:
    """The data files under a folder (those `datasets` may read from it), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and _builder(f)]
    return found


def _bad_input_cause(error: BaseException) -> BaseException | None:
    """The first exception in `error`'s cause/context chain that bad input causes (an undecodable
    byte, invalid JSON or CSV, invalid arrow data), or None: then it is not the data's fault."""
    import pandas as pd  # pylint: disable=import-outside-toplevel
    import pyarrow as pa  # pylint: disable=import-outside-toplevel

    kinds = (
        UnicodeDecodeError,
        json.JSONDecodeError,
        csv.Error,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        pa.ArrowInvalid,
    )
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return error
        error = error.__cause__ or error.__context__
    return None


def _unreadable(source: str, what: str, error: BaseException) -> None:
    """After our own reading found nothing: a DataError when `error` was caused by bad input (with
    that cause's message), else `error` itself, traceback and all."""
    cause = _bad_input_cause(error)
    if cause is None:
        raise error
    raise DataError(source, f"cannot be read as {what}: {type(cause).__name__}: {_one_line(cause)}") from error


def _looks_like_json_objects(local: str) -> bool:
    """Whether a JSON(-lines) file starts with an object or an array of objects: `datasets` turns an
    array or lines of plain values into a 'text' column instead of failing."""
    name = local.lower()
    if name.endswith((".bz2", ".xz", ".zst")):
        return True  # Not worth decompressing here; the format's column check still fails clearly.
    opener = gzip.open if name.endswith(".gz") else open
    with opener(local, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return head[1:].lstrip().startswith((b"{", b"]"))
    return head.startswith(b"{") or not head


def _check_loaded(source: str, local: str, builder: str | None, table) -> None:
    """What `datasets` lets through: strings that are not UTF-8 (its JSON reader keeps the bytes,
    which then fail on reading a row), JSON values that are not objects, no rows. `builder` is None
    for a folder."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel

    files = [local] if builder else _data_files(local)
    try:
        table.data.validate(full=True)  # Full validation checks that every string is UTF-8.
    except pa.ArrowInvalid:
        for f in files:
            if _builder(f) != "parquet":
                _read_text(_shown(source, local, f), f, lines_are_rows=_builder(f) == "json")
        raise
    if builder == "json" and not _looks_like_json_objects(local):
        _read_json_rows(source, local)
    if len(table) == 0:
        for f in files:
            _check_file(_shown(source, local, f), f, _builder(f))
        raise DataError(source, f"no rows (columns: {table.column_names})")


def _load_local(path: str, *, split: str, cache_dir: str | None):
    """A local file or folder -> a `datasets.Dataset`, or a list of row dicts (JSON that arrow
    cannot type); DataError naming the file, and the row / line, when the data is bad."""
    import datasets  # pylint: disable=import-outside-toplevel
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    from datasets.data_files import EmptyDatasetError  # pylint: disable=import-outside-toplevel
    from datasets.exceptions import DatasetGenerationError  # pylint: disable=import-outside-toplevel

    # What `datasets` raises for a file it cannot read: DatasetGenerationError (wrapping the
    # reader's error), ArrowException (a parquet footer), ValueError ('Instruction "train"
    # corresponds to no data!' for a file without rows), a decompression error. The file is then
    # read here; if it is fine after all, the error is not the data's and propagates unchanged.
    read_errors = (DatasetGenerationError, pa.ArrowException, ValueError, *_DECOMPRESSION_ERRORS)
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        raise DataFileNotFoundError(path, "no such data file or folder")
    if os.path.isdir(local):
        if os.path.exists(os.path.join(local, "dataset_info.json")) or os.path.exists(
            os.path.join(local, "state.json")
        ):
            table = datasets.load_from_disk(local)
            return table[split] if isinstance(table, datasets.DatasetDict) else table
        try:
            table = datasets.load_dataset(local, split=split, cache_dir=cache_dir)
        except EmptyDatasetError:
            raise DataError(path, f"a folder without data files (file names should end with {_SUFFIXES})") from None
        except read_errors as e:
            for f in _data_files(local):
                _check_file(_shown(path, local, f), f, _builder(f))
            _unreadable(path, "a folder of data files", e)
        _check_loaded(path, local, None, table)
        return table
    builder = _builder(local)
    if builder is None:
        raise DataError(path, f"unknown data file type: the name should end with {_SUFFIXES}")
    if os.path.getsize(local) == 0:
        raise DataError(path, "the file is empty (0 bytes)")
    try:
        table = datasets.load_dataset(builder, data_files=local, split="train", cache_dir=cache_dir)
    except read_errors as e:
        rows = _check_file(path, local, builder)
        if rows is not None:
            return rows  # Valid JSON that arrow cannot type (mixed types): parsed row by row.
        _unreadable(path, builder, e)
    _check_loaded(path, local, builder, table)
    return table


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What loading a hub dataset raises when the hub cannot be reached or has no such dataset."""
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError  # pylint: disable=import-outside-toplevel
    from huggingface_hub import errors as hub  # pylint: disable=import-outside-toplevel

    errors: tuple[type[BaseException], ...] = (
        ConnectionError,  # datasets' "Couldn't reach '...' on the Hub" (offline too), OfflineModeIsEnabled
        TimeoutError,
        hub.LocalEntryNotFoundError,  # offline and not in the hub cache
        hub.HfHubHTTPError,  # RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, ...
        DatasetNotFoundError,  # no such dataset, gated, or no such revision
        DataFilesNotFoundError,
    )
    try:
        from huggingface_hub.utils import httpx  # pylint: disable=import-outside-toplevel

        errors += (httpx.TransportError,)  # a connection that fails after the first request
    except ImportError:
        pass
    return errors


def _load_hub(path: str, **kwargs):
    """`datasets.load_dataset(path, ...)`; DataError naming the id and the offline alternatives when
    the hub cannot be reached or has no such dataset."""
    import datasets  # pylint: disable=import-outside-toplevel
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError  # pylint: disable=import-outside-toplevel
    from huggingface_hub import errors as hub  # pylint: disable=import-outside-toplevel

    try:
        return datasets.load_dataset(path, **kwargs)
    except _hub_errors() as e:
        if isinstance(e, (DatasetNotFoundError, DataFilesNotFoundError, hub.RepositoryNotFoundError)):
            problem = "no such dataset on the Hugging Face Hub (or it is gated)"
        else:
            problem = "the Hugging Face Hub cannot be reached (offline?)"
        raise DataError(
            path,
            f"cannot load this hub dataset: {problem} ({type(e).__name__}: {_one_line(e, 200)}). Without the "
            "network, use a local .jsonl/.json/.parquet/.csv file or folder instead (--config.data.sft.path=FILE, "
            "--config.data.preference.path=FILE), or the presets configs/rto_tldr.py:tiny and "
            "configs/rto_tldr.py:smollm2, which read the offline samples in ../shared/data",
        ) from e


def load_table(
    path: str,
    *,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    data_dir: str | None = None,
    max_rows: int | None = None,
    cache_dir: str | None = None,
):
    """A `datasets.Dataset` (or a list of row dicts for JSON that arrow cannot type) of `path`.

    max_rows keeps the first rows only (file order; the hub split's order). Hub only: `name` (the
    dataset config), `revision`, `data_dir` (e.g. "harmless-base" for Anthropic/hh-rlhf).
    Raises DataError (DataFileNotFoundError for a local path that does not exist) for data that
    cannot be read, naming `path` as given and the row / line where there is one.
    """
    path = os.fspath(path)
    if _looks_local(path):
        table = _load_local(path, split=split, cache_dir=cache_dir)
        if isinstance(table, list):
            return table[:max_rows] if max_rows is not None else table
    else:
        hub_split = split if max_rows is None else f"{split}[:{int(max_rows)}]"
        table = _load_hub(path, name=name, split=hub_split, revision=revision, data_dir=data_dir, cache_dir=cache_dir)
    if max_rows is not None and len(table) > max_rows:
        table = table.select(range(int(max_rows)))
    return table


def _iter_rows(table, columns: Sequence[str], source: str) -> Iterator[dict]:
    if isinstance(table, list):
        yield from table
        return
    table = table.select_columns(list(dict.fromkeys(columns)))
    start, size = 0, 1024
    batches = table.iter(batch_size=size)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UnicodeDecodeError as e:  # Strings that are not UTF-8 (local files are checked on loading).
            raise DataError(
                source, f"rows {start}..{start + size - 1}: a string is not UTF-8 text ({_one_line(e)})"
            ) from None
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))
        start += size


def _column_names(table) -> list[str]:
    if isinstance(table, list):
        names: dict[str, None] = {}
        for row in table:
            names.update(dict.fromkeys(row))
        return list(names)
    return list(table.column_names)


def load_examples(
    path: str,
    format: str,  # pylint: disable=redefined-builtin
    *,
    tokenizer: Any = None,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    data_dir: str | None = None,
    max_rows: int | None = None,
    column_map: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
) -> tuple[list, tok.DataStats]:
    """Reads and parses `path` in `format` -> (examples, stats); logs one warning per skip reason.

    Raises DataError (a ValueError; DataFileNotFoundError for a missing local file) naming the path
    and, where there is one, the row and column: data that cannot be read (`load_table`), no rows,
    data not in `format` (formats.FormatError: missing columns, values of the wrong type) and no
    usable row left after skipping.
    """
    fmt = formats_lib.get_format(format)
    table = load_table(
        path,
        split=split,
        name=name,
        revision=revision,
        data_dir=data_dir,
        max_rows=max_rows,
        cache_dir=cache_dir,
    )
    source = str(path) if _looks_local(str(path)) else f"{path}[{split}]"
    if len(table) == 0:  # Local files without rows fail in load_table; this is a hub split.
        raise DataError(source, "no rows")
    column_names = _column_names(table)
    cols = formats_lib.resolve_columns(fmt, column_names, source, column_map)
    examples, skipped = formats_lib.parse_rows(
        _iter_rows(table, list(cols.values()), source),
        fmt,
        source=source,
        column_names=column_names,
        column_map=column_map,
        tokenizer=tokenizer,
    )
    stats = tok.DataStats(source=source, num_rows=len(table), num_examples=len(examples), skipped=skipped)
    stats.log()
    if not examples:
        reasons = ", ".join(f"{n} because {formats_lib.SKIP_REASONS.get(r, r)}" for r, n in skipped.items())
        raise DataError(source, f"no usable rows in format {format!r}: all {len(table)} rows were skipped: {reasons}")
    return examples, stats


def load(
    path: str,
    format: str,  # pylint: disable=redefined-builtin
    tokenizer: Any,
    *,
    max_prompt_len: int,
    max_response_len: int | None = None,
    prompts_only: bool = False,
    unique_prompts: bool = True,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    data_dir: str | None = None,
    max_rows: int | None = None,
    column_map: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
    pad_id: int | None = None,
    eos_id: int | None = None,
    prompt_truncation: str = "auto",
    skip_long_prompts: bool = False,
    drop_truncated_responses: bool = False,
    add_bos: bool | None = None,
) -> tuple[dict[str, np.ndarray], tok.DataStats]:
    """Loads, parses and tokenizes `path` -> (arrays, stats).

    The arrays are SFT or preference arrays (tokenize.py) according to the format's kind, or the
    prompt-only arrays with `prompts_only=True` (distinct prompts only when `unique_prompts`).
    """
    examples, stats = load_examples(
        path,
        format,
        tokenizer=tokenizer,
        split=split,
        name=name,
        revision=revision,
        data_dir=data_dir,
        max_rows=max_rows,
        column_map=column_map,
        cache_dir=cache_dir,
    )
    kwargs = {
        "pad_id": pad_id,
        "eos_id": eos_id,
        "prompt_truncation": prompt_truncation,
        "skip_long_prompts": skip_long_prompts,
        "add_bos": add_bos,
        "stats": stats,
    }
    if prompts_only:
        return tok.tokenize_prompts(examples, tokenizer, max_prompt_len, unique=unique_prompts, **kwargs)
    if max_response_len is None:
        raise ValueError("max_response_len is required unless prompts_only=True")
    fn = tok.tokenize_sft if formats_lib.get_format(format).kind == "sft" else tok.tokenize_preference
    return fn(
        examples,
        tokenizer,
        max_prompt_len,
        max_response_len,
        drop_truncated_responses=drop_truncated_responses,
        **kwargs,
    )


def _load_kind(kind: str, path, tokenizer, format, **kwargs):  # pylint: disable=redefined-builtin
    fmt = formats_lib.get_format(format)
    if fmt.kind != kind:
        raise ValueError(f"format {format!r} is a {fmt.kind} format, not {kind}")
    return load(path, format, tokenizer, **kwargs)


def load_sft(path: str, tokenizer: Any, *, format: str = "tldr_sft", **kwargs):  # pylint: disable=redefined-builtin
    """`load` for an SFT format (tldr_sft, ultrafeedback_sft, prompt_response)."""
    return _load_kind("sft", path, tokenizer, format, **kwargs)


def load_preference(path: str, tokenizer: Any, *, format: str, **kwargs):  # pylint: disable=redefined-builtin
    """`load` for a preference format (tldr_preference, openai_comparisons, ultrafeedback, hh_rlhf,
    prompt_chosen_rejected)."""
    return _load_kind("preference", path, tokenizer, format, **kwargs)


def load_prompts(path: str, tokenizer: Any, *, format: str, unique: bool = True, **kwargs):  # pylint: disable=redefined-builtin
    """Prompt-only arrays (prompt_ids, prompt_mask, prompt_positions) for rollouts, any format."""
    kwargs.pop("max_response_len", None)
    kwargs.pop("drop_truncated_responses", None)
    return load(path, format, tokenizer, prompts_only=True, unique_prompts=unique, **kwargs)


# ----------------------------------------------------------------------------------------------
# Config.

_CONFIG_FIELDS = {
    # name: (default, type for CLI placeholders, doc)
    "path": ("", str, "hub dataset id or local .jsonl/.json/.parquet/.csv(.gz) file or folder"),
    "format": ("tldr_sft", str, f"row format, one of {sorted(formats_lib.FORMATS)}"),
    "split": ("train", str, "hub split (ignored for local files)"),
    "name": (None, str, "hub dataset config name"),
    "revision": (None, str, "hub revision"),
    "data_dir": (None, str, "hub data_dir (e.g. 'harmless-base' for Anthropic/hh-rlhf)"),
    "max_rows": (None, int, "keep only the first max_rows rows (None: all)"),
    "max_prompt_len": (512, int, "P: prompts are left-padded/truncated to this many tokens"),
    "max_response_len": (64, int, "R: responses (+EOS) are right-padded/truncated to this"),
    "pad_id": (None, int, "pad token id (must differ from EOS); None: the tokenizer's"),
    "eos_id": (None, int, "EOS token id; None: the tokenizer's"),
    "prompt_truncation": ("auto", str, "'auto', 'left' (keep the last P tokens) or 'tldr_post'"),
    "skip_long_prompts": (False, bool, "skip prompts longer than P instead of truncating them"),
    "drop_truncated_responses": (False, bool, "skip rows whose response+EOS exceeds R"),
    "add_bos": (None, bool, "None: follow the tokenizer; True/False: force/never a BOS"),
    "column_map": ("", str, "'field=column,...' overrides, e.g. 'response=postprocessed_response'"),
    "cache_dir": (None, str, "datasets cache folder (None: the default)"),
}


def default_config():
    """An ml_collections.ConfigDict of the loader's options (overridable as --config.data.X=...)."""
    from ml_collections import config_dict  # pylint: disable=import-outside-toplevel

    cfg = config_dict.ConfigDict()
    for key, (default, typ, _) in _CONFIG_FIELDS.items():
        cfg[key] = config_dict.placeholder(typ) if default is None else default
    return cfg


def _parse_column_map(value) -> dict[str, str] | None:
    if not value:
        return None
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"column_map must look like 'field=column,...', got {value!r}")
        return {k.strip(): v.strip() for k, v in pairs}
    return dict(value)


def from_config(cfg: Mapping[str, Any], tokenizer: Any, *, prompts_only: bool = False, **overrides):
    """`load` driven by a data config (dict or ConfigDict with the fields of `default_config`).

    Unknown keys (e.g. a batch_size living in the same config block) are ignored.
    """
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    cfg.update(overrides)
    kwargs = {k: cfg[k] for k in _CONFIG_FIELDS if k in cfg and k not in ("path", "format")}
    kwargs["column_map"] = _parse_column_map(kwargs.get("column_map"))
    if not cfg.get("path"):
        raise ValueError("data config has no path")
    if prompts_only:
        kwargs.pop("max_response_len", None)
        kwargs.pop("drop_truncated_responses", None)
    return load(cfg["path"], cfg.get("format", "tldr_sft"), tokenizer, prompts_only=prompts_only, **kwargs)


# ----------------------------------------------------------------------------------------------
# Splitting and batching.


def train_eval_split(
    examples: Sequence[Any], eval_size: float, seed: int = 0, *, group_by_prompt: bool = True
) -> tuple[list, list]:
    """Deterministic (train, eval) split of examples.

    eval_size: a count of examples or a fraction in (0, 1). With group_by_prompt, every example of a
    prompt lands on the same side (TL;DR comparisons repeat posts), so eval prompts are unseen.
    """
    n = len(examples)
    target = round(eval_size * n) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if not 0 <= target <= n:
        raise ValueError(f"eval_size={eval_size} out of range for {n} examples")
    keys = [e.prompt for e in examples] if group_by_prompt else list(range(n))
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = np.random.default_rng([seed, 0x5E1]).permutation(len(groups))
    group_list = list(groups.values())
    eval_idx: list[int] = []
    for g in order:
        if len(eval_idx) >= target:
            break
        eval_idx.extend(group_list[g])
    eval_set = set(eval_idx)
    return [examples[i] for i in range(n) if i not in eval_set], [examples[i] for i in sorted(eval_set)]


class BatchIterator:
    """Shuffled minibatches of a dict of equal-length arrays; resumable from a tiny state.

    Each epoch uses `np.random.default_rng([seed, epoch]).permutation(n)`, so the order depends only
    on (seed, epoch) and a restored iterator continues exactly. Global batch b of an epoch is
    `order[b*batch_size:(b+1)*batch_size]`; with `process_count` > 1, process `process_index` gets
    its contiguous slice of it (batch_size // process_count rows), so all processes together see the
    global batch. With drop_last=False the last, smaller global batch is split as evenly as possible
    (array_split) — jitted consumers should then `pad_batch` it.

    state() -> {"epoch": e, "index": b}: the next batch to produce; restore(state) jumps there.
    Iteration runs forever unless num_epochs is given.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int = 0,
        *,
        drop_last: bool = True,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not arrays:
            raise ValueError("BatchIterator needs at least one array")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays have different lengths: {lengths}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
        self.arrays = dict(arrays)
        self.num_rows = next(iter(lengths.values()))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        if drop_last:
            self.steps_per_epoch = self.num_rows // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_rows // self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_rows} rows are fewer than one batch of {batch_size} (drop_last=True)")
        self._epoch = 0
        self._index = 0
        self._order_epoch = None
        self._order = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> BatchIterator:
        return self

    def order(self, epoch: int) -> np.ndarray:
        """Row order of an epoch (the same for every process)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows)
            self._order_epoch = epoch
        return self._order

    def state(self) -> dict[str, int]:
        return {"epoch": int(self._epoch), "index": int(self._index)}

    def restore(self, state: Mapping[str, Any]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"bad iterator state {dict(state)} (steps_per_epoch={self.steps_per_epoch})")
        self._epoch, self._index = epoch, index

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index >= self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        order = self.order(self._epoch)
        rows = order[self._index * self.batch_size : (self._index + 1) * self.batch_size]
        if len(rows) == self.batch_size:
            local = self.batch_size // self.process_count
            rows = rows[self.process_index * local : (self.process_index + 1) * local]
        else:
            rows = np.array_split(rows, self.process_count)[self.process_index]
        self._index += 1
        return {k: v[rows] for k, v in self.arrays.items()}


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    """Pads a short batch to batch_size rows by repeating its first row -> (batch, num_valid).

    Repeating a real row (not all-pad rows) keeps every row well-formed for the model; drop the
    rows from num_valid on when reducing metrics.
    """
    n = len(next(iter(batch.values())))
    if n > batch_size:
        raise ValueError(f"batch has {n} rows > batch_size={batch_size}")
    if n == 0:
        raise ValueError("cannot pad an empty batch")
    take = np.concatenate([np.arange(n), np.zeros(batch_size - n, np.int64)])
    return {k: np.asarray(v)[take] for k, v in batch.items()}, n
