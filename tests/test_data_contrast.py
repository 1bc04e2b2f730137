"""The shipped contrast prompts (``safesteer.data.sets.contrast``): data integrity, originality, loader."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from safesteer.cli.main import main
from safesteer.data import available_sources, get_spec, load
from safesteer.data.records import hash_split
from safesteer.data.sets.contrast import CATEGORIES, RESOURCE, contrast_rows
from safesteer.errors import SafesteerError
from safesteer.steering.gate import paraphrase_pairs

from conftest import DATA, needs_data  # SAFESTEER_DATA_DIR, else ../shared/data; a failure under CI=true

ROOT = Path(__file__).resolve().parents[1]
MAX_JACCARD = 0.6


@pytest.fixture(autouse=True)
def _no_data_dir_no_hub(monkeypatch):
    """The set must need neither a data directory nor the network."""
    monkeypatch.delenv("SAFESTEER_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _near_copies(references: list[str]) -> list[str]:
    refs = [(r, _tokens(r)) for r in references]
    hits = []
    for row in contrast_rows():
        mine = _tokens(row["prompt"])
        for text, theirs in refs:
            if _jaccard(mine, theirs) >= MAX_JACCARD:
                hits.append(f"{row['id']} {row['prompt']!r} ~ {text!r}")
    return hits


# ------------------------------------------------------------------------------------------------ data


def test_ids_unique_twins_point_both_ways_with_opposite_labels():
    rows = contrast_rows()
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate ids"
    assert all(re.fullmatch(r"c\d{3}", i) for i in by_id)
    assert all(set(r) == {"id", "prompt", "harmful", "category", "twin"} for r in rows)
    paired = 0
    for r in rows:
        assert r["harmful"] in (0, 1) and isinstance(r["harmful"], int)
        if r["twin"] is None:
            assert r["harmful"] == 0, f"{r['id']}: every harmful prompt has a harmless twin"
            continue
        twin = by_id[r["twin"]]
        assert twin["twin"] == r["id"], f"{r['id']} -> {twin['id']} -> {twin['twin']}"
        assert twin["harmful"] == 1 - r["harmful"] and twin["category"] == r["category"]
        paired += 1
    assert paired == 2 * sum(r["harmful"] for r in rows)


def test_no_duplicate_prompts_and_both_classes_in_every_category():
    rows = contrast_rows()
    norm = Counter(" ".join(r["prompt"].lower().split()) for r in rows)
    assert [p for p, n in norm.items() if n > 1] == []
    counts = Counter((r["category"], r["harmful"]) for r in rows)
    assert {c for c, _ in counts} == set(CATEGORIES)
    for category in CATEGORIES:
        assert counts[category, 0] >= 30 and counts[category, 1] >= 20, category
    harmful = sum(r["harmful"] for r in rows)
    assert harmful >= 200 and len(rows) - harmful >= 300


def test_prompts_are_not_near_copies_of_the_shipped_paraphrase_pairs():
    phrasings = [p for pair in paraphrase_pairs() for p in (pair.imperative, pair.question)]
    assert len(phrasings) >= 40
    assert _near_copies(phrasings) == []


@needs_data
def test_prompts_are_not_near_copies_of_xstest_advbench_or_donotanswer():
    refs = {name: [r.text for r in load(name, split="all", source="local", data_dir=DATA)]
            for name in ("xstest", "advbench", "donotanswer")}
    assert {n: len(t) for n, t in refs.items()} == {"xstest": 450, "advbench": 520, "donotanswer": 939}
    assert _near_copies([t for texts in refs.values() for t in texts]) == []


def test_near_copy_check_catches_a_light_edit():
    row = contrast_rows()[0]
    edited = row["prompt"].replace("?", "").replace("What's", "What is")
    assert _near_copies([edited]) != [] and _near_copies(["Name three rivers in Peru."]) == []


def test_the_file_is_in_the_wheels_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["safesteer"]
    assert any(fnmatch.fnmatch(RESOURCE, g) for g in globs)
    assert (ROOT / "src" / "safesteer" / RESOURCE).is_file()


# ---------------------------------------------------------------------------------------------- loader


def test_load_all_without_data_dir_or_hub():
    rows = contrast_rows()
    recs = list(load("contrast", split="all"))
    assert len(recs) == len(rows)
    assert available_sources("contrast") == ["package"]
    for rec, row in zip(recs, rows, strict=True):
        assert rec.id == f"contrast:contrast_prompts:{row['id']}" and rec.text == row["prompt"]
        assert rec.labels == {"harmful": row["harmful"], "category": row["category"]} and rec.source == "package"
        assert type(rec.labels["harmful"]) is int and type(rec.labels["category"]) is str
        assert rec.split == hash_split(f"contrast|{row['prompt']}")
    spec = get_spec("contrast")
    assert spec.label_types == {"harmful": int, "category": str} and "CC0-1.0" in spec.license


def test_train_and_test_partition_all_about_80_20():
    all_ids = [r.id for r in load("contrast", split="all")]
    train = [r.id for r in load("contrast", split="train", source="package")]
    test = [r.id for r in load("contrast", split="test")]
    assert sorted(train + test) == sorted(all_ids) and not set(train) & set(test)
    assert 0.12 < len(test) / len(all_ids) < 0.28
    assert {r.labels["harmful"] for r in load("contrast", split="test")} == {0, 1}


def test_sampling_is_deterministic_and_other_sources_are_refused():
    a = [r.id for r in load("contrast", split="all", max_rows=7, seed=3)]
    assert a == [r.id for r in load("contrast", split="all", max_rows=7, seed=3)] and len(a) == 7
    assert a != [r.id for r in load("contrast", split="all", max_rows=7, seed=4)]
    with pytest.raises(SafesteerError, match="cannot be served from local; its sources: package"):
        load("contrast", source="local")


def test_reader_rejects_a_bad_label(monkeypatch):
    import safesteer.data.sets.contrast as mod

    bad = [{**contrast_rows()[0], "harmful": 2}]
    monkeypatch.setattr(mod, "contrast_rows", lambda: bad)
    with pytest.raises(SafesteerError, match="cannot read 'contrast' from the package source"):
        list(load("contrast", split="all"))


def test_cli_lists_and_shows_the_set_without_data_dir(capsys):
    assert main(["data", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "contrast" in ln)
    assert "package" in line
    assert main(["data", "show", "contrast", "--rows", "3", "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count("contrast:contrast_prompts:c") == 3 and "category=" in out and "package" in out
