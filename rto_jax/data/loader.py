"""Loading (hub id or local file, through `datasets`), splitting, and a resumable batch iterator.

  arrays, stats = load(path, "tldr_sft", tokenizer, max_prompt_len=512, max_response_len=53)
  it = BatchIterator(arrays, batch_size=64, seed=0)
  batch = next(it); ckpt["data"] = it.state(); ...; it.restore(ckpt["data"])

`path` is a local file (.jsonl, .json, .parquet, .csv, optionally .gz) or a folder of them, or a
Hugging Face hub dataset id (then `split`, `name` and `revision` apply). A path that looks local
(exists, starts with '/', '.', '~', or ends with a data-file suffix) and does not exist raises
FileNotFoundError; it is never sent to the hub.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from rto_jax.data import formats as formats_lib
from rto_jax.data import tokenize as tok

__all__ = [
    "load_table",
    "load_examples",
    "load",
    "load_sft",
    "load_preference",
    "load_prompts",
    "from_config",
    "default_config",
    "train_eval_split",
    "BatchIterator",
    "pad_batch",
]

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
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _BUILDERS.get(os.path.splitext(name)[1])


def _looks_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.startswith(("/", ".", "~"))
        or _builder(path) is not None
        or path.count("/") >= 2  # Hub ids are "owner/name".
    )


def _read_json_rows(path: str) -> list[dict]:
    """Plain-Python reading of a JSON / JSON-lines file (fallback that keeps row indices)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: row {len(rows)} (line {i + 1}) is not valid JSON: {e}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, not a JSON object")
    return rows


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
    """
    import datasets  # Heavy import; only loading needs it.

    path = os.fspath(path)
    if _looks_local(path):
        local = os.path.expanduser(path)
        if not os.path.exists(local):
            raise FileNotFoundError(f"data file not found: {path}")
        if os.path.isdir(local):
            if os.path.exists(os.path.join(local, "dataset_info.json")) or os.path.exists(
                os.path.join(local, "state.json")
            ):
                table = datasets.load_from_disk(local)
                if isinstance(table, datasets.DatasetDict):
                    table = table[split]
            else:
                table = datasets.load_dataset(local, split=split, cache_dir=cache_dir)
        else:
            builder = _builder(local)
            if builder is None:
                raise ValueError(f"{path}: unknown data file type; use one of {sorted(_BUILDERS)} (optionally + .gz)")
            try:
                table = datasets.load_dataset(builder, data_files=local, split="train", cache_dir=cache_dir)
            except Exception as e:  # pylint: disable=broad-except
                if builder != "json":
                    raise ValueError(f"{path}: could not be read as {builder}: {type(e).__name__}: {e}") from e
                rows = _read_json_rows(local)  # Mixed types that arrow refuses: keep going row by row.
                return rows[:max_rows] if max_rows is not None else rows
    else:
        hub_split = split if max_rows is None else f"{split}[:{int(max_rows)}]"
        table = datasets.load_dataset(
            path, name, split=hub_split, revision=revision, data_dir=data_dir, cache_dir=cache_dir
        )
    if max_rows is not None and len(table) > max_rows:
        table = table.select(range(int(max_rows)))
    return table


def _iter_rows(table, columns: Sequence[str]) -> Iterator[dict]:
    if isinstance(table, list):
        yield from table
        return
    table = table.select_columns(list(dict.fromkeys(columns)))
    for batch in table.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


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

    Raises FileNotFoundError for a missing local file and ValueError (formats.FormatError) naming
    the path, the first bad row and what is wrong when the data is not in `format`.
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
    column_names = _column_names(table)
    cols = formats_lib.resolve_columns(fmt, column_names, source, column_map)
    examples, skipped = formats_lib.parse_rows(
        _iter_rows(table, list(cols.values())),
        fmt,
        source=source,
        column_names=column_names,
        column_map=column_map,
        tokenizer=tokenizer,
    )
    stats = tok.DataStats(source=source, num_rows=len(table), num_examples=len(examples), skipped=skipped)
    stats.log()
    if not examples:
        raise ValueError(f"{source}: no usable rows in format {format!r} (skipped: {skipped})")
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
    kwargs = dict(
        pad_id=pad_id,
        eos_id=eos_id,
        prompt_truncation=prompt_truncation,
        skip_long_prompts=skip_long_prompts,
        add_bos=add_bos,
        stats=stats,
    )
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
    examples: Sequence[Any], eval_size: int | float, seed: int = 0, *, group_by_prompt: bool = True
) -> tuple[list, list]:
    """Deterministic (train, eval) split of examples.

    eval_size: a count of examples or a fraction in (0, 1). With group_by_prompt, every example of a
    prompt lands on the same side (TL;DR comparisons repeat posts), so eval prompts are unseen.
    """
    n = len(examples)
    target = int(round(eval_size * n)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
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

    def __iter__(self) -> "BatchIterator":
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
