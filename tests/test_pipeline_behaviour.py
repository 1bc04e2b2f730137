"""The tiny pipeline's headline is pinned: refactors of the stage plumbing must not move a number.

fp32 on CPU, tiny random Llama, real offline data; the digest of ``results.csv`` was recorded on
the code before the stage-table refactor (issue #12) and must stay the same through it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_pipeline_run import tiny_config, tiny_model_dir  # noqa: F401  (the shared tiny-model fixture)

from safesteer.io import write_json
from safesteer.pipeline.runner import Pipeline

pytestmark = pytest.mark.integration

RESULTS_SHA256 = "58de2bc5ec71ca8d0377a0430e00ea7acf2138bb77d6e45439c51b6ad0f3d79d"
# the tiny behaviour stage's files, recorded at 67a6b51 before the behaviour package redesign (issue #23);
# summary.json since gained the gate kind and judge settings (config.gate_kind, judge*), and is pinned
# without them as well; and the chosen α's test figures at each validation FPR (test.conditional.at_each_fpr,
# recombined from the same answers), pinned without them
SUMMARY_BEFORE_SETTINGS_SHA256 = "679379e8dc5f1bde696dab7ea43ea3c69de68e3c624dfca8d1fa2ed614aa45e2"
NEW_KEYS = ("gate_kind", "judge", "judge_model", "judge_url")
BEHAVIOUR_SHA256 = {
    "summary.json": "7de9c9af58d9c11ff7b2497360336670a41e043df4ec699ee34bad78d840978d",
    "pareto.csv": "6b96541237d9f687ae2660b6ff3ad8ef46a990939c105811b83287001dfebf12",
    "answers.csv": "cd45a0c4f671834cbb563c8eba4f8d844eb2fe3aa75d3239054f205f2fe03d22",
}


def pinned_config(model_dir: Path, data_dir: Path):
    cfg = tiny_config(model_dir, data_dir)
    cfg.run.device = "cpu"
    cfg.extract.precision = "fp32"
    cfg.sae.precision = "fp32"
    # the study as it was before the attack rows (issue #25): with them off, every pinned byte holds
    cfg.behaviour.attacks = cfg.behaviour.gate_segments = False
    cfg.behaviour.budget_groups = ["xstest_safe"]
    return cfg.validate()


def _digest(path: Path, *machine_paths: Path) -> str:
    """sha256 of a file's bytes, with this machine's model and data folders written as placeholders."""
    data = path.read_bytes()
    for i, folder in enumerate(machine_paths):
        data = data.replace(str(folder).encode(), f"<path{i}>".encode())
    return hashlib.sha256(data).hexdigest()


def test_tiny_pipeline_results_digest_is_pinned(tmp_path, tiny_model_dir, shared_data):
    pipe = Pipeline(pinned_config(tiny_model_dir, shared_data), tmp_path / "run")
    assert pipe.run() is not None
    results = (pipe.st["evaluate"].dir / "results.csv").read_bytes()
    assert hashlib.sha256(results).hexdigest() == RESULTS_SHA256, results.decode()[:2000]
    behaviour = pipe.st["behaviour"].dir
    summary = json.loads((behaviour / "summary.json").read_text())
    cond = summary["test"]["conditional"]
    at = {r["fpr"]: r for r in cond.pop("at_each_fpr")}  # added later: the figures at the chosen FPR
    assert at[cond["policy"]["fpr"]]["harmful_delta_pp"] == pytest.approx(cond["harmful_refusal"]["delta"])
    write_json(tmp_path / "summary.json", summary)
    got = {
        name: _digest(
            tmp_path / name if name == "summary.json" else behaviour / name, tiny_model_dir, shared_data
        )
        for name in BEHAVIOUR_SHA256
    }
    assert got == BEHAVIOUR_SHA256
    # the summary as it was before the gate kind and judge became settings: the same bytes without those keys
    new = {k: summary["config"].pop(k) for k in NEW_KEYS}
    assert new == {"gate_kind": "", "judge": "phrases", "judge_model": "", "judge_url": ""}
    old = tmp_path / "summary-before-settings.json"
    write_json(old, summary)
    assert _digest(old, tiny_model_dir, shared_data) == SUMMARY_BEFORE_SETTINGS_SHA256


def test_knobs_that_were_hard_coded_rerun_their_stages_and_errors_pass_through(
    tmp_path, tiny_model_dir, shared_data
):
    from safesteer.errors import SafesteerError
    from safesteer.pipeline.runner import stage_keys

    cfg = pinned_config(tiny_model_dir, shared_data)
    out = tmp_path / "run"
    first = Pipeline(cfg, out)
    first.run()
    assert {n: st.key for n, st in first.st.items()} == stage_keys(cfg)  # the runner uses the table's keys
    cfg.atoms.screen_texts = 10  # was a literal 12 in the runner, invisible to the cache
    again = Pipeline(cfg, out)
    again.run()
    assert {n for n, s in again.status.items() if s == "ran"} == {
        "atoms",
        "directions",
        "evaluate",
        "behaviour",
    }
    assert again.outputs["map"] == first.outputs["map"]  # cached outputs are read back from DONE.json
    cfg.encode.batch_size = 7  # encode was keyed on nothing
    third = Pipeline(cfg, out)
    third.run()
    assert {n for n, s in third.status.items() if s == "ran"} == {
        "encode",
        "map",
        "atoms",
        "directions",
        "evaluate",
        "behaviour",
    }
    cfg.evaluate.strategies = [
        "nope"
    ]  # the stage's own error reaches the caller, not "stage command … failed"
    with pytest.raises(SafesteerError, match="unknown strategy 'nope'; this direction set has"):
        Pipeline(cfg, out).run()
