"""Command-line tools: `python -m rto_jax.tools.plan` (memory planner), `python -m rto_jax.tools.screenshot
PAGE.html OUT.png` (an image of an evaluation token page, with headless Chromium)."""
