"""Report rendering and pipeline argument checks (the full run is exercised by `make run`)."""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

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
    sec = Section("Headline").text("hello").table(df).image(png, "a plot").image(tmp_path / "missing.png", "skipped")
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
