"""`safesteer serve`: option wiring (model load and uvicorn stubbed), probe/direction folder resolution."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from test_serve_common import (  # noqa: F401 - one_torch_thread is an autouse fixture
    TEXTS,
    make_directions,
    make_probes,
    one_torch_thread,
)

from safesteer.cli.main import main
from safesteer.cli.serve import resolve_directions, resolve_probes
from safesteer.errors import SafesteerError


@pytest.fixture()
def artefacts(tmp_path):
    make_directions().save(tmp_path / "run" / "directions")
    probes = make_probes()
    for name, p in probes.items():
        p.save(tmp_path / "probes" / name)
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "kid.json").write_text(
        json.dumps({"directions": ["harm"], "alpha": 2.0, "condition": {"probe": "harm", "threshold": 0.4}})
    )
    return tmp_path


def test_resolve_helpers(artefacts):
    assert resolve_directions(artefacts / "run").names() == ["harm", "tox", "deep"]
    assert resolve_directions(artefacts / "run" / "directions" / "directions.json").names() == [
        "harm",
        "tox",
        "deep",
    ]
    with pytest.raises(SafesteerError, match="no directions.json"):
        resolve_directions(artefacts / "probes")
    with pytest.raises(SafesteerError, match="missing directions"):
        resolve_directions(artefacts / "nope")
    probes = resolve_probes([str(artefacts / "probes")], None)
    assert {n: p.layer for n, p in probes.items()} == {"harm": 2, "tox": 1, "early": 0}
    named = resolve_probes([f"danger={artefacts / 'probes' / 'harm'}"], None)
    assert list(named) == ["danger"] and named["danger"].layer == 2
    with pytest.raises(SafesteerError, match="two probes are named 'harm'"):
        resolve_probes([str(artefacts / "probes" / "harm"), str(artefacts / "probes")], None)
    with pytest.raises(SafesteerError, match="not a probe folder"):
        resolve_probes([str(artefacts / "run")], None)


def test_serve_command_wires_everything(artefacts, tiny_llama, monkeypatch):
    import uvicorn

    import safesteer.models

    captured = {}
    loaded = {}
    monkeypatch.setattr(safesteer.models, "load_backbone", lambda name, **kw: loaded.update(kw) or tiny_llama)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    monkeypatch.setenv("SS_KEY", "k1")
    rc = main(
        [
            "serve",
            "--model",
            "tiny",
            "--policies",
            str(artefacts / "policies"),
            "--directions",
            str(artefacts / "run"),
            "--probes",
            str(artefacts / "probes"),
            "--api-key-env",
            "SS_KEY",
            "--port",
            "8123",
            "--max-texts",
            "3",
        ]
    )
    assert rc == 0 and captured["host"] == "127.0.0.1" and captured["port"] == 8123
    assert loaded == {"max_length": 2048}  # the served context: [serve] max_model_len, both engines
    with TestClient(captured["app"]) as c:
        h = c.get("/healthz").json()
        assert h["policies"] == ["kid"] and h["auth"] and h["limits"]["max_texts"] == 3
        r = c.post("/v1/score", json={"texts": TEXTS[:3], "policy": "kid"})
        assert r.status_code == 200 and len(r.json()["condition_probability"]) == 3
        assert c.put("/v1/policies/new", json={"directions": ["tox"]}).status_code == 401
        assert (
            c.put("/v1/policies/new", json={"directions": ["tox"]}, headers={"X-API-Key": "k1"}).status_code
            == 201
        )
    assert (artefacts / "policies" / "new.json").is_file()


def test_serve_command_errors(artefacts, monkeypatch, capsys):
    import safesteer.models

    def boom(*a, **k):  # the model must not load when an option is wrong
        raise AssertionError("model loaded")

    monkeypatch.setattr(safesteer.models, "load_backbone", boom)
    monkeypatch.delenv("SS_NOPE", raising=False)
    assert main(["serve", "--policies", str(artefacts / "policies"), "--api-key-env", "SS_NOPE"]) == 2
    assert "SS_NOPE" in capsys.readouterr().err
    (artefacts / "policies" / "broken.json").write_text("{")
    assert main(["serve", "--policies", str(artefacts / "policies")]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_unservable_policy_file_fails_at_start(artefacts, tiny_llama, monkeypatch, capsys):
    import safesteer.models

    monkeypatch.setattr(safesteer.models, "load_backbone", lambda name, **kw: tiny_llama)
    # kid.json needs the 'harm' probe; without --probes the server refuses to start, naming the file
    assert (
        main(["serve", "--policies", str(artefacts / "policies"), "--directions", str(artefacts / "run")])
        == 2
    )
    err = capsys.readouterr().err
    assert "kid" in err and "unknown probe 'harm'" in err
