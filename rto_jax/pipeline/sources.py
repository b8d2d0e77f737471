"""Checks of a run's model and tokenizer sources, before anything is trained or written.

`check_sources(config)` (called by `runner.run` after `config.validate`):
  * every hub id among the model keys is fetched now; one that cannot be had is a `ModelError`
    naming the key, the id and the offline alternatives (no traceback, nothing written)
  * every model's config is read (config.json or GGUF metadata, no weights) and refused when it
    has a field the model code does not implement or is shorter than the run's sequences
  * the run's tokenizer must fit the language models: every id it makes < each model's vocabulary
  * a pretrained model trained with the random-init learning rates of `:tiny` gets a warning
Returns the run's tokenizer (text tasks), so it is loaded once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rto_jax.errors import ConfigError, ModelError
from rto_jax.pipeline.config import TRAINED_STAGES, looks_local, parse_policies, stage_list

log = logging.getLogger(__name__)

OFFLINE_ALTERNATIVES = (
    "to run offline, point it at a local HF model folder or .gguf file, or use a preset that needs no hub: "
    ":tiny (a random-init model) or :smollm2 (SmolLM2-135M-Instruct, after `make smollm2`)"
)
# Learning rates at or above this are random-init rates (the :tiny preset's 1e-3, 3e-4); pretrained
# models are fine-tuned at 1e-6 .. 5e-5.
RANDOM_INIT_LR = 1e-4


def model_sources(config) -> dict[str, str]:
    """{config key: model source} of every model the run reads (language models and judges)."""
    keys = ["model.init_from", "tokenizer.path"] + [f"{s}.init_from" for s in TRAINED_STAGES] + ["evaluate.judge"]
    out = {}
    for key in keys:
        section, name = key.split(".")
        if config[section][name]:
            out[key] = config[section][name]
    for name, path in parse_policies(config.evaluate.policies).items():
        out[f"evaluate.policies[{name}]"] = path
    return out


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What fetching a hub id raises when the id, the network or the access is at fault."""
    from huggingface_hub import errors

    transport = []  # the HTTP client's connection errors (huggingface_hub uses httpx or requests)
    for module, name in (("httpx", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            transport.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return (
        *transport,
        errors.LocalEntryNotFoundError,  # offline (or the hub unreachable) and no local copy
        errors.OfflineModeIsEnabled,
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.GatedRepoError,
        errors.HfHubHTTPError,
        errors.HFValidationError,  # not a valid repo id
        ConnectionError,
        TimeoutError,
    )


def _reason(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    if cause is not None and not str(error).startswith(type(cause).__name__):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return " ".join(text.split())[:200]


def fetch(key: str, name: str) -> Path:
    """The local path of model source `name` (config key `key`): downloaded now when it is a hub id."""
    from rto_jax.pipeline.common import resolve_model_path

    path = name.partition("@")[0]
    if looks_local(path):
        if not Path(path).expanduser().exists():
            raise ConfigError(key, f"{name!r} does not exist (a local model folder or .gguf file)")
        return Path(path).expanduser()
    try:
        return resolve_model_path(name)
    except _hub_errors() as e:
        raise ModelError(f"config.{key}: cannot get {name!r} from the Hugging Face hub ({_reason(e)}); "
                         f"{OFFLINE_ALTERNATIVES}") from None  # fmt: skip


def _load_tokenizer(path: Path):
    if path.suffix == ".gguf":  # the vocabulary only, not the weights
        from rto_jax.models.gguf_import import read_gguf_tokenizer

        return read_gguf_tokenizer(path)
    from rto_jax.models import load_tokenizer

    return load_tokenizer(path)


def check_sources(config):
    """Runs the checks of the module docstring; returns the run's tokenizer (None: synthetic task or
    a BPE trained later in the workdir)."""
    from rto_jax.models.hf_io import inspect_model_source

    if config.data.source == "synthetic":
        return None
    seq_len = config.data.max_prompt_len + config.data.max_response_len
    paths = {key: fetch(key, name) for key, name in model_sources(config).items()}
    vocab = {}
    for key, path in paths.items():
        if key == "tokenizer.path" and not _has_model(path):
            continue
        try:
            cfg = inspect_model_source(path, max_sequence_len=seq_len)
        except ModelError as e:
            raise ModelError(f"config.{key}: {e}") from None
        vocab[key] = cfg.vocab_size

    tokenizer = None
    if config.tokenizer.bpe_vocab_size <= 0:
        key = "tokenizer.path" if config.tokenizer.path else next(k for k in paths if k != "evaluate.judge")
        tokenizer = _load_tokenizer(paths[key])
        size = len(tokenizer)
        for model_key, model_vocab in vocab.items():
            if size > model_vocab:
                raise ModelError(
                    f"config.{key}: the tokenizer of {paths[key]} has {size} tokens but the model of "
                    f"config.{model_key} has a vocabulary of {model_vocab}: its ids would index past the "
                    "embeddings; use the model's own tokenizer (leave config.tokenizer.path empty)"
                )
        for id_key in ("data.pad_id", "data.eos_id"):
            value = config.data[id_key.split(".")[1]]
            if value is not None and not 0 <= value < min([size, *vocab.values()]):
                raise ConfigError(id_key, f"{value} is not a token id of the tokenizer of {paths[key]} ({size} ids)")
    _warn_random_init_rates(config)
    return tokenizer


def _has_model(path: Path) -> bool:
    return path.suffix == ".gguf" or (path / "config.json").exists()


def _warn_random_init_rates(config) -> None:
    if not (config.model.init_from or config.sft.init_from):
        return
    for stage in TRAINED_STAGES:
        if stage in stage_list(config) and not config[stage].init_from and config[stage].lr >= RANDOM_INIT_LR:
            log.warning(
                "config.%s.lr=%g is a random-init learning rate, and the model is pretrained: fine-tuning "
                "usually takes 1e-6 .. 5e-5 (the :smollm2 presets use 1e-5 .. 3e-5)",
                stage,
                config[stage].lr,
            )
