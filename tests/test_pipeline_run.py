"""`safesteer run` end to end on a tiny random Llama saved to a folder and real offline data.

Pins the stage cache: a re-run computes nothing, a changed setting re-runs exactly the stages that
depend on it, a run killed during the SAE stage resumes without recomputing extraction, and the
report carries the numbers of the stage outputs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import chromium_screenshot, colour_fraction, make_tiny_llama, tiny_behaviour_section

from safesteer.config import Config, dump_toml, load_config
from safesteer.errors import SafesteerError
from safesteer.pipeline.runner import STAGES, Pipeline

pytestmark = pytest.mark.integration

DATASETS = [
    "go_emotions",
    "toxigen",
    "realtoxicityprompts",
    "advbench",
    "donotanswer",
    "xstest",
    "hh_rlhf_harmless",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    bb = make_tiny_llama(seed=1)
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return folder


def tiny_config(model_dir: Path, data_dir: Path) -> Config:
    cfg = Config()
    cfg.run.name = "tiny"
    cfg.model.name = str(model_dir)
    cfg.model.layer = 1
    cfg.model.max_length = 32
    cfg.data.source = "local"
    cfg.data.data_dir = str(data_dir)
    cfg.data.sae_datasets = DATASETS
    cfg.data.max_rows_per_dataset = 40
    cfg.extract.batch_size = 16
    cfg.sae.expansions = [2]
    cfg.sae.l1 = [1e-2]
    cfg.sae.batch_size = 16
    cfg.sae.epochs = 3
    cfg.sae.grid_epochs = 2
    cfg.atoms.candidates = 2
    cfg.atoms.judge = "none"
    cfg.evaluate.strategies = ["probe_harm", "random"]
    cfg.evaluate.alphas = [0.5]
    cfg.evaluate.metrics = ["harm_probe", "yes_harmful", "fluency", "crows"]
    cfg.evaluate.max_prompts = 6
    cfg.evaluate.max_bias = 0
    cfg.evaluate.calib_prompts = 4
    cfg.directions.random_members = 2
    cfg.evaluate.bootstrap = 50
    tiny_behaviour_section(cfg.behaviour)
    return cfg.validate()


def _ran(pipe: Pipeline) -> set[str]:
    return {name for name, status in pipe.status.items() if status == "ran"}


def test_run_caches_reruns_what_changed_and_reports_stage_numbers(tmp_path, tiny_model_dir, shared_data):
    cfg = tiny_config(tiny_model_dir, shared_data)
    out = tmp_path / "run"
    part = Pipeline(cfg, out, ["extract", "sae"])  # --stages extract,sae: those two, then stop
    assert part.run() is None
    assert (
        _ran(part) == {"extract", "sae"}
        and part.status["encode"] == "skipped"
        and not (out / "report.html").exists()
    )
    first = Pipeline(cfg, out)
    html = first.run()
    assert _ran(first) == set(STAGES) - {"report", "extract", "sae"}
    assert html == out / "report.html" and (out / "report.md").is_file()
    assert load_config(out / "config.toml") == cfg  # the config is saved beside the run

    again = Pipeline(cfg, out)
    again.run()
    assert _ran(again) == set() and set(again.status.values()) == {"cached"}

    cfg.evaluate.max_prompts = 8  # evaluation only
    assert _ran(_run(cfg, out)) == {"evaluate"}
    cfg.probes.max_rows = 150  # probes feed the map, atoms, directions and evaluation; not the SAE
    assert _ran(_run(cfg, out)) == {"probes", "map", "atoms", "directions", "evaluate", "behaviour"}
    cfg.behaviour.alphas = [1.0]  # the behaviour study only
    assert _ran(_run(cfg, out)) == {"behaviour"}

    # the report's headline numbers are the evaluate stage's numbers
    last = Pipeline(cfg, out)
    last.run()
    res = pd.read_csv(last.st["evaluate"].dir / "results.csv")
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    steered = res[res["strategy"] != "unsteered"]
    assert len(steered) >= 4
    for _, r in steered.iterrows():
        cell = f"{r['delta']:+.4f} [{r['delta_low']:+.4f}, {r['delta_high']:+.4f}]"
        assert cell in page and cell in md, cell
    base = res[res["strategy"] == "unsteered"].iloc[0]
    assert f"{base['value']:.4f} [{base['ci_low']:.4f}, {base['ci_high']:.4f}]" in page
    # the verdict comes first and carries the behaviour stage's test figures
    from safesteer.io import read_json
    from safesteer.pipeline.behaviour_report import pct

    summary = read_json(last.st["behaviour"].dir / "summary.json")
    assert page.index("Verdict") < page.index("Study metrics")
    assert pct(summary["test"]["unconditional"]["harmful_refusal"]) in page
    assert (out / "policies" / "NONE.txt").is_file() and "No strategy met the constraints" in page
    probes = pd.read_json(last.st["probes"].dir / "probe_metrics.json").T
    assert f"{probes.loc['harmfulness', 'auroc']:.4g}" in page
    assert page.count("data:image/png;base64,") >= 3 and "src='http" not in page
    shot = chromium_screenshot(
        out / "report.html", tmp_path / "report.png", 1280, 8000
    )  # behaviour sections come first
    assert colour_fraction(shot, (31, 119, 180), tol=30) > 0.002  # matplotlib's blue: the plots rendered


def _run(cfg: Config, out: Path) -> Pipeline:
    pipe = Pipeline(cfg, out)
    pipe.run()
    return pipe


def test_killed_during_sae_resumes_without_recomputing_extraction(tmp_path, tiny_model_dir, shared_data):
    cfg = tiny_config(tiny_model_dir, shared_data)
    cfg.sae.epochs = 400  # long enough to be killed in the middle
    cfg.sae.patience = 400
    cfg.sae.grid_epochs = 1
    cfg.evaluate.metrics = ["harm_probe"]
    cfg.evaluate.strategies = ["probe_harm"]
    path = tmp_path / "cfg.toml"
    path.write_text(dump_toml(cfg))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "safesteer.cli.main", "run", "--config", str(path), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    deadline = time.time() + 600
    ckpts: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        ckpts = (
            [p for p in out.glob("stages/sae-*/grid/*/checkpoints/*") if p.is_dir()] if out.is_dir() else []
        )
        if ckpts:  # training has checkpointed: let it run a little further, then kill it
            time.sleep(1.0)
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before it could be killed:\n" + proc.stdout.read().decode()[-2000:]
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    sae_dirs = list(out.glob("stages/sae-*"))
    assert len(sae_dirs) == 1 and not (sae_dirs[0] / "DONE.json").exists()
    (extract_dir,) = out.glob("stages/extract-*")
    before = {p: p.stat().st_mtime_ns for p in extract_dir.rglob("*") if p.is_file()}

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr + done.stdout
    assert "extract: cached" in log and "sae: running" in log
    assert "resuming" in log  # the SAE continued from its checkpoint
    assert {p: p.stat().st_mtime_ns for p in extract_dir.rglob("*") if p.is_file()} == before
    assert (sae_dirs[0] / "DONE.json").is_file() and (out / "report.html").is_file()
    assert log.rstrip().splitlines()[-1].startswith("report: ")


def test_masked_lm_runs_the_study_end_to_end(tmp_path, shared_data):
    """The original study's kind of model (a RoBERTa masked LM) through every stage, tiny and offline."""
    from conftest import make_tiny_roberta

    folder = tmp_path / "tiny-roberta"
    bb = make_tiny_roberta(seed=2)
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    cfg = tiny_config(folder, shared_data)
    cfg.model.kind = "masked"
    cfg.model.layer = 2  # the last block, as in the study
    cfg.evaluate.metrics = ["harm_probe", "yes_harmful", "fluency"]
    pipe = Pipeline(cfg.validate(), tmp_path / "run")
    assert pipe.run() is not None
    res = pd.read_csv(pipe.st["evaluate"].dir / "results.csv")
    assert set(res["metric"]) == {"harm_probe", "yes_harmful", "fluency"}
    assert (res[res["metric"] == "fluency"]["value"] < 0).all()  # pseudo-log-likelihood per token
    assert (
        pd.read_json(pipe.st["evaluate"].dir / "results.json", typ="series")["config"]["model_kind"]
        == "masked"
    )
    assert (
        "masked LM" in pipe.outputs["behaviour"].skipped
        and (tmp_path / "run" / "policies" / "NONE.txt").is_file()
    )
    cfg.model.kind = "causal"
    cfg.run.seed = 1  # a new extraction key, so the model is loaded again
    with pytest.raises(SafesteerError, match="model.kind = 'causal' but .* is a masked LM"):
        Pipeline(cfg, tmp_path / "run").run()
