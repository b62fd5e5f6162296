"""HTML reports, opened in a real headless browser (Debian's chromium): no JavaScript errors,
the expected charts in the DOM, a screenshot that is not blank; `compare` before/after."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from crossengine.cli import app

from .conftest import run_experiment

CHROMIUM = shutil.which("chromium")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it with apt-get)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--virtual-time-budget=20000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def open_in_browser(page: Path, tmp_path: Path) -> str:
    """The DOM after the page's scripts ran; asserts no JS error and a non-blank screenshot."""
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    assert 'data-rendered="1"' in dom, "the page's scripts ran to the end"
    assert 'data-js-errors="0"' in dom, re.findall(r'data-js-errors="\d+"', dom)
    shot = tmp_path / f"{page.stem}.png"
    _chromium("--window-size=1300,2400", f"--screenshot={shot}", page.as_uri())
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, "the screenshot is not one flat colour"
    colored = (pixels.max(-1) - pixels.min(-1)) > 60
    assert colored.mean() > 0.002, "some chart colour is on screen"
    return dom


@pytest.fixture(scope="module")
def quickstart(quickstart_cli):
    return quickstart_cli[0]


@needs_browser
def test_quickstart_report_opens_in_a_browser(quickstart, tmp_path):
    page = quickstart / "report.html"
    assert page.exists(), "written at the end of every run"
    dom = open_in_browser(page, tmp_path)
    for chart in ("per-sample-plot", "breakdown-plot", "nearest-plot"):
        assert f'id="{chart}"' in dom, chart
    assert dom.count('class="main-svg"') >= 3, "plotly drew the charts"
    assert "hf-bf16" in dom and "token_mult_prob_error" in dom and "Worst tokens" in dom
    assert "reference's top-5" in dom and "candidate's top-5" in dom, "both sides' top-5 at the worst tokens"
    assert "cdn" not in page.read_text()[:2000].lower(), "self-contained: no CDN"


@needs_browser
def test_vision_report_shades_image_spans(vision_bidirectional, tmp_path):
    run_dir = vision_bidirectional
    text = (run_dir / "report.html").read_text()
    assert "rgba(255,165,0,0.18)" in text and "rgba(128,0,128,0.5)" in text, "image spans shaded, bidirectional spans marked"
    dom = open_in_browser(run_dir / "report.html", tmp_path)
    assert 'id="ablation-plot"' in dom and 'id="per-sample-plot"' in dom


def test_report_command_writes_html_where_asked(quickstart, tmp_path):
    out = tmp_path / "elsewhere.html"
    result = CliRunner().invoke(app, ["report", str(quickstart), "--html", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1_000_000 and "per-sample" in out.read_text()


SMALL = """\
model: tiny-text
reference: a
engines:
  a: {type: hf}
  b: {type: hf, dtype: bfloat16}
samples:
  - text: "The quick brown fox jumps over the lazy dog."
  - text: "Numbers are computed, never typed in."
"""


@pytest.fixture(scope="module")
def small(ray_cluster, tmp_path_factory):
    """One run of SMALL: the "before" of compare, and a run of other samples than quickstart's."""
    d = tmp_path_factory.mktemp("small")
    (d / "before.yaml").write_text(SMALL)
    return run_experiment(d / "before.yaml", d / "out", run_id="before")[0]


@needs_browser
def test_compare_before_and_after(small, tmp_path):
    before, after_path = small, tmp_path / "after.yaml"
    after_path.write_text(SMALL + "variants:\n  b-eager: {engine: b, attn_implementation: eager}\n")
    after, _ = run_experiment(after_path, tmp_path / "out", run_id="after")
    same = CliRunner().invoke(app, ["compare", str(before), str(before)])
    assert same.exit_code == 0 and "no changes" in same.output, same.output
    result = CliRunner().invoke(app, ["compare", str(before), str(after), "--html", str(tmp_path / "cmp.html")])
    assert result.exit_code == 0, result.output
    assert re.search(r"b-eager\s+│\s+all\s+│\s+new", result.output), result.output
    assert re.search(r"\bb\s+│\s+all\s+│\s+both", result.output)
    dom = open_in_browser(tmp_path / "cmp.html", tmp_path)
    assert 'id="compare-plot"' in dom and "b-eager" in dom


def test_compare_refuses_runs_of_other_samples(quickstart, small):
    result = CliRunner().invoke(app, ["compare", str(quickstart), str(small)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "their samples differ (6 vs 2 samples)" in line


@needs_browser
def test_monitor_html_marks_steps_over_threshold(tmp_path):
    from crossengine.monitor import KLMonitor

    rng = np.random.default_rng(0)
    with KLMonitor(tmp_path / "mon", worst_k=3) as mon:
        for step in range(6):
            t = np.log(rng.uniform(0.05, 1, (2, 16)))
            g = t + rng.normal(0, 0.002 * 10**step / 100 if step < 5 else 0.5, t.shape)
            mon.step(step, g, t, np.ones_like(t), token_ids=rng.integers(0, 100, t.shape), sample_ids=["a", "b"])
    result = CliRunner().invoke(app, ["monitor", str(tmp_path / "mon"), "--html"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "mon" / "monitor.html"
    dom = open_in_browser(page, tmp_path)
    assert 'id="monitor-plot"' in dom and "Worst tokens of step 5" in dom, "the over-threshold step's worst tokens"
    assert "Worst tokens of step 0" not in dom


@needs_browser
def test_a_run_without_distributions_draws_no_empty_chart_and_ranks_by_what_exists(ray_cluster, tmp_path):
    """Dump vs dump (sampled log-probs only, no KL anywhere): one chart along the sequence (|Δ log-prob|) and a
    sentence saying why there is no KL chart; the breakdown shows mean |Δ log-prob|; the worst tokens are the
    largest |Δ log-prob|, in that order, with '-' where a side has no top-1."""
    import json as jsonlib

    from .conftest import EXPERIMENTS, run_experiment

    rng = np.random.default_rng(0)
    records = [jsonlib.loads(line) for line in (EXPERIMENTS / "data" / "rollout-dump.jsonl").read_text().splitlines()]
    (tmp_path / "a.jsonl").write_text("".join(jsonlib.dumps(r) + "\n" for r in records))
    moved = [{**r, "logprobs": [min(0.0, x + float(rng.normal(0, 0.05))) for x in r["logprobs"]]} for r in records]
    (tmp_path / "b.jsonl").write_text("".join(jsonlib.dumps(r) + "\n" for r in moved))
    path = tmp_path / "e.yaml"
    path.write_text("model: tiny-text\nreference: trainer\nengines:\n  trainer: {type: logprobs, path: a.jsonl}\n  rollout: {type: logprobs, path: b.jsonl}\nsamples:\n  - dump: trainer\n")
    run_dir, _ = run_experiment(path, tmp_path / "results")
    page = (run_dir / "report.html").read_text()
    assert "per-token KL(ref‖cand)" not in page and "No KL chart: neither engine gave a distribution" in page
    assert "mean |Δ log-prob| by modality" in page and "KL mean by" not in page
    tokens = pd.read_parquet(run_dir / "tokens")
    largest = tokens.nlargest(20, "abs_lp_diff")
    header, *rows = _first_table(page[page.index("<h2>Worst tokens") :])
    assert [int(r[header.index("position")]) for r in rows] == largest["position"].tolist()
    assert {r[header.index("reference's top-1")] for r in rows} == {"-"}
    open_in_browser(run_dir / "report.html", tmp_path)


def _first_table(html_text: str) -> list[list[str]]:
    """The first <table> of an HTML fragment as rows of cell texts (header first)."""

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell, self.done = [], None, False

        def handle_starttag(self, tag, attrs):
            if self.done:
                return
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None and not self.done:
                self.rows[-1].append(self.cell.strip())
                self.cell = None
            elif tag == "table" and self.rows:
                self.done = True

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Cells()
    parser.feed(html_text)
    return parser.rows
