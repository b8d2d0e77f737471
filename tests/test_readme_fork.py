"""README's "Fork an experiment" is a tested file: its two code blocks are the committed example
(experiments/length_bonus.py, configs/length_bonus_tldr.py), and written into a copy of experiments/
and configs/ they run through experiments/run.py end to end with the new reward."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rto_jax.pipeline.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Fork an experiment"

# The tiny preset shrunk to seconds of work: few rows, a 300-token BPE, a d=32 model, 2 steps a stage.
SHRINK = [
    "--config.data.sft.max_rows=64",
    "--config.data.preference.max_rows=64",
    "--config.data.eval_size=16",
    "--config.data.max_prompt_len=64",
    "--config.data.max_response_len=8",
    "--config.tokenizer.bpe_vocab_size=300",
    "--config.tokenizer.bpe_max_texts=200",
    "--config.model.hidden_size=32",
    "--config.model.intermediate_size=64",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=2",
    "--config.sft.batch_size=8",
    "--config.sft.max_steps=2",
    "--config.sft.eval_every=0",
    "--config.sft.eval_batch_size=8",
    "--config.reward_model.batch_size=8",
    "--config.reward_model.max_steps=2",
    "--config.reward_model.eval_every=0",
    "--config.reward_model.eval_batch_size=8",
    "--config.reward_model.normalize_rows=16",
    "--config.ppo.rollout_batch_size=8",
    "--config.ppo.total_episodes=16",
    "--config.ppo.num_minibatches=2",
    "--config.ppo.ppo_epochs=1",
    "--config.evaluate.num_prompts=8",
    "--config.evaluate.batch_size=8",
    "--config.checkpoint.every_steps=2",
]


def fork_blocks(readme: str) -> dict[str, str]:
    """{repository path: code} of the README section's fenced python blocks; each block's first line
    is a comment naming its file (`# experiments/<name>.py`, `# configs/<name>.py`)."""
    heading = re.search(r"^(#{2,3}) " + re.escape(SECTION), readme, flags=re.M)
    assert heading, f"README.md has no section '## {SECTION}'"
    rest = readme[heading.end() :]
    # The section ends at the next heading of its level or above (a '#' comment in a block is no heading).
    end = re.search(r"^#{1,%d} " % len(heading.group(1)), re.sub(r"```.*?```", lambda m: " " * len(m.group()), rest, flags=re.S), flags=re.M)
    section = rest[: end.start()] if end else rest
    blocks = re.findall(r"^```python\n(.*?)\n```", section, flags=re.S | re.M)
    out = {}
    for block in blocks:
        first = block.splitlines()[0]
        named = re.fullmatch(r"# ((?:experiments|configs)/\w+\.py)", first.strip())
        assert named, f"README {SECTION!r}: a block's first line must be '# experiments/NAME.py' or '# configs/NAME.py'"
        out[named.group(1)] = block + "\n"
    return out


def test_fork_blocks_are_the_committed_example_files():
    blocks = fork_blocks((ROOT / "README.md").read_text())
    kinds = sorted(path.split("/")[0] for path in blocks)
    assert kinds == ["configs", "experiments"], f"expected one recipe and one config block, got {sorted(blocks)}"
    for path, code in blocks.items():
        assert (ROOT / path).is_file(), f"README's {path} is not committed"
        assert (ROOT / path).read_text() == code, f"README's {path} differs from the committed file"


@pytest.mark.needs_shared_data
def test_the_readme_fork_runs_end_to_end_with_its_own_reward(tmp_path):
    """The blocks, written into a copy of experiments/ and configs/, run as the README says; the
    metrics show the new reward's parts with the config's bonus, and the run carries the fork's name."""
    blocks = fork_blocks((ROOT / "README.md").read_text())
    copy = tmp_path / "repo"
    for folder in ("experiments", "configs"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path, code in blocks.items():
        (copy / path).write_text(code)
    recipe = next(p for p in blocks if p.startswith("experiments/"))
    config = next(p for p in blocks if p.startswith("configs/"))
    workdir = tmp_path / "run"
    cmd = [sys.executable, "experiments/run.py", f"--config={config}:tiny", f"--workdir={workdir}", *SHRINK]
    done = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    reward = Path(recipe).stem  # the example's token reward is named after its recipe
    results = json.loads((workdir / "results.json").read_text())
    assert results["name"] == f"{Path(config).stem}_tiny"  # the fork's name, not rto_tldr_tiny
    assert results["recipe"] == recipe
    assert set(results["policies"]) >= {"sft", reward} and "dpo" not in results["policies"]
    assert json.loads((workdir / "ppo" / "done.json").read_text())["token_reward"] == reward
    ppo = [r for r in read_metrics(workdir / "metrics.jsonl") if r["stage"] == "ppo"]
    assert len(ppo) == 2  # 16 episodes in batches of 8
    for r in ppo:
        assert "reward/dpo" not in r and {"reward/bonus", "reward/kl", "reward/score"} <= r.keys()
        # The config's bonus (0.25, not the reward's default 0.5) on every response token.
        assert r["reward/bonus"] == pytest.approx(0.25 * r["response_length"], rel=1e-5)
        parts = r["reward/bonus"] + r["reward/kl"] + r["reward/score"]
        assert r["reward/total"] == pytest.approx(parts, rel=1e-4, abs=1e-5)
