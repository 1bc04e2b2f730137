"""Config: TOML round-trip, unknown keys and bad values rejected with one line; stage keys."""

from __future__ import annotations

import pytest

from safesteer.config import Config, dump_toml, load_config
from safesteer.errors import SafesteerError
from safesteer.pipeline.cache import StageCache, stage_key


def test_defaults_round_trip(tmp_path):
    cfg = Config()
    cfg.sae.l1 = [1e-4, 5e-5]
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "text,match",
    [
        ("[model]\nnmae = 'x'\n", "unknown config key model.'nmae'"),
        ("[sae]\nexpansions = 'four'\n", "sae.expansions must be a list"),
        ("[sae]\nl1 = [0.0]\n", "sae.l1"),
        ("[extract]\ndtype = 'int8'\n", "extract.dtype"),
        ("[data]\nsae_datasets = ['nope']\n", "unknown dataset 'nope'"),
        ("[bogus]\nx = 1\n", "unknown config key 'bogus'"),
        ("[model]\nlayer = -2\n", "model.layer must be positive"),
        ("not toml = = 1", "not valid TOML"),
        (
            "[behaviour]\nsteer_positions = 'answer'\n",
            "behaviour.steer_positions 'answer' unknown; valid choices: all, prompt",
        ),
        ("[behaviour]\nbudget_groups = []\n", "behaviour.budget_groups must name at least one"),
        ("[behaviour]\njudge = 'nope'\n", "behaviour.judge = 'nope' is not valid; choose one of: classifier"),
        ("[behaviour]\njudge = 'openai'\n", "behaviour.judge = 'openai' needs judge_url and judge_model"),
        ("[behaviour]\njudge = 'classifier'\n", "behaviour.judge = 'classifier' needs judge_model"),
        (
            "[behaviour]\ngate_kind = 'nope'\n",
            "behaviour.gate_kind = 'nope' is not valid; choose one of: linear",
        ),
    ],
)
def test_bad_configs_rejected(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(SafesteerError, match=match.replace("[", r"\[").replace(".", r"\.")) as err:
        load_config(p)
    assert "\n" not in err.value.message


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted(root.glob("*.toml")):
        load_config(f)
    study = load_config(root / "roberta-study.toml")  # the original study's settings, as the issue lists them
    assert (study.model.name, study.model.layer, study.model.kind, study.data.source) == (
        "roberta-base",
        11,
        "masked",
        "hub",
    )
    assert study.sae.expansions == [64] and study.sae.l1 == [1e-4, 5e-5]
    assert (study.sae.batch_size, study.sae.lr, study.probes.max_rows, study.atoms.k, study.probes.cs) == (
        8192,
        3e-4,
        200_000,
        20,
        [30.0],
    )
    assert {
        "beavertails",
        "civil_comments",
        "go_emotions",
        "empathetic_dialogues",
        "crows_pairs",
        "stereoset",
        "wikipedia",
    } == set(study.data.sae_datasets)
    default = load_config(root / "default.toml")
    assert default == Config()  # `safesteer run` without --config runs exactly configs/default.toml
    assert default.model.name == "smollm2-135m" and default.data.source == "auto"


def test_stage_keys_follow_params_and_inputs(tmp_path):
    a = stage_key("sae", {"l1": 1e-3}, {"extract": "k1"})
    assert a == stage_key("sae", {"l1": 1e-3}, {"extract": "k1"})
    assert a != stage_key("sae", {"l1": 2e-3}, {"extract": "k1"})
    assert a != stage_key("sae", {"l1": 1e-3}, {"extract": "k2"})
    cache = StageCache(tmp_path)
    st = cache.stage("sae", {"l1": 1e-3})
    assert not st.done
    st.mark_done(rows=3)
    again = cache.stage("sae", {"l1": 1e-3})
    assert again.done and again.info()["rows"] == 3 and again.dir == st.dir


def test_device_resolution(monkeypatch):
    import torch

    from safesteer.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(SafesteerError, match="no CUDA device is visible"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
