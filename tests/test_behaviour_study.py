"""The behaviour study as named steps: its self-checks hold on the tiny study, a killed study
resumes from its kept steps with byte-identical files, and the step store refuses stale copies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from safesteer.behaviour.checkpoint import StepStore, step_key
from safesteer.behaviour.heldout import FLUENCY_CHECK_TOL, self_checks
from safesteer.behaviour.sweep import sweep_step
from safesteer.io import read_json

FILES = (
    "summary.json",
    "pareto.csv",
    "answers.csv",
    "gate_scores.csv",
    "features/prompts.csv",
    "gate/condition.json",
)
WORKER = Path(__file__).parent / "_study_worker.py"


def test_step_store_round_trip_and_stale_copies(tmp_path):
    store = StepStore(tmp_path)
    arrays = {"x": np.arange(5, dtype=np.float32) / 3, "m": np.array([True, False])}
    store.save("s", "k1", {"a": 0.1 + 0.2, "n": [1, "two", None], "nan": float("nan")}, arrays)
    data, got = store.load("s", "k1")
    assert data["a"] == 0.1 + 0.2 and data["n"] == [1, "two", None] and np.isnan(data["nan"])  # exact floats
    assert (
        got["x"].dtype == np.float32
        and np.array_equal(got["x"], arrays["x"])
        and got["m"].tolist() == [True, False]
    )
    assert store.load("s", "k2") is None  # another key: the step runs again
    assert store.load("other", "k1") is None
    (tmp_path / "s.npz").write_bytes(b"not the arrays the record names")
    assert store.load("s", "k1") is None  # arrays that do not match the record's digest
    (tmp_path / "t.json").write_text('{"format": "safesteer-study-step/1", "key": "k1", "arr')  # half-written
    assert store.load("t", "k1") is None
    assert (
        step_key({"a": 1, "b": [1, 2]}) == step_key({"b": [1, 2], "a": 1}) != step_key({"a": 1, "b": [2, 1]})
    )


def test_self_checks_name_what_failed():
    ok = {
        "conditional": {"fluency_real_vs_composed_max_abs": 0.0},
        "verify_conditional": {"n": 4, "same_answer": 1.0},
    }
    assert self_checks(ok) == []
    assert self_checks({"conditional": None}) == []
    bad = {
        "conditional": {"fluency_real_vs_composed_max_abs": 10 * FLUENCY_CHECK_TOL},
        "verify_conditional": {"n": 4, "same_answer": 0.75},
    }
    problems = self_checks(bad)
    assert len(problems) == 2 and "in-pass fluency" in problems[0] and "75% of 4 prompts" in problems[1]
    assert self_checks({"conditional": {"fluency_real_vs_composed_max_abs": float("nan")}})  # NaN is no pass


@pytest.mark.integration
def test_tiny_study_self_checks_hold(behaviour_run):
    out, outputs, _, _ = behaviour_run
    summary = read_json(out / "summary.json")
    te = summary["test"]
    assert te["conditional"] is not None, (
        "the tiny study chose no conditional policy: the checks would not run"
    )
    assert te["conditional"]["fluency_real_vs_composed_max_abs"] <= FLUENCY_CHECK_TOL
    assert te["verify_conditional"]["same_answer"] == 1.0 and te["verify_conditional"]["n"] == 4
    assert self_checks(te) == []
    kept = sorted(p.name for p in (out / "steps").glob("*.json"))
    assert kept[:6] == [
        "answer_gate.json",
        "directions.json",
        "features.json",
        "fit_gate.json",
        "pieces.json",  # the tiny study's gate is segmented (steering.segments)
        "sweep_base.json",
    ]
    names = behaviour_run[3].behaviour.strategies
    alphas = behaviour_run[3].behaviour.alphas
    assert {f"{sweep_step(n, a)}.json" for n in names for a in alphas} <= set(kept)
    assert {"test.json", "verify.json"} <= set(kept)


@pytest.mark.integration
def test_answer_time_gate_run_for_real_gives_the_recombined_answers(behaviour_run):
    """generate_with_answer_gate (the prompt gate on each chat's requests; on the rows it let through,
    the answer gate after k tokens; those it catches regenerated with the steering on) gives the study's
    recombined ``conditional+answer_gate`` answers on the conversation, direct and held-out look-alike
    test rows (scored by the deployed gates, not the family-fold ones)."""
    import pandas as pd

    from safesteer.behaviour.answer_gate import generate_with_answer_gate
    from safesteer.models import load_backbone
    from safesteer.steering import DirectionSet
    from safesteer.steering.condition import Condition
    from safesteer.steering.strategies import Intervention

    out, _, model_dir, cfg = behaviour_run
    summary = read_json(out / "summary.json")
    c = summary["test"]["conditional"]["policy"]
    ans = pd.read_csv(out / "answers.csv", keep_default_na=False)
    sets = ["conv:harmful", "conv:benign", "direct:harmful", "direct:xstest_safe", "lookalikes_heldout"]
    both = ans[ans["set"].isin(sets) & (ans["policy"] == "conditional+answer_gate")]
    assert len(both) >= 8
    P = pd.read_csv(out / "features" / "prompts.csv", keep_default_na=False)
    chat = dict(zip(P["text"], P["chat"])) if "chat" in P else {}
    inputs = [json.loads(chat[t]) if chat.get(t) else t for t in both["prompt"]]
    bb = load_backbone(str(model_dir))  # as the behaviour stage loads it
    prompt_gate = Condition.load(out / "gate").with_threshold(c["threshold"])
    answer_gate = Condition.load(out / "answer_gate" / "all")
    dirs = DirectionSet.load(out / "directions")
    scale = summary["directions"]["scale_median_norm"]
    iv = Intervention.from_direction(
        dirs[c["strategy"]], c["alpha"], scale, where=cfg.behaviour.steer_positions
    )
    k = summary["config"]["answer_gate_tokens"]
    texts, pflags, aflags = generate_with_answer_gate(
        bb, inputs, prompt_gate, answer_gate, iv, k, cfg.behaviour.max_new_tokens, cfg.behaviour.batch_size
    )
    assert texts == [str(a) for a in both["answer"]]
    assert not (pflags & aflags).any()
    assert pflags.any() and aflags.any(), "the rows exercise neither the prompt gate nor the answer-time gate"
    unsteered = ans[ans["set"].isin(sets) & (ans["policy"] == "unsteered")]
    changed = [a != b for a, b in zip(texts, unsteered["answer"])]
    assert any(c and f for c, f in zip(changed, aflags)), "no answer-time regeneration changed an answer"


@pytest.mark.integration
def test_killed_mid_sweep_resumes_with_identical_files(behaviour_run, tmp_path, shared_data):
    ref, _, model_dir, _ = behaviour_run
    directions = ref.parent / "directions"
    out = tmp_path / "stage"
    args = [sys.executable, str(WORKER), str(model_dir), str(directions), str(shared_data), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*args, "1.0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        first, second = (sweep_step("refusal_caa", a) for a in behaviour_run[3].behaviour.alphas[:2])
        while not (out / "steps" / f"{first}.json").is_file():  # the first candidate is kept: mid-sweep
            assert proc.poll() is None, "the worker ended before the sweep"
            assert time.monotonic() < deadline, "the sweep did not start in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "summary.json").exists() and not (out / "steps" / "test.json").exists()
    again = subprocess.run([*args, "0"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("features", "fit_gate", "directions", "sweep_base", first):  # resumed, not recomputed
        assert f"{step}: reusing" in again.stderr, step
    assert f"{second}: reusing" not in again.stderr
    for name in FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.integration
def test_a_new_alpha_or_steering_span_reuses_the_features_gate_and_directions(
    behaviour_run, tmp_path, shared_data
):
    """How hard and where the direction steers (study.STEER_ONLY) is in the keys of the steered answers
    and the test only: the features, pieces, gate, directions and unsteered answers are kept, the kept
    α's steered answers too when only the span is the same; the new ones run."""
    import shutil

    ref, _, model_dir, cfg = behaviour_run
    out = tmp_path / "stage"
    shutil.copytree(ref, out)
    args = [sys.executable, str(WORKER), str(model_dir), str(ref.parent / "directions"), str(shared_data)]
    alphas = [*cfg.behaviour.alphas, 3.0]
    again = subprocess.run(
        [*args, str(out), "0", json.dumps({"alphas": alphas})], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    kept = [sweep_step(n, a) for n in cfg.behaviour.strategies for a in cfg.behaviour.alphas]
    for step in ("features", "pieces", "fit_gate", "directions", "sweep_base", *kept):
        assert f"{step}: reusing" in again.stderr, step
    new = [sweep_step(n, 3.0) for n in cfg.behaviour.strategies]
    assert all(f"{n}: reusing" not in again.stderr and (out / "steps" / f"{n}.json").is_file() for n in new)
    assert read_json(out / "summary.json")["config"]["alphas"] == alphas
    other = "all" if cfg.behaviour.steer_positions == "prompt" else "prompt"
    again = subprocess.run(
        [*args, str(out), "0", json.dumps({"steer_positions": other})],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("features", "pieces", "fit_gate", "directions", "sweep_base"):
        assert f"{step}: reusing" in again.stderr, step
    assert not any(f"{n}: reusing" in again.stderr for n in kept) and "test: reusing" not in again.stderr


@pytest.mark.integration
def test_another_gate_kind_reuses_the_features_pieces_and_directions(behaviour_run, tmp_path, shared_data):
    """The gate's own settings (config.GATE_ONLY) are in fit_gate's key, not the base key: a stacked
    gate in place of one per layer reuses the features, pieces and directions, fits the gate again and
    reruns every step after it (they take the gate's key)."""
    import shutil

    ref, _, model_dir, cfg = behaviour_run
    out = tmp_path / "stage"
    shutil.copytree(ref, out)
    args = [sys.executable, str(WORKER), str(model_dir), str(ref.parent / "directions"), str(shared_data)]
    again = subprocess.run(
        [*args, str(out), "0", json.dumps({"gate_kind": "stacked"})],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("features", "pieces", "directions"):
        assert f"{step}: reusing" in again.stderr, step
    for step in ("fit_gate", "sweep_base", "test"):
        assert f"{step}: reusing" not in again.stderr, step
    summary = read_json(out / "summary.json")
    assert summary["config"]["gate_kind"] == "stacked"
    assert summary["gate"]["kind"] == "stacked"


@pytest.mark.integration
def test_a_changed_features_file_makes_the_features_step_run_again(behaviour_run, tmp_path, shared_data):
    """The features step keeps no second copy of the vectors: its record names the features/ files'
    sha256, and a file that changed is not trusted (the step runs again and restores it)."""
    import shutil

    ref, _, model_dir, _ = behaviour_run
    out = tmp_path / "stage"
    shutil.copytree(ref, out)
    victim = out / "features" / "prompt_layer01.npy"
    original = victim.read_bytes()
    x = np.load(victim)
    np.save(victim, x + 1)
    args = [sys.executable, str(WORKER), str(model_dir), str(ref.parent / "directions"), str(shared_data)]
    again = subprocess.run([*args, str(out), "0"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "features: the kept output is stale (prompt_layer01.npy is missing or changed)" in again.stderr
    assert victim.read_bytes() == original
    for name in FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
