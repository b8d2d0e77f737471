"""A user's mistake is one line on stderr, exit status 2, no traceback and no files left behind;
and the checks behind it (override keys, hub ids, tokenizer vs model, pad vs EOS) name the key.

Each `experiments/run.py` case runs in a subprocess with the hub offline (HF_HUB_OFFLINE=1), the way a
user on this machine meets it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.errors import ConfigError, ModelError
from rto_jax.pipeline.config import config_from_file, validate
from rto_jax.pipeline.overrides import check_overrides, nearest_keys
from rto_jax.pipeline.tasks import choose_special_tokens, train_bpe

ROOT = Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT / 'configs' / 'rto_tldr.py'}:tiny"


def _run(workdir: Path, *args: str, config: str = TINY) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RTO_JAX_NO_TQDM": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run.py"), config, f"--workdir={workdir}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_one_line_error(proc, *needles: str) -> str:
    """Exit status 2, no traceback, the last stderr line is `error: ...` naming every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ----------------------------------------------------------------------------------------------
# Override keys, presets and config files.


def test_unknown_override_key_names_it_and_the_nearest_keys(tmp_path):
    proc = _run(tmp_path / "w", "--config.ppo.betadpo=0.1")
    _assert_one_line_error(proc, "config.ppo.betadpo", "config.ppo.reward_args.beta_dpo")
    assert not (tmp_path / "w").exists()


def test_the_data_path_has_one_documented_form():
    config = config_from_file(ROOT / "configs" / "rto_tldr.py", "tiny")
    near = nearest_keys("data.path", [k for k in _keys(config)])
    assert near[:2] == ["data.preference.path", "data.sft.path"] or set(near[:2]) == {
        "data.preference.path",
        "data.sft.path",
    }
    with pytest.raises(ConfigError, match=r"config\.data\.path: .*config\.data\.(sft|preference)\.path"):
        check_overrides([sys.argv[0], TINY, "--config.data.path=x.jsonl"])
    check_overrides([sys.argv[0], TINY, "--config.data.sft.path=x.jsonl", "--config.ppo.reward_args.beta_dpo=0.1"])


def _keys(config):
    from rto_jax.pipeline.overrides import config_keys

    return config_keys(config)


def test_unknown_preset_and_missing_config_file_are_one_line(tmp_path):
    proc = _run(tmp_path / "w", config=f"--config={ROOT / 'configs' / 'rto_tldr.py'}:nope")
    _assert_one_line_error(proc, "unknown preset 'nope'", "smollm2")
    proc = _run(tmp_path / "w", config="--config=configs/nope.py")
    _assert_one_line_error(proc, "configs/nope.py")
    assert not (tmp_path / "w").exists()


@pytest.mark.needs_shared_data  # :tiny reads the offline samples before the key it checks
def test_a_bad_value_names_the_key(tmp_path):
    proc = _run(tmp_path / "w", "--config.ppo.num_minibatches=5")
    _assert_one_line_error(proc, "config.ppo.num_minibatches")
    proc = _run(tmp_path / "w", "--config.sft.lr=abc")
    _assert_one_line_error(proc, "config.sft.lr", "abc")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# Model sources.


def test_the_headline_command_offline_names_the_hub_id_and_the_offline_presets(tmp_path):
    """The default preset wants Pythia from the hub: offline, one line naming the id and the ways out."""
    proc = _run(tmp_path / "w", config=f"--config={ROOT / 'configs' / 'rto_tldr.py'}")
    line = _assert_one_line_error(proc, "config.model.init_from", "EleutherAI/pythia-1b-deduped", ":tiny", ":smollm2")
    assert "local" in line
    assert not (tmp_path / "w").exists()  # no config.json / metrics.jsonl left behind


@pytest.mark.needs_shared_data  # :tiny reads the offline samples before the key it checks
def test_an_existing_workdir_keeps_its_files_after_a_user_error(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    proc = _run(workdir, "--config.model.init_from=someone/not-a-cached-model", "--config.tokenizer.bpe_vocab_size=0")
    _assert_one_line_error(proc, "config.model.init_from", "someone/not-a-cached-model")
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


@pytest.mark.needs_shared_data  # :tiny reads the offline samples before the key it checks
def test_a_bpe_with_a_pretrained_model_is_refused_naming_the_key(tmp_path):
    """:tiny's 2k BPE fed to a 49k-vocabulary model trained silently at loss 9: now a config error."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # validate does not read it
    config = config_from_file(ROOT / "configs" / "rto_tldr.py", "tiny")
    with config.unlocked():
        config.model.init_from = str(gguf)
    with pytest.raises(ConfigError, match=r"config\.tokenizer\.bpe_vocab_size: .*model\.init_from.*bpe_vocab_size=0"):
        validate(config)
    with config.unlocked():
        config.tokenizer.bpe_vocab_size = 0
    validate(config)


def _tiny_model_folder(folder: Path, vocab_size: int, **hf_changes) -> Path:
    from flax import nnx

    from rto_jax.models import CausalLM, ModelConfig, save_pretrained

    cfg = ModelConfig(vocab_size=vocab_size, max_position_embeddings=256, eos_token_id=1, pad_token_id=0)
    save_pretrained(CausalLM(cfg, nnx.Rngs(0)), folder)
    if hf_changes:
        hf = json.loads((folder / "config.json").read_text())
        hf.update(hf_changes)
        (folder / "config.json").write_text(json.dumps(hf))
    return folder


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    from rto_jax.pipeline.sources import check_sources

    tokenizer = tmp_path / "tokenizer"
    train_bpe([f"word{i} other{i * 7} text" for i in range(300)], 400, tokenizer)
    model = _tiny_model_folder(tmp_path / "model", vocab_size=300)
    config = config_from_file(ROOT / "configs" / "rto_tldr.py", "tiny")
    with config.unlocked():
        config.model.init_from, config.tokenizer.path, config.tokenizer.bpe_vocab_size = str(model), str(tokenizer), 0
    with pytest.raises(ModelError, match=r"config\.tokenizer\.path: .*400 tokens.*config\.model\.init_from.*300"):
        check_sources(config)
    bigger = _tiny_model_folder(tmp_path / "model_400", vocab_size=400)
    with config.unlocked():
        config.model.init_from = str(bigger)
    assert len(check_sources(config)) == 400


@pytest.mark.needs_shared_data  # :tiny reads the offline samples before the key it checks
def test_an_unimplemented_model_field_stops_the_run_before_any_work(tmp_path):
    """A Llama config with GELU loaded silently and gave logits 0.3 off: now one line naming the field."""
    model = _tiny_model_folder(tmp_path / "model", vocab_size=300, hidden_act="gelu")
    train_bpe(["a few words of text"] * 10, 300, tmp_path / "tok")  # the folder carries a tokenizer, as exports do
    for file in (tmp_path / "tok").iterdir():
        shutil.copy(file, model / file.name)
    proc = _run(
        tmp_path / "w",
        f"--config.model.init_from={model}",
        "--config.tokenizer.bpe_vocab_size=0",
        "--config.sft.lr=1e-5",
    )
    _assert_one_line_error(proc, "config.model.init_from", "hidden_act", "gelu")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# Data.


@pytest.mark.needs_shared_data
def test_a_preference_file_without_rejected_is_one_line_naming_file_and_column(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text("\n".join(json.dumps({"prompt": f"p{i}", "chosen": "c"}) for i in range(5)) + "\n")
    proc = _run(tmp_path / "w", f"--config.data.preference.path={bad}")
    _assert_one_line_error(proc, str(bad), "rejected")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# Pad and EOS.


def _bpe_without_pad(tmp_path, **specials):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "bpe"
    train_bpe(["some text to learn merges from"] * 20, 300, folder)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)
    return fast


def test_pad_is_chosen_distinct_from_eos_and_says_where_it_came_from(tmp_path):
    # The trained BPE: pad <|pad|> (0) and EOS <|endoftext|> (1).
    tok = _bpe_without_pad(tmp_path, pad_token="<|pad|>", eos_token="<|endoftext|>")
    assert choose_special_tokens(tok) == {
        "pad_id": 0,
        "pad_token": "<|pad|>",
        "eos_id": 1,
        "eos_token": "<|endoftext|>",
        "pad_from": "the tokenizer's pad token",
    }
    # SmolLM2's case: pad == EOS (or none); a reserved token that is not EOS is taken instead.
    tok = _bpe_without_pad(tmp_path, pad_token="<|endoftext|>", eos_token="<|endoftext|>")
    chosen = choose_special_tokens(tok)
    assert (chosen["pad_id"], chosen["eos_id"], chosen["pad_token"]) == (0, 1, "<|pad|>")
    assert "reserved" in chosen["pad_from"]
    # Explicit ids win, EOS included.
    assert choose_special_tokens(tok, pad_id=5, eos_id=0)["pad_id"] == 5
    with pytest.raises(ConfigError, match=r"config\.data\.eos_id"):
        choose_special_tokens(_bpe_without_pad(tmp_path))


def test_no_pad_candidate_is_a_config_error_naming_pad_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    with pytest.raises(ConfigError, match=r"config\.data\.pad_id: .*no pad token"):
        choose_special_tokens(tok)


def test_random_init_learning_rates_on_a_pretrained_model_are_warned_about(tmp_path, caplog):
    """:tiny's lr 1e-3 kept for a pretrained model went by without a word; now each stage is named."""
    from rto_jax.pipeline.sources import check_sources

    model = _tiny_model_folder(tmp_path / "model", vocab_size=300)
    train_bpe(["a few words of text"] * 10, 300, tmp_path / "tok")
    config = config_from_file(ROOT / "configs" / "rto_tldr.py", "tiny")
    with config.unlocked():
        config.model.init_from, config.tokenizer.path, config.tokenizer.bpe_vocab_size = (
            str(model),
            str(tmp_path / "tok"),
            0,
        )
    with caplog.at_level("WARNING", logger="rto_jax.pipeline.sources"):
        check_sources(config)
    warned = {r.getMessage().split("=")[0] for r in caplog.records}
    assert warned == {"config.sft.lr", "config.reward_model.lr", "config.dpo.lr", "config.ppo.lr"}, warned
    caplog.clear()
    with config.unlocked():
        for stage in ("sft", "reward_model", "dpo", "ppo"):
            config[stage].lr = 1e-5
    with caplog.at_level("WARNING", logger="rto_jax.pipeline.sources"):
        check_sources(config)
    assert not caplog.records
