"""From run to service: the recommended policy's files round-trip, `serve --run` serves them, and the
service answers the evaluation's prompts as the evaluation did."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from safesteer.cli.main import main
from safesteer.config import dump_toml
from safesteer.io import read_json
from safesteer.serve.bundle import GATE_PROBE, load_bundle, publish, write_bundle
from safesteer.serve.policies import PolicyStore
from safesteer.steering.condition import Condition, gate_flags
from safesteer.steering.strategies import DirectionSet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_folder(behaviour_run, tmp_path_factory):
    out, _, _, cfg = behaviour_run
    run = tmp_path_factory.mktemp("run")
    (run / "config.toml").write_text(dump_toml(cfg))
    summary = read_json(out / "summary.json")
    assert write_bundle(summary, out, run / "bundle", model=cfg.model.name, require_gain=False)
    publish(run / "bundle", run)
    return run, summary


def test_policy_files_round_trip(behaviour_run, run_folder):
    out, _, _, cfg = behaviour_run
    run, summary = run_folder
    c = summary["test"]["conditional"]["policy"]
    pol = run / "policies"
    raw = json.loads((pol / "recommended.json").read_text())
    assert (
        raw["format"] == "safesteer-policy"
        and raw["provenance"]["test"]["harmful_refusal"] == summary["test"]["conditional"]["harmful_refusal"]
    )
    store = PolicyStore(pol)  # the service's own reader validates it
    p = store.get("recommended").policy
    assert store.names() == ["recommended"] and p.directions == [c["strategy"]] and p.layer == cfg.model.layer
    assert p.alpha == pytest.approx(c["alpha"] * summary["directions"]["scale_median_norm"], rel=1e-12)
    assert (
        p.positions == cfg.behaviour.steer_positions == "prompt"
    )  # the study's steered positions travel with it
    assert (
        p.condition.probe == GATE_PROBE
        and p.condition.score_threshold == c["threshold"]
        and p.condition.position == cfg.behaviour.gate_position == "prompt"
    )
    gate, study_gate = Condition.load(pol / "gate"), Condition.load(out / "gate")
    np.testing.assert_array_equal(gate.w, study_gate.w)
    assert gate.kind == study_gate.kind == "mlp" and gate.W1.shape == (
        2 * 16,
        32,
    )  # the config's MLP gate, intact
    np.testing.assert_array_equal(gate.W1, study_gate.W1)
    np.testing.assert_array_equal(gate.b1, study_gate.b1)
    assert (gate.b, gate.layer, gate.threshold) == (study_gate.b, study_gate.layer, c["threshold"])
    np.testing.assert_array_equal(
        DirectionSet.load(pol / "directions")[c["strategy"]].vector,
        DirectionSet.load(out / "directions")[c["strategy"]].vector,
    )
    b = load_bundle(run)
    assert b["model"] == cfg.model.name and b["none"] is None and list(b["probes"]) == [GATE_PROBE]
    assert b["probes"][GATE_PROBE].position == "prompt"


def test_serve_run_answers_as_the_evaluation(behaviour_run, run_folder, monkeypatch):
    import uvicorn

    from safesteer.models import load_backbone

    out, _, model_dir, cfg = behaviour_run
    run, summary = run_folder
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    assert main(["serve", "--run", str(run), "--port", "8124"]) == 0
    ans = pd.read_csv(out / "answers.csv", keep_default_na=False)
    # the direct sets (the attack sets' wrapped rows are scored by family-fold gates, conversations are
    # chats: test_chat_endpoint_follows_the_studys_conversation_rule)
    cond = ans[(ans["policy"] == "conditional") & ans["set"].isin(["harmful", "safe", "qa"])]
    cond = cond.reset_index(drop=True)
    c = summary["test"]["conditional"]["policy"]
    every = gate_flags(
        load_backbone(str(model_dir)),
        Condition.load(out / "gate").with_threshold(c["threshold"]),
        cond["prompt"].tolist(),
    )
    pick = sorted(list(np.flatnonzero(every)[:8]) + list(np.flatnonzero(~every)[:8]))
    cond = cond.iloc[pick]
    prompts, expected, flags = cond["prompt"].tolist(), cond["answer"].tolist(), every[pick]
    assert 0 < flags.sum() < len(prompts)  # both kinds of prompt are in the check
    with TestClient(captured["app"]) as client:
        assert client.get("/healthz").json()["policies"] == ["recommended"]
        body = {"prompts": prompts, "max_new_tokens": cfg.behaviour.max_new_tokens, "policy": "recommended"}
        got = client.post("/v1/generate", json=body).json()
        plain = client.post("/v1/generate", json={**body, "policy": None}).json()
    assert got["steered"] == flags.tolist()  # the service's gate decides as the evaluation's
    assert [a.strip() for a in got["completions"]] == expected  # … and the answers are the evaluation's
    unsteered = ans[ans["policy"] == "unsteered"].set_index(["set", "prompt"])["answer"]
    base = [unsteered[(s, p)] for s, p in zip(cond["set"].tolist(), prompts)]
    assert [a.strip() for a in plain["completions"]] == base
    assert all(e == b for e, b, f in zip(expected, base, flags) if not f)  # unflagged: answered as unsteered
    assert any(e != b for e, b, f in zip(expected, base, flags) if f)  # flagged: the steering changed answers


def test_serve_run_without_a_recommendation(behaviour_run, tmp_path, monkeypatch, capsys):
    import uvicorn

    out, outputs, _, cfg = behaviour_run
    (tmp_path / "config.toml").write_text(dump_toml(cfg))
    publish(outputs.policy, tmp_path)
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    assert main(["serve", "--run", str(tmp_path)]) == 0
    assert "no policy recommended" in capsys.readouterr().err
    with TestClient(captured["app"]) as client:
        assert client.get("/healthz").json()["policies"] == []
    assert main(["serve", "--run", str(tmp_path / "nope")]) == 2


def test_chat_endpoint_follows_the_studys_conversation_rule(behaviour_run, run_folder, monkeypatch):
    """The study's conversations ([request, reply, short follow-up]) sent as chats: the service's gate
    probability is the sigmoid of the study's score of that row (the same text, gate_text of the chat),
    it steers exactly the rows the study counts as flagged, and answers as the study did."""
    import uvicorn

    out, _, _, cfg = behaviour_run
    run, summary = run_folder
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    assert main(["serve", "--run", str(run), "--port", "8125"]) == 0
    P = pd.read_csv(out / "features" / "prompts.csv", keep_default_na=False)
    scores = pd.read_csv(out / "gate_scores.csv")["score"].to_numpy()
    conv = P.index[P["group"].str.startswith("conv:") & (P["split"] == "test")].tolist()
    assert len(conv) >= 4
    c = summary["test"]["conditional"]["policy"]
    ans = pd.read_csv(out / "answers.csv", keep_default_na=False)
    study = ans[ans["set"].str.startswith("conv:") & (ans["policy"] == "conditional")].set_index("prompt")
    flags, same = [], []
    with TestClient(captured["app"]) as client:
        for i in conv:
            chat = json.loads(P.at[i, "chat"])
            assert len(chat) == 3 and chat[-1]["role"] == "user"
            body = {"model": f"{cfg.model.name}:recommended", "messages": chat, "max_tokens": 4}
            r = client.post("/v1/chat/completions", json=body)
            if r.status_code == 422 and r.json()["error"]["code"] == "context_length_exceeded":
                continue  # the tiny model's 64-token context; the study kept the chat's last tokens
            assert r.status_code == 200, r.text
            info = r.json()["safesteer"]
            want = 1 / (1 + np.exp(-scores[i]))
            assert info["condition_probability"] == pytest.approx(want, rel=1e-5, abs=1e-7)
            assert info["steered"] == bool(scores[i] > c["threshold"])
            flags.append(info["steered"])
            if P.at[i, "text"] in study.index:
                got = r.json()["choices"][0]["message"]["content"].strip()
                same.append(got.startswith(str(study.at[P.at[i, "text"], "answer"]).strip()))
                print(
                    "CMP", repr(got), repr(study.at[P.at[i, "text"], "answer"]), repr(P.at[i, "chat"])[:300]
                )
    assert len(flags) >= 4 and same and all(same)
