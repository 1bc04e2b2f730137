"""A new gate kind and a new refusal judge are each one class + one registration: a toy of each
(the judge registered here, the gate kind in tests/test_steering_gates.py) runs through the tiny
behaviour study and the gate through the service
(`serve --run`), which decides per prompt as the study's gate does. The stacked gate (several layers
read in the same pass) goes the same way."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_behaviour_section
from fastapi.testclient import TestClient
from test_steering_gates import ToyGate  # a toy gate kind: one class + @register_gate there

from safesteer.behaviour.config import StudyConfig
from safesteer.behaviour.study import run_study
from safesteer.cli.main import main
from safesteer.config import Config, dump_toml
from safesteer.evaluate.generation import is_refusal
from safesteer.evaluate.judges import JUDGES, register_judge
from safesteer.models import load_backbone
from safesteer.serve.bundle import publish, write_bundle
from safesteer.steering.condition import Condition, gate_flags

pytestmark = pytest.mark.integration


class CountingJudge:
    """A toy judge: the phrase list's verdicts, counting the answers it judged."""

    name = "toy-counting"
    answers_judged = 0

    @classmethod
    def from_options(cls, options):
        return cls()

    def __call__(self, prompts, answers):
        CountingJudge.answers_judged += len(answers)
        return np.array([float(is_refusal(a)) for a in answers])


@pytest.fixture(scope="module")
def toys():
    register_judge(CountingJudge)
    yield
    JUDGES.pop(CountingJudge.name)


def _study(tmp_path_factory, model_dir, data_dir, **settings):
    cfg = tiny_behaviour_section(StudyConfig())
    cfg.strategies = ["refusal_caa", "refusal_dim"]
    for k, v in settings.items():
        setattr(cfg, k, v)
    out = tmp_path_factory.mktemp("study")
    summary = run_study(cfg, out / "study", model=str(model_dir), layer=1, seed=0, data_dir=data_dir)
    run = out / "run"
    run.mkdir()
    config = Config()
    config.model.name = str(model_dir)
    (run / "config.toml").write_text(dump_toml(config))
    assert write_bundle(summary, out / "study", run / "bundle", model=str(model_dir), require_gain=False)
    publish(run / "bundle", run)
    return summary, out / "study", run


def _service_decides_as_the_study(study, run, summary, monkeypatch):
    """`serve --run` on the study's bundle: the service's gate flags the prompts the study's gate flags."""
    import uvicorn

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    assert main(["serve", "--run", str(run), "--port", "8125"]) == 0
    ans = pd.read_csv(study / "answers.csv", keep_default_na=False)
    prompts = ans[ans["policy"] == "unsteered"]["prompt"].tolist()[:12]
    c = summary["test"]["conditional"]["policy"]
    gate = Condition.load(study / "gate").with_threshold(c["threshold"])
    want = gate_flags(load_backbone(summary["config"]["model"]), gate, prompts)
    with TestClient(captured["app"]) as client:
        body = {"prompts": prompts, "max_new_tokens": 2, "policy": "recommended"}
        got = client.post("/v1/generate", json=body).json()
    assert got["steered"] == want.tolist()
    return want


def test_a_toy_gate_kind_and_a_toy_judge_run_through_the_study_and_the_service(
    toys, behaviour_run, tmp_path_factory, shared_data, monkeypatch
):
    _, _, model_dir, _ = behaviour_run
    before = CountingJudge.answers_judged
    summary, study, run = _study(
        tmp_path_factory, model_dir, shared_data, gate_kind=ToyGate.name, judge=CountingJudge.name
    )
    assert summary["gate"]["kind"] == ToyGate.name and summary["config"]["judge"] == CountingJudge.name
    assert CountingJudge.answers_judged > before  # the study's verdicts are the toy judge's
    ans = pd.read_csv(study / "answers.csv", keep_default_na=False)
    assert ans["refusal"].tolist() == [float(is_refusal(a)) for a in ans["answer"]]
    assert summary["test"]["conditional"] is not None, (
        "no conditional policy: the service check would not run"
    )
    gate = Condition.load(run / "policies" / "gate")
    assert gate.kind == ToyGate.name  # the served gate is the toy kind
    _service_decides_as_the_study(study, run, summary, monkeypatch)


def test_a_stacked_gate_reads_every_gate_layer_in_the_study_and_the_service(
    behaviour_run, tmp_path_factory, shared_data, monkeypatch
):
    _, _, model_dir, _ = behaviour_run
    summary, study, run = _study(tmp_path_factory, model_dir, shared_data, gate_kind="stacked")
    g = summary["gate"]
    assert g["kind"] == "stacked" and g["layers"] == [1, 2] and g["layer"] == 2
    assert list(g["val_auroc_vs_xstest_safe"]) == ["1+2"]  # one gate on both layers side by side
    gate = Condition.load(study / "gate")
    assert gate.layers == (1, 2) and gate.d == 2 * 32
    assert summary["test"]["conditional"] is not None, (
        "no conditional policy: the service check would not run"
    )
    _service_decides_as_the_study(study, run, summary, monkeypatch)
