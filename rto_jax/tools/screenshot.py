"""A PNG screenshot of a local HTML page with a headless Chromium (e.g. evaluate/tokens_<policy>.html).

    python -m rto_jax.tools.screenshot PAGE.html OUT.png [--width 1200 --height 900]

Uses the first of chromium, chromium-browser, google-chrome, google-chrome-stable on PATH (Debian /
Ubuntu: `apt-get install chromium`); exits with status 2 and says so when there is none.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "no headless Chromium on PATH (looked for: {names}); install one, e.g. `apt-get install chromium`"


class NoBrowserError(RuntimeError):
    pass


def find_browser() -> str | None:
    """The path of the first browser of BROWSERS on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page, out, width: int = 1200, height: int = 900, timeout: float = 120.0) -> Path:
    """Renders `page` (a local .html file) at `width` x `height` into the PNG `out`; returns `out`.

    Raises NoBrowserError when no browser is installed, RuntimeError when the browser writes no image.
    """
    browser = find_browser()
    if browser is None:
        raise NoBrowserError(INSTALL_HINT.format(names=", ".join(BROWSERS)))
    page, out = Path(page).resolve(), Path(out).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no such page: {page}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rto_jax_chromium_") as profile:  # no shared profile lock
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            page.as_uri(),
        ]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    if not out.is_file() or out.stat().st_size == 0:
        tail = "\n".join((result.stderr or "").strip().splitlines()[-10:])
        raise RuntimeError(f"{Path(browser).name} wrote no screenshot (exit {result.returncode}):\n{tail}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", help="the HTML file")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.page, args.out, args.width, args.height)
    except NoBrowserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
