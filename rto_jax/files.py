"""Temporary files and folders for atomic writes (write, then rename over the final path), created
with the permissions the user's umask gives a new file. `tempfile` makes them 0700 / 0600, so every
exported model, tokenizer and results file would be unreadable to colleagues on a shared machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (read from /proc where it can be: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir_for(final: str | os.PathLike) -> Path:
    """A new empty folder beside `final` (same filesystem, so `os.replace` is atomic), mode 0777 & ~umask."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o777 & ~umask())
    return tmp


def temp_file_for(final: str | os.PathLike) -> tuple[int, str]:
    """(fd, path) of a new file beside `final`, mode 0666 & ~umask."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Moves a folder made by `temp_dir_for` over `final` (replacing it), after giving everything in
    it the umask's permissions: libraries write some files 0600 themselves (safetensors does)."""
    tmp, final = Path(tmp), Path(final)
    mask = umask()
    for path in tmp.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
