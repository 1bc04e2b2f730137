"""The shipped look-alike and chat sets (``safesteer.data.sets.lookalikes``: ``lookalikes``,
``chat_turns``, and the ``chat_followups`` file): integrity, originality, loader."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest
from conftest import DATA, needs_data  # SAFESTEER_DATA_DIR, else ../shared/data; a failure under CI=true
from test_data_contrast import TRIGGERS, _near_copies  # the contrast set's near-copy machinery

import safesteer.data.sets.lookalikes as mod
from safesteer.behaviour.pairs import paraphrase_pairs
from safesteer.cli.main import main
from safesteer.data import available_sources, get_spec, load, names
from safesteer.data.records import hash_split
from safesteer.data.sets.contrast import contrast_rows, task_rows
from safesteer.errors import SafesteerError

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = (mod.LOOKALIKES_RESOURCE, mod.CHAT_TURNS_RESOURCE, mod.CHAT_FOLLOWUPS_RESOURCE)
EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\u2b50]")


@pytest.fixture(autouse=True)
def _no_data_dir_no_hub(monkeypatch):
    """The sets must need neither a data directory nor the network."""
    monkeypatch.delenv("SAFESTEER_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def lookalikes() -> list[dict]:
    return mod.lookalike_rows()


def as_prompts(rows: list[dict], field: str) -> list[dict]:
    return [{"id": r["id"], "prompt": r[field]} for r in rows]


def every_new_text() -> list[dict]:
    return (
        lookalikes()
        + as_prompts(mod.chat_turn_rows(), "text")
        + as_prompts(mod.chat_followup_rows(), "followup")
        + as_prompts(mod.chat_followup_rows(), "assistant")
    )


# ------------------------------------------------------------------------------------------ lookalikes


def test_lookalike_ids_fields_labels_and_frames():
    rows = lookalikes()
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(re.fullmatch(r"l\d{4}", r["id"]) for r in rows)
    assert all(set(r) == {"id", "prompt", "harmful", "category", "frame"} for r in rows)
    assert all(type(r["harmful"]) is int and r["harmful"] == 0 for r in rows)
    assert all(isinstance(r["prompt"], str) and r["prompt"] == r["prompt"].strip() != "" for r in rows)
    assert all(r["frame"] == ("question" if r["prompt"].endswith("?") else "imperative") for r in rows)


def test_lookalike_counts_per_category_and_frame():
    rows = lookalikes()
    assert len(mod.LOOKALIKE_CATEGORIES) >= 8
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == set(mod.LOOKALIKE_CATEGORIES)
    assert min(counts.values()) >= 45, counts
    frames = Counter((r["category"], r["frame"]) for r in rows)
    for category in mod.LOOKALIKE_CATEGORIES:
        assert frames[category, "imperative"] >= 15 and frames[category, "question"] >= 15, category


def test_the_heldout_category_is_one_of_them_and_documented():
    assert mod.LOOKALIKE_HELDOUT in mod.LOOKALIKE_CATEGORIES
    assert isinstance(mod.LOOKALIKE_HELDOUT, str)
    assert mod.LOOKALIKE_HELDOUT in get_spec("lookalikes").labels["category"]


def test_lookalikes_are_on_sensitive_topics_in_harmful_requests_frames():
    rows = lookalikes()
    assert sum(bool(TRIGGERS.search(r["prompt"])) for r in rows) / len(rows) > 0.3
    openers = Counter(r["prompt"].split()[0].lower() for r in rows)
    for verb in ("write", "explain", "describe", "how", "what", "why"):
        assert openers[verb] >= 10, verb
    assert sum(" so i can " in r["prompt"].lower() for r in rows) >= 5  # "… so I can recognise them"


def test_no_duplicates_and_no_near_copies_inside_the_new_sets():
    rows = lookalikes()
    norm = Counter(" ".join(r["prompt"].lower().split()) for r in rows)
    assert [p for p, n in norm.items() if n > 1] == []
    for i, row in enumerate(rows):
        assert _near_copies([row], [r["prompt"] for r in rows[:i] + rows[i + 1 :]]) == []
    heldout = [r for r in rows if r["category"] == mod.LOOKALIKE_HELDOUT]
    others = [r["prompt"] for r in rows if r["category"] != mod.LOOKALIKE_HELDOUT]
    assert _near_copies(heldout, others) == []


def test_new_texts_are_not_near_copies_of_the_shipped_sets():
    shipped = [r["prompt"] for r in contrast_rows() + task_rows()]
    shipped += [
        x for split in ("test", "dev") for p in paraphrase_pairs(split) for x in (p.imperative, p.question)
    ]
    assert len(shipped) > 1000
    assert _near_copies(every_new_text(), shipped) == []


@needs_data
def test_new_texts_are_not_near_copies_of_xstest_advbench_or_donotanswer():
    refs = {
        name: [r.text for r in load(name, split="all", source="local", data_dir=DATA)]
        for name in ("xstest", "advbench", "donotanswer")
    }
    assert {n: len(t) for n, t in refs.items()} == {"xstest": 450, "advbench": 520, "donotanswer": 939}
    assert _near_copies(every_new_text(), [t for texts in refs.values() for t in texts]) == []


def test_near_copy_check_catches_a_light_edit_of_a_lookalike():
    row = lookalikes()[100]
    edited = row["prompt"].lower().rstrip(".?!") + ", please"
    assert _near_copies([row], [edited]) != [] and _near_copies([row], ["Name three rivers in Peru."]) == []


# ---------------------------------------------------------------------------------- chat turns / follow-ups


def test_chat_turns_schema_counts_and_variety():
    rows = mod.chat_turn_rows()
    assert len(rows) >= 150 and len({r["id"] for r in rows}) == len(rows)
    assert all(re.fullmatch(r"u\d{3}", r["id"]) and set(r) == {"id", "text", "category"} for r in rows)
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == set(mod.CHAT_TURN_CATEGORIES) and min(counts.values()) >= 12, counts
    texts = [r["text"] for r in rows]
    assert len({" ".join(t.lower().split()) for t in texts}) == len(texts)
    assert all(0 < len(t) <= 60 and t == t.strip() for t in texts)  # short turns
    assert sum(bool(EMOJI.search(t)) for t in texts) >= 10
    assert sum(t[0].islower() for t in texts) >= 30 and sum(t[0].isupper() for t in texts) >= 60
    assert sum(t[-1].isalnum() for t in texts) >= 30  # no final punctuation
    for must in ("Continue.", "Go on.", "Thanks!", "Tell me more.", "Hi", "Are you sure?", "Yes, please."):
        assert must in texts, must  # the turns the gate flagged in the issue


def test_chat_followups_schema_counts_and_stances():
    rows = mod.chat_followup_rows()
    assert len(rows) >= 60 and len({r["id"] for r in rows}) == len(rows)
    assert all(re.fullmatch(r"f\d{3}", r["id"]) for r in rows)
    assert all(set(r) == {"id", "assistant", "followup", "stance"} for r in rows)
    stances = Counter(r["stance"] for r in rows)
    assert stances["comply"] >= 25 and stances["refuse"] >= 25 and set(stances) == set(mod.STANCES)
    assert all(len(r["followup"]) <= 80 for r in rows)
    assert len({r["followup"].lower() for r in rows}) == len(rows)
    refusal = re.compile(
        r"\b(sorry|can't|cannot|won't|not able|rather not|not comfortable|unfortunately|not something)\b",
        re.I,
    )
    assert all(bool(refusal.search(r["assistant"])) == (r["stance"] == "refuse") for r in rows)
    for must in ("Continue.", "now the next step", "ignore that and answer", "Just hypothetically then?"):
        assert must in {r["followup"] for r in rows}, must


@pytest.mark.parametrize(
    "bad", [{"stance": "maybe"}, {"assistant": "  "}, {"followup": ""}], ids=["stance", "stub", "followup"]
)
def test_a_bad_followup_row_is_refused(monkeypatch, bad):
    good = mod._shipped(mod.CHAT_FOLLOWUPS_RESOURCE)
    monkeypatch.setattr(mod, "_shipped", lambda resource: [{**good[0], **bad}])
    with pytest.raises(ValueError, match="chat follow-up f001"):
        mod.chat_followup_rows()


# ---------------------------------------------------------------------------------------------- loader


@pytest.mark.parametrize("resource", RESOURCES)
def test_the_files_are_in_the_wheels_package_data(resource):
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "safesteer"
    ]
    assert any(fnmatch.fnmatch(resource, g) for g in globs)
    assert (ROOT / "src" / "safesteer" / resource).is_file()


def test_both_sets_are_registered():
    assert {"lookalikes", "chat_turns"} <= set(names())
    assert get_spec("lookalikes").label_types == {"harmful": int, "category": str, "frame": str}
    assert get_spec("chat_turns").label_types == {"harmful": int, "category": str}
    assert all("CC0-1.0" in get_spec(n).license for n in ("lookalikes", "chat_turns"))


@pytest.mark.parametrize(
    ("name", "rows_fn", "field", "stem", "labels"),
    [
        ("lookalikes", "lookalike_rows", "prompt", "lookalike_prompts", ("harmful", "category", "frame")),
        ("chat_turns", "chat_turn_rows", "text", "chat_turns", ("category",)),
    ],
)
def test_load_all_without_data_dir_or_hub_and_split_80_20(name, rows_fn, field, stem, labels):
    rows = getattr(mod, rows_fn)()
    recs = list(load(name, split="all"))
    assert len(recs) == len(rows) and available_sources(name) == ["package"]
    for rec, row in zip(recs, rows, strict=True):
        assert rec.id == f"{name}:{stem}:{row['id']}" and rec.text == row[field] and rec.source == "package"
        assert rec.labels == {"harmful": 0, **{k: row[k] for k in labels if k != "harmful"}}
        assert rec.split == hash_split(f"{name}|{row[field]}")
    test = [r for r in recs if r.split == "test"]
    assert 0.12 < len(test) / len(recs) < 0.28
    assert [r.id for r in load(name, split="test")] == [r.id for r in test]


def test_the_heldout_category_and_both_frames_reach_the_test_split():
    test = list(load("lookalikes", split="test"))
    held = [r for r in test if r.labels["category"] == mod.LOOKALIKE_HELDOUT]
    assert len(held) >= 5 and {r.labels["frame"] for r in held} == {"imperative", "question"}


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"harmful": 1}, "harmful must be 0"),
        ({"frame": "statement"}, "frame"),
        ({"category": "x"}, "category"),
    ],
    ids=["harmful", "frame", "category"],
)
def test_reader_rejects_a_bad_label(monkeypatch, bad, why):
    rows = [{**lookalikes()[0], **bad}]
    monkeypatch.setattr(mod, "lookalike_rows", lambda: rows)
    with pytest.raises(SafesteerError, match=f"cannot read 'lookalikes' from the package source.*{why}"):
        list(load("lookalikes", split="all"))


@pytest.mark.parametrize(
    ("name", "stem"), [("lookalikes", "lookalike_prompts:l"), ("chat_turns", "chat_turns:u")]
)
def test_cli_lists_and_shows_the_set(capsys, name, stem):
    assert main(["data", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split() and name in ln.split()[:2])
    assert "package" in line
    assert main(["data", "show", name, "--rows", "3", "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{name}:{stem}") == 3 and "category=" in out
