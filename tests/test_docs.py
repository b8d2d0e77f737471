"""The documentation stays true to the tree: every link and cited path resolves (anchors included),
code cites docs pages rather than README sections, the README stays one screen of what a user
needs, user pages carry no issue numbers or commit hashes, and results tables are what the
generators print from their results files."""

import io
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CODE_DIRS = ("rto_jax", "experiments", "configs", "benchmarks", "third_party")
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DOCS_CITATION = re.compile(r"(?<![\w./-])(docs/[\w./-]*[\w/])(#[\w-]+)?")
# `docs/DESIGN.md 1.2`: a section number, which moves when the page does; cite an #anchor instead.
DOCS_SECTION_NUMBER = re.compile(r"(?<![\w./-])docs/[\w./-]*\.md,? (?:section )?\d")
REPO_PATH = re.compile(r"`((?:rto_jax|experiments|configs|benchmarks|tests|third_party|docs)/[^`\s]*)`")
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues? \d+|(?<![\w&/#])#\d+\b")
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")
# Code that names a README other than as a file (`third_party/README.md`) cites one of its sections,
# which the README does not keep: README "Section", (README, Section), see README, README.md#anchor.
README_IN_CODE = re.compile(r"\bREADME\b(?!\.md\b)|README\.md#")
# In the markdown beside the code, a subpackage's own README ("its README") is fine; the top-level
# README's sections are not.
README_SECTION_IN_MARKDOWN = re.compile(
    r"README\s*[:,]?\s*[\"'(]|top-level README|README \(section|README\.md#|README's [\"']"
)


def user_pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(path: Path):
    """(line number, line) outside fenced code blocks."""
    inside = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links and inline code reduced to their text, lowercase, every
    character but letters, digits, '_', '-' and spaces dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def check_target(source: Path, target: str, base: Path) -> str | None:
    """None when `target` (a path relative to `base`, optionally with #anchor) exists; else why not."""
    path_part, _, anchor = target.partition("#")
    resolved = (base / path_part).resolve() if path_part else source
    if not resolved.exists():
        return f"{path_part} does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{resolved.relative_to(ROOT)} has no heading with anchor #{anchor}"
    return None


def code_files() -> list[Path]:
    files = []
    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in (".py", ".md") and path.is_file() and "results" not in path.parts:
                files.append(path)
    return files


def test_slug_follows_githubs_rules():
    assert slug("Fork an experiment") == "fork-an-experiment"
    assert slug("The synthetic benchmark: `make demo`") == "the-synthetic-benchmark-make-demo"
    assert slug("What matching the authors' code changes") == "what-matching-the-authors-code-changes"
    assert slug("A real model, offline: SmolLM2-135M-Instruct on TL;DR") == (
        "a-real-model-offline-smollm2-135m-instruct-on-tldr"
    )
    assert slug("Resuming, and what interrupts a run") == "resuming-and-what-interrupts-a-run"


def test_every_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in [*user_pages(), *(path for path in code_files() if path.suffix == ".md")]:
        for number, line in prose_lines(page):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                why = check_target(page, target, page.parent)
                if why:
                    broken.append(f"{page.relative_to(ROOT)}:{number}: ({target}): {why}")
    assert not broken, "\n".join(broken)


def test_every_repository_path_the_docs_name_exists():
    """`rto_jax/...`, `tests/x.py::test_y`, `configs/x.py:preset` and the like, in backticks."""
    missing = []
    for page in user_pages():
        for number, line in prose_lines(page):
            for cited in REPO_PATH.findall(line):
                if any(ch in cited for ch in "<>*{}"):
                    continue  # a pattern (`benchmarks/results/<date>.json`), not a file
                path, _, test_name = cited.partition("::")
                path = path.split(":")[0].rstrip(".,;)")
                if not (ROOT / path).exists():
                    missing.append(f"{page.relative_to(ROOT)}:{number}: {cited}")
                elif test_name and f"def {test_name}(" not in (ROOT / path).read_text(encoding="utf-8"):
                    missing.append(f"{page.relative_to(ROOT)}:{number}: {cited}: no such test")
    assert not missing, "\n".join(missing)


def test_every_docs_path_cited_in_code_exists():
    broken = []
    for source in code_files():
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            for path, anchor in DOCS_CITATION.findall(line):
                why = check_target(source, path + anchor, ROOT)
                if why:
                    broken.append(f"{source.relative_to(ROOT)}:{number}: {path}{anchor}: {why}")
            if DOCS_SECTION_NUMBER.search(line):
                broken.append(f"{source.relative_to(ROOT)}:{number}: a section number; cite docs/<page>.md#anchor")
    assert not broken, "\n".join(broken)


def test_code_cites_docs_pages_not_readme_sections():
    """The README is a front page that changes; a comment that says README "Section" goes stale."""
    cited = []
    for source in code_files():
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            pattern = README_IN_CODE if source.suffix == ".py" else README_SECTION_IN_MARKDOWN
            if pattern.search(line):
                cited.append(f"{source.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not cited, "cite a docs/ page (docs/<page>.md#anchor) instead:\n" + "\n".join(cited)


def test_the_readme_is_one_screen_of_what_a_user_needs():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    headings = [line for line in lines if line.startswith("## ")]
    for needed in ("## Quick start", "## Fork an experiment", "## Documentation"):
        assert needed in headings, f"README.md lacks {needed!r}"
    assert "docs/README.md" in README.read_text(encoding="utf-8"), "README.md must link the docs index"


def test_user_pages_carry_no_issue_numbers_or_commit_hashes():
    found = []
    for page in user_pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, what in ((ISSUE_NUMBER, "issue number"), (COMMIT_HASH, "commit hash")):
                for match in pattern.finditer(line):
                    found.append(f"{page.relative_to(ROOT)}:{number}: {what} {match.group(0)!r}")
    assert not found, "\n".join(found)


def fenced_blocks(path: Path) -> list[str]:
    blocks, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize(
    "results_file", ["2026-12-07.json", "2026-12-03.json", "2026-11-24.json", "2026-12-06-attention.json"]
)
def test_benchmark_results_page_is_what_the_results_files_print(results_file):
    from benchmarks.run import summary

    rows = json.loads((ROOT / "benchmarks" / "results" / results_file).read_text())["rows"]
    printed = io.StringIO()
    summary(rows, file=printed)
    page = DOCS / "results" / "benchmarks.md"
    assert f"`benchmarks/results/{results_file}`" in page.read_text(encoding="utf-8")
    assert printed.getvalue().rstrip("\n") in fenced_blocks(page), (
        f"regenerate the block of {results_file} in {page.relative_to(ROOT)} with benchmarks.run.summary"
    )


@pytest.mark.parametrize("name", ["full", "lora", "lora10x"])
def test_lora_demo_tables_are_what_their_results_files_print(name):
    from rto_jax.eval.report import results_table

    folder = DOCS / "results" / "lora_demo"
    printed = results_table(json.loads((folder / f"{name}.json").read_text()))
    shown = (folder / f"{name}.md").read_text(encoding="utf-8")
    # The same table, whatever order the methods are listed in.
    assert sorted(printed.strip().splitlines()) == sorted(shown.strip().splitlines())
