"""The token page (rto_jax/eval/token_page.py) as a pure function of plain data, and that it renders
in a headless Chromium (rto_jax/tools/screenshot.py)."""

import html
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from rto_jax.eval import token_page
from rto_jax.tools import screenshot


class Spans(HTMLParser):
    """The attributes of every token <span> (class "tok") and the text inside each."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            self.spans.append({**attrs, "text": ""})
            self._open = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = False

    def handle_data(self, data):
        if self._open:
            self.spans[-1]["text"] += data


def spans_of(page: str) -> list[dict]:
    parser = Spans()
    parser.feed(page)
    return parser.spans


def sample(tokens, dpo, kl, **kw):
    n = len(tokens)
    score = [0.0] * (n - 1) + [0.7]
    return token_page.SampleView(
        prompt=kw.pop("prompt", "a prompt"),
        tokens=tokens,
        token_ids=kw.pop("token_ids", list(range(10, 10 + n))),
        parts={"dpo": dpo, "kl": kl, "score": score},
        log_ratios={"dpo": [20 * v for v in dpo], "policy": [-100 * v for v in kl]},
        raw_score=1.5,
        score=0.7,
        eos=True,
        **kw,
    )


def test_one_span_per_token_with_its_values_escaped_and_no_url():
    a = sample([" The", "<script>alert(1)</script>", " &", "\n", "<eos>"], [0.03, -0.05, 0.0, 0.01, -0.02],
               [-1e-3, 2e-4, 0.0, -5e-4, 1e-4], token_ids=[5, 6, 7, 8, 1])  # fmt: skip
    b = sample([" B"], [0.04], [-0.002], prompt="<b>bold</b> & more")
    page = token_page.render(
        [a, b], title="t <x>", color_by=["dpo"], scale=0.05, meta={"token reward": "rto(beta_dpo=0.05)"}, eos_id=1
    )
    spans = spans_of(page)
    assert len(spans) == 6  # one per valid token: no pad was given, none is invented
    assert [s["data-id"] for s in spans] == ["5", "6", "7", "8", "1", "10"]
    for s, dpo, kl, lr_dpo, lr_pi in zip(
        spans,
        a.parts["dpo"] + b.parts["dpo"],
        a.parts["kl"] + b.parts["kl"],
        a.log_ratios["dpo"] + b.log_ratios["dpo"],
        a.log_ratios["policy"] + b.log_ratios["policy"],
    ):
        assert float(s["data-dpo"]) == pytest.approx(dpo, rel=1e-6, abs=1e-12)
        assert float(s["data-kl"]) == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert float(s["data-lr-dpo"]) == pytest.approx(lr_dpo, rel=1e-6, abs=1e-12)
        assert float(s["data-lr-policy"]) == pytest.approx(lr_pi, rel=1e-6, abs=1e-12)
        assert float(s["data-color"]) == pytest.approx(dpo, rel=1e-6, abs=1e-12)  # coloured by the DPO part
        title = s["title"]
        assert f"dpo part: {dpo:+.4g}" in title and f"kl part: {kl:+.4g}" in title
        assert f"log \u03c0_dpo/\u03c0_ref: {lr_dpo:+.4g}" in title and f"log \u03c0/\u03c0_ref: {lr_pi:+.4g}" in title
        assert f"id {s['data-id']}" in title
    assert spans[1]["text"] == "<script>alert(1)</script>"  # shown as text ...
    assert "<script>" not in page and "&lt;script&gt;" in page  # ... never as markup
    assert spans[2]["text"] == " &" and "<b>bold</b>" not in page
    assert spans[3]["text"] == "\u21b5\n"  # a newline is visible and still breaks the line
    assert "(EOS)" in spans[4]["title"] and "eos" in spans[4]["class"].split()
    assert "http" not in page.lower() and "src=" not in page and "<link" not in page
    # The colour follows the sign: the most negative DPO value is red, the most positive blue.
    rgb = [tuple(map(int, re.search(r"rgb\((\d+),(\d+),(\d+)\)", s["style"]).groups())) for s in spans]
    assert rgb[1][0] > rgb[1][2] + 100 and rgb[0][2] > rgb[0][0] + 50 and rgb[2] == (255, 255, 255)
    # The score at the end of each response, raw and as PPO uses it; per-sample sums of every part.
    assert page.count('class="score"') == 2 and 'data-raw-score="1.5"' in page and 'data-score="0.7"' in page
    assert f"<td>{sum(a.parts['dpo']):+.4g}</td>" in page
    assert html.escape("t <x>") in page and "rto(beta_dpo=0.05)" in page


def test_without_a_dpo_part_the_page_colours_by_the_other_parts_and_says_so():
    s = token_page.SampleView(
        prompt="p", tokens=["a", "b"], token_ids=[3, 4], parts={"kl": [-0.1, 0.2], "score": [0.0, 0.5]},
        log_ratios={"policy": [10.0, -20.0]}, raw_score=0.1, score=0.5, eos=False,
    )  # fmt: skip
    page = token_page.render([s], title="ppo", color_by=["kl"], notes=["no DPO part: coloured by kl"])
    spans = spans_of(page)
    assert [float(x["data-color"]) for x in spans] == [-0.1, 0.2]
    assert "no DPO part" in page and "no EOS" in page


def test_token_strings_decode_each_token_readably():
    pieces = {1: "\u0120the", 2: "\u0120cat", 3: "</s>"}  # byte-level BPE markers: decode turns them into text

    def decode(ids):
        return "".join(pieces[i] for i in ids).replace("\u0120", " ")

    assert token_page.token_strings([1, 2, 3], decode) == [" the", " cat", "</s>"]


def png_pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.skipif(
    screenshot.find_browser() is None,
    reason="no headless Chromium on PATH (chromium, chromium-browser, google-chrome): apt-get install chromium",
)
def test_the_page_renders_in_a_headless_browser_with_both_colours(tmp_path):
    rng = np.random.default_rng(0)
    words = [" the", " summary", " is", " good", " but", " vague", ",", " and", " too", " long", "."]
    samples = []
    for _ in range(3):
        n = 24
        dpo = np.clip(rng.normal(0, 0.04, n), -0.05, 0.05).tolist()
        samples.append(sample([words[i % len(words)] for i in range(n)], dpo, (-0.001 * rng.random(n)).tolist()))
    page = tmp_path / "tokens.html"
    page.write_text(token_page.render(samples, title="render test", color_by=["dpo"], scale=0.05), encoding="utf-8")
    out = screenshot.screenshot(page, tmp_path / "shot.png", width=900, height=700)
    pixels = png_pixels(out)
    assert pixels.shape[:2] == (700, 900)
    assert pixels.std() > 10  # not blank
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert np.sum((r > 150) & (r > g + 60) & (r > b + 60)) > 200  # red-ish tokens
    assert np.sum((b > 120) & (b > r + 60)) > 200  # blue-ish tokens


def test_screenshot_without_a_browser_says_how_to_install_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    page = tmp_path / "p.html"
    page.write_text("<p>x</p>")
    assert screenshot.main([str(page), str(tmp_path / "p.png")]) == 2
    assert "apt-get install chromium" in capsys.readouterr().err
