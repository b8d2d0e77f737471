"""Where a run's data comes from: a `Task` holds every array the stages read, already tokenized.

The stages only touch a Task's fields, never a tokenizer or a file, so any data source that fills
them plugs in:

  build_text_task(config, workdir)   text datasets (config.data) through rto_jax.data + a tokenizer
  build_synthetic_task(config)       token-id data with a hidden gold reward (rto_jax.data.synthetic):
                                     no tokenizer; preferences are labelled later, on pi_sft's samples,
                                     by the `preferences` stage (`label_pairs`, `with_preferences`)

Array layouts follow CONTRACT.md (prompt left-padded to P, response right-padded to R):
  SFT arrays         input_ids, attention_mask, positions [N, P+R], response_mask [N, R] float32,
                     prompt_ids, prompt_mask [N, P]
  preference arrays  chosen_* and rejected_* versions of the four sequence keys + prompt_ids/mask
  prompt arrays      prompt_ids, prompt_mask [N, P] int32
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rto_jax.data import formats as formats_lib
from rto_jax.data import load_examples, load_table, train_eval_split
from rto_jax.data import tokenize as tok
from rto_jax.files import publish_folder, temp_dir_for

log = logging.getLogger(__name__)

PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"
# A minimal chat template for the trained BPE, so chat-message formats (ultrafeedback) also work with it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# gold_reward(prompt_ids [B, P], prompt_mask [B, P], response_ids [B, R], response_mask [B, R]) -> [B] float;
# jittable, an argument of the jitted evaluation: a jax.tree_util.Partial's arrays are traced (the synthetic
# task's tables), a plain function must be hashable (static)
GoldReward = Callable[[Any, Any, Any, Any], Any]
# gold_credit(same arguments) -> [B, R] float32: the gold reward split over the response's tokens (summing
# to it); jittable, passed as gold_reward is. A token reward that lists token_rewards.GOLD reads it
# (positive controls).
GoldCredit = Callable[[Any, Any, Any, Any], Any]
# label_pairs(rng, prompts, responses_a, responses_b) -> (preference arrays, info): labels two responses
# per prompt (`response_ids`, `response_mask` [N, R]); info has `temperature` and `agreement` with gold
PairLabeler = Callable[..., tuple[dict, dict]]


@dataclasses.dataclass
class Task:
    """Everything the stages read. `None` marks data a source does not have (then the stages that
    need it must be given a checkpoint through `init_from`)."""

    name: str
    pad_id: int  # != eos_id
    eos_id: int
    vocab_size: int  # every id is < vocab_size (the size of a randomly initialized model's vocabulary)
    prompt_length: int  # P
    response_length: int  # R
    prompts_train: dict[str, np.ndarray]  # rollout prompts (PPO): prompt_ids, prompt_mask [N, P]
    eval_prompts: dict[str, np.ndarray]  # held-out prompts (evaluation): prompt_ids, prompt_mask [M, P]
    sft_train: dict[str, np.ndarray] | None = None  # SFT arrays
    sft_eval: dict[str, np.ndarray] | None = None  # SFT arrays (held-out loss)
    preference_train: dict[str, np.ndarray] | None = None  # preference arrays
    preference_eval: dict[str, np.ndarray] | None = None  # preference arrays (held-out accuracy)
    eval_references: dict[str, np.ndarray] | None = None  # SFT arrays of eval_prompts' reference responses (win rate)
    tokenizer: Any = None  # None for token-id tasks
    gold_reward: GoldReward | None = None  # known true reward (synthetic tasks)
    gold_credit: GoldCredit | None = None  # its exact per-token split (synthetic tasks)
    label_pairs: PairLabeler | None = None  # labels sampled pairs (synthetic tasks; see `preference_prompts`)
    preference_prompts: dict[str, np.ndarray] | None = None  # prompts whose pi_sft sample pairs get labelled
    special_tokens: dict | None = None  # how pad and EOS were chosen (choose_special_tokens; results.json)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict[str, int]:
        rows = lambda a: 0 if a is None else len(next(iter(a.values())))
        return {
            "sft_train": rows(self.sft_train),
            "sft_eval": rows(self.sft_eval),
            "preference_train": rows(self.preference_train),
            "preference_eval": rows(self.preference_eval),
            "prompts_train": rows(self.prompts_train),
            "eval_prompts": rows(self.eval_prompts),
        }


# ----------------------------------------------------------------------------------------------
# Tokenizers.


def _strings(value, out: list[str]) -> None:
    """Every string inside a row value (message lists and dicts included)."""
    if isinstance(value, str):
        if value:
            out.append(value)
    elif isinstance(value, Mapping):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strings(v, out)


def training_texts(sources, limit: int) -> list[str]:
    """Up to `limit` strings from the raw rows of the data sources (format-agnostic)."""
    texts: list[str] = []
    for src in sources:
        table = load_table(
            src.path,
            split=src.split,
            name=src.name,
            revision=src.revision,
            data_dir=src.data_dir,
            max_rows=src.max_rows,
        )
        rows = table if isinstance(table, list) else table.to_list()
        for row in rows:
            _strings(row, texts)
            if len(texts) >= limit:
                return texts[:limit]
    return texts


def train_bpe(texts, vocab_size: int, folder: str | os.PathLike):
    """A byte-level BPE (pad id 0, EOS id 1) trained on `texts`, saved to `folder` as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = Path(folder)
    tmp = temp_dir_for(folder)
    tokenizer.save_pretrained(str(tmp))
    publish_folder(tmp, folder)
    return tokenizer


def load_run_tokenizer(config, workdir):
    """The run's tokenizer: tokenizer.path, a BPE trained once per workdir, or the first model's."""
    from rto_jax.models import load_tokenizer
    from rto_jax.pipeline.common import resolve_model_path

    if config.tokenizer.path:
        return load_tokenizer(resolve_model_path(config.tokenizer.path))
    if config.tokenizer.bpe_vocab_size > 0:
        from transformers import AutoTokenizer

        from rto_jax.distributed import is_main_process, sync

        # Trained once per workdir, by process 0; every process (and a resumed run) reads the saved
        # folder, so all of them tokenize with exactly the same vocabulary.
        folder = Path(workdir) / "tokenizer"
        if not folder.exists() and is_main_process():
            sources = [s for s in (config.data.sft, config.data.preference) if s.path]
            texts = training_texts(sources, config.tokenizer.bpe_max_texts)
            log.info("training a byte-level BPE (vocab %d) on %d strings", config.tokenizer.bpe_vocab_size, len(texts))
            folder.parent.mkdir(parents=True, exist_ok=True)
            train_bpe(texts, config.tokenizer.bpe_vocab_size, folder)
        sync("tokenizer")
        return AutoTokenizer.from_pretrained(str(folder))
    for name in [config.model.init_from] + [config[s].init_from for s in ("sft", "reward_model", "dpo", "ppo")]:
        if name:
            return load_tokenizer(resolve_model_path(name))
    raise ValueError("config.tokenizer.path: no tokenizer source")


# Pad candidates when the tokenizer has no pad token distinct from EOS (pad is never attended to or
# trained, so any id the model has works; a token the data never produces is the clearest choice).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>", "<|padding|>")


def choose_special_tokens(tokenizer, pad_id: int | None = None, eos_id: int | None = None) -> dict:
    """Pad and EOS of a run: config.data.pad_id / eos_id when set, else the tokenizer's EOS and a pad
    that differs from it: the tokenizer's pad token, its unknown token, or a reserved token
    (PAD_CANDIDATES), in that order. Returns {pad_id, pad_token, eos_id, eos_token, pad_from} (logged
    and recorded in results.json)."""
    from rto_jax.errors import ConfigError

    eos_from = "config.data.eos_id" if eos_id is not None else "the tokenizer's EOS token"
    eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ConfigError(
            "data.eos_id", "the tokenizer has no EOS token: set data.eos_id to the id that ends a response"
        )
    candidates = []
    if pad_id is not None:
        candidates.append((pad_id, "config.data.pad_id"))
    else:
        candidates.append((getattr(tokenizer, "pad_token_id", None), "the tokenizer's pad token"))
        candidates.append((getattr(tokenizer, "unk_token_id", None), "the tokenizer's unknown token"))
        vocab = tokenizer.get_vocab()
        candidates += [(vocab.get(t), f"the reserved token {t!r}") for t in PAD_CANDIDATES]
    for pad, pad_from in candidates:
        if pad is not None and int(pad) != int(eos_id):
            break
    else:
        raise ConfigError(
            "data.pad_id",
            f"the tokenizer has no pad token distinct from EOS ({eos_id}) and none of {PAD_CANDIDATES}: "
            "set data.pad_id to an id the data never uses",
        )
    chosen = {
        "pad_id": int(pad),
        "pad_token": tokenizer.convert_ids_to_tokens(int(pad)),
        "eos_id": int(eos_id),
        "eos_token": tokenizer.convert_ids_to_tokens(int(eos_id)),
        "pad_from": pad_from,
    }
    log.info(
        "special tokens: EOS %r (id %d, %s), pad %r (id %d, %s)",
        chosen["eos_token"], chosen["eos_id"], eos_from, chosen["pad_token"], chosen["pad_id"], pad_from,
    )  # fmt: skip
    return chosen


# ----------------------------------------------------------------------------------------------
# Text tasks.


def _column_map(value: str) -> dict[str, str] | None:
    pairs = [item.split("=", 1) for item in value.split(",") if item.strip()] if value else []
    return {k.strip(): v.strip() for k, v in pairs} or None


def _examples(src, config, tokenizer, seed: int):
    """(train, eval) examples of one source: eval from eval_path, else a split grouped by prompt."""
    kwargs = dict(
        tokenizer=tokenizer,
        split=src.split,
        name=src.name,
        revision=src.revision,
        data_dir=src.data_dir,
        max_rows=src.max_rows,
        column_map=_column_map(src.column_map),
        cache_dir=config.data.cache_dir,
    )
    train, _ = load_examples(src.path, src.format, **kwargs)
    if src.eval_path:
        held_out, _ = load_examples(src.eval_path, src.format, **{**kwargs, "split": src.eval_split})
        return train, held_out
    size = config.data.eval_size
    return train_eval_split(train, size if size < 1 else int(size), seed)


def _stats(path: str, part: str, rows) -> tok.DataStats:
    """Tokenization counts named after the file and the part of it (its log lines say which)."""
    return tok.DataStats(source=f"{path} ({part})", num_rows=len(rows))


def _first_per_prompt(examples):
    seen: dict[str, Any] = {}
    for e in examples:
        seen.setdefault(e.prompt, e)
    return list(seen.values())


def build_text_task(config, workdir, tokenizer=None) -> Task:
    """A Task from config.data: SFT pairs (or the preference data's chosen responses), preference
    pairs, PPO prompts = distinct SFT training prompts, evaluation = distinct held-out SFT prompts with
    their reference responses (at most config.evaluate.num_prompts)."""
    tokenizer = tokenizer if tokenizer is not None else load_run_tokenizer(config, workdir)
    special_tokens = choose_special_tokens(tokenizer, config.data.pad_id, config.data.eos_id)
    pad_id, eos_id = special_tokens["pad_id"], special_tokens["eos_id"]
    p, r = config.data.max_prompt_len, config.data.max_response_len
    common = dict(
        pad_id=pad_id,
        eos_id=eos_id,
        prompt_truncation=config.data.prompt_truncation,
        skip_long_prompts=config.data.skip_long_prompts,
        add_bos=config.data.add_bos,
    )
    pairs = dict(common, drop_truncated_responses=config.data.drop_truncated_responses)

    preference_train = preference_eval = None
    pref_examples = None
    if config.data.preference.path:
        pref_examples = _examples(config.data.preference, config, tokenizer, config.seed)
        pref = config.data.preference.path
        preference_train, _ = tok.tokenize_preference(
            pref_examples[0], tokenizer, p, r, stats=_stats(pref, "training pairs", pref_examples[0]), **pairs
        )
        preference_eval, _ = tok.tokenize_preference(
            pref_examples[1], tokenizer, p, r, stats=_stats(pref, "held-out pairs", pref_examples[1]), **pairs
        )
    if config.data.sft.path:
        sft_train_ex, sft_eval_ex = _examples(config.data.sft, config, tokenizer, config.seed)
    else:  # SFT on the preferred responses (HH-RLHF / UltraFeedback practice), same prompt split
        sft_train_ex, sft_eval_ex = [
            [formats_lib.SFTExample(e.prompt, e.chosen) for e in part] for part in pref_examples
        ]
    sft = config.data.sft.path or f"{config.data.preference.path} (chosen)"
    sft_train, _ = tok.tokenize_sft(sft_train_ex, tokenizer, p, r, stats=_stats(sft, "SFT rows", sft_train_ex), **pairs)
    sft_eval, _ = tok.tokenize_sft(
        sft_eval_ex, tokenizer, p, r, stats=_stats(sft, "held-out SFT rows", sft_eval_ex), **pairs
    )
    prompts_train, _ = tok.tokenize_prompts(
        sft_train_ex, tokenizer, p, unique=True, stats=_stats(sft, "PPO prompts", sft_train_ex), **common
    )
    eval_ex = _first_per_prompt(sft_eval_ex)
    if config.evaluate.num_prompts:
        eval_ex = eval_ex[: config.evaluate.num_prompts]
    eval_references, _ = tok.tokenize_sft(
        eval_ex, tokenizer, p, r, stats=_stats(sft, "evaluation prompts", eval_ex), **common
    )
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    return Task(
        name=config.name,
        pad_id=pad_id,
        eos_id=eos_id,
        vocab_size=int(vocab),
        prompt_length=p,
        response_length=r,
        prompts_train={k: prompts_train[k] for k in ("prompt_ids", "prompt_mask")},
        eval_prompts={k: eval_references[k] for k in ("prompt_ids", "prompt_mask")},
        sft_train=sft_train,
        sft_eval=sft_eval,
        preference_train=preference_train,
        preference_eval=preference_eval,
        eval_references=eval_references,
        tokenizer=tokenizer,
        special_tokens=special_tokens,
    )


# ----------------------------------------------------------------------------------------------
# Synthetic tasks.


def build_synthetic_task(config) -> Task:
    """The synthetic task of `config.synthetic` and `config.seed`: SFT pairs from the reference source,
    the PPO prompt stream (`ppo.total_episodes` prompts), held-out prompts (`evaluate.num_prompts`)
    and the prompts whose pi_sft sample pairs the `preferences` stage labels. Every array is drawn
    from `config.seed`."""
    import jax

    from rto_jax.data.synthetic import SyntheticTask, SyntheticTaskConfig

    cfg = config.synthetic
    source = SyntheticTask.create(SyntheticTaskConfig(**cfg.task.to_dict()), seed=config.seed)
    rng = np.random.default_rng(config.seed)
    eval_prompts = source.sample_prompts(rng, config.evaluate.num_prompts)
    sft_train = source.make_sft_data(rng, cfg.sft_examples)
    sft_eval = source.make_sft_data(rng, cfg.sft_eval_examples)
    preference_prompts = source.sample_prompts(rng, cfg.preference_pairs)
    prompts_train = source.sample_prompts(rng, config.ppo.total_episodes)
    return Task(
        name=config.name,
        pad_id=source.pad_id,
        eos_id=source.eos_id,
        vocab_size=source.vocab_size,
        prompt_length=source.prompt_length,
        response_length=source.max_response_length,
        prompts_train=prompts_train,
        eval_prompts=eval_prompts,
        sft_train=sft_train,
        sft_eval=sft_eval,
        # Partials over the task (a pytree of its tables): compiled steps trace the tables, so the
        # runs of a study's seeds share their programs.
        gold_reward=jax.tree_util.Partial(SyntheticTask.gold_reward_jax, source),
        gold_credit=jax.tree_util.Partial(SyntheticTask.gold_credit_jax, source),
        label_pairs=source.make_preference_data,
        preference_prompts=preference_prompts,
    )


def with_preferences(task: Task, path, eval_size: float, seed: int) -> Task:
    """`task` with the labelled pairs saved at `path` (.npz) as its preference data, a held-out share
    (`eval_size` < 1) or count split off by a seeded permutation."""
    pairs = dict(np.load(path))
    n = len(pairs["prompt_ids"])
    held_out = int(round(eval_size * n)) if eval_size < 1 else int(eval_size)
    if not 0 < held_out < n:
        raise ValueError(f"config.data.eval_size: {eval_size} leaves no training or no held-out pairs of {n}")
    order = np.random.default_rng(seed).permutation(n)
    take = lambda rows: {k: v[rows] for k, v in pairs.items()}  # noqa: E731
    return dataclasses.replace(task, preference_train=take(order[held_out:]), preference_eval=take(order[:held_out]))


def build_task(config, workdir, tokenizer=None) -> Task:
    """The task of a config: `config.data.source` 'text' (datasets + tokenizer) or 'synthetic'."""
    if config.data.source == "synthetic":
        return build_synthetic_task(config)
    return build_text_task(config, workdir, tokenizer)
