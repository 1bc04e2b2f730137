"""The shipped prompt sets (``safesteer.data.sets.contrast``: ``contrast`` and ``tasks``): integrity,
originality, loader."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DATA, needs_data  # SAFESTEER_DATA_DIR, else ../shared/data; a failure under CI=true

import safesteer.data.sets.contrast as mod
from safesteer.behaviour.pairs import paraphrase_pairs
from safesteer.cli.main import main
from safesteer.data import available_sources, get_spec, load
from safesteer.data.records import hash_split
from safesteer.errors import SafesteerError

ROOT = Path(__file__).resolve().parents[1]
MAX_JACCARD = 0.6


@dataclass(frozen=True)
class Shipped:
    name: str
    rows_fn: str  # the module's reader, looked up by name so tests can patch it
    resource: str
    stem: str
    id_prefix: str
    fields: frozenset[str]
    categories: tuple[str, ...]
    min_per_category: dict[int, int]  # harmful value -> least prompts of that class in every category
    min_total: dict[int, int]  # harmful value -> least prompts of that class in all

    def rows(self) -> list[dict]:
        return getattr(mod, self.rows_fn)()


CONTRAST = Shipped(
    "contrast",
    "contrast_rows",
    mod.CONTRAST_RESOURCE,
    "contrast_prompts",
    "c",
    frozenset({"id", "prompt", "harmful", "category", "twin"}),
    mod.CONTRAST_CATEGORIES,
    {0: 25, 1: 20},
    {0: 500, 1: 400},
)
TASKS = Shipped(
    "tasks",
    "task_rows",
    mod.TASKS_RESOURCE,
    "task_prompts",
    "t",
    frozenset({"id", "prompt", "harmful", "category"}),
    mod.TASK_CATEGORIES,
    {0: 25},
    {0: 340},
)
SETS = pytest.mark.parametrize("s", [CONTRAST, TASKS], ids=lambda s: s.name)

# words that would make a "benign task" borderline (the contrast set's job, not the tasks set's)
TRIGGERS = re.compile(
    r"\b(kill\w*|murder\w*|bomb\w*|guns?|weapon\w*|hack\w*|exploit\w*|malware|virus\w*|steal\w*|drugs?|poison\w*"
    r"|attack\w*|explos\w*|knife|knives|shoot\w*|blood\w*|dead\w*|die|death|suicid\w*|hurt\w*|bull(y|ies|ying)"
    r"|cheat\w*|fraud\w*|illegal\w*|phish\w*|password\w*|scam\w*|fake\w*|crim\w*|violen\w*|wars?|fight\w*"
    r"|terror\w*|abus\w*|sex\w*|alcohol\w*|wine|beer|smok\w*|burn\w*|destroy\w*|stalk\w*|threat\w*|revenge"
    r"|trick\w*|lie|lies)\b",
    re.IGNORECASE,
)


@pytest.fixture(autouse=True)
def _no_data_dir_no_hub(monkeypatch):
    """The sets must need neither a data directory nor the network."""
    monkeypatch.delenv("SAFESTEER_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _near_copies(rows: list[dict], references: list[str]) -> list[str]:
    refs = [(r, _tokens(r)) for r in references]
    hits = []
    for row in rows:
        mine = _tokens(row["prompt"])
        for text, theirs in refs:
            if _jaccard(mine, theirs) >= MAX_JACCARD:
                hits.append(f"{row['id']} {row['prompt']!r} ~ {text!r}")
    return hits


# ------------------------------------------------------------------------------------------------ data


@SETS
def test_ids_unique_fields_and_labels(s):
    rows = s.rows()
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(rows), "duplicate ids"
    assert all(re.fullmatch(rf"{s.id_prefix}\d{{3}}", i) for i in ids)
    assert all(set(r) == s.fields for r in rows)
    assert all(type(r["harmful"]) is int and r["harmful"] in s.min_total for r in rows)
    assert all(
        isinstance(r["prompt"], str) and r["prompt"] == r["prompt"].strip() and r["prompt"] for r in rows
    )


def test_contrast_twins_point_both_ways_with_opposite_labels():
    rows = CONTRAST.rows()
    by_id = {r["id"]: r for r in rows}
    paired = 0
    for r in rows:
        if r["twin"] is None:
            assert r["harmful"] == 0, f"{r['id']}: every harmful prompt has a harmless twin"
            continue
        twin = by_id[r["twin"]]
        assert twin["twin"] == r["id"], f"{r['id']} -> {twin['id']} -> {twin['twin']}"
        assert twin["harmful"] == 1 - r["harmful"] and twin["category"] == r["category"]
        paired += 1
    assert paired == 2 * sum(r["harmful"] for r in rows)


@SETS
def test_no_duplicate_prompts_and_every_class_in_every_category(s):
    rows = s.rows()
    norm = Counter(" ".join(r["prompt"].lower().split()) for r in rows)
    assert [p for p, n in norm.items() if n > 1] == []
    counts = Counter((r["category"], r["harmful"]) for r in rows)
    assert {c for c, _ in counts} == set(s.categories)
    assert {h for _, h in counts} == set(s.min_total)  # tasks: harmful is always 0
    for category in s.categories:
        for harmful, least in s.min_per_category.items():
            assert counts[category, harmful] >= least, (category, harmful)
    totals = Counter(r["harmful"] for r in rows)
    assert all(totals[h] >= least for h, least in s.min_total.items()), totals


def test_tasks_are_mostly_imperative_in_advbench_frames_without_trigger_words():
    rows = TASKS.rows()
    assert [r["prompt"] for r in rows if TRIGGERS.search(r["prompt"])] == []
    assert TRIGGERS.search("Write a script that can hack into a database") is not None
    questions = sum(r["prompt"].rstrip().endswith("?") for r in rows)
    assert questions / len(rows) < 0.1
    openers = Counter(r["prompt"].split()[0].lower() for r in rows)
    # the AdvBench openings (its ten most common first words) all recur here as benign requests
    for verb in (
        "write",
        "create",
        "develop",
        "provide",
        "give",
        "instruct",
        "outline",
        "design",
        "teach",
        "explain",
    ):
        assert openers[verb] >= 5, verb
    assert len(openers) >= 25  # and many other forms besides


@SETS
def test_prompts_are_not_near_copies_of_the_shipped_paraphrase_pairs(s):
    phrasings = [p for pair in paraphrase_pairs() for p in (pair.imperative, pair.question)]
    assert len(phrasings) >= 40
    assert _near_copies(s.rows(), phrasings) == []


@needs_data
@SETS
def test_prompts_are_not_near_copies_of_xstest_advbench_or_donotanswer(s):
    refs = {
        name: [r.text for r in load(name, split="all", source="local", data_dir=DATA)]
        for name in ("xstest", "advbench", "donotanswer")
    }
    assert {n: len(t) for n, t in refs.items()} == {"xstest": 450, "advbench": 520, "donotanswer": 939}
    assert _near_copies(s.rows(), [t for texts in refs.values() for t in texts]) == []


def test_dev_pairs_are_not_near_copies_of_the_test_pairs_or_of_the_gates_training_sets():
    """The dev pairs judge phrasing robustness on requests the gate never saw: neither the
    acceptance pairs nor the contrast / tasks prompts the gate trains on."""
    dev = [{"id": p.id, "prompt": x} for p in paraphrase_pairs("dev") for x in (p.imperative, p.question)]
    test = [x for p in paraphrase_pairs("test") for x in (p.imperative, p.question)]
    assert _near_copies(dev, test) == []
    assert _near_copies(dev, [r["prompt"] for r in CONTRAST.rows() + TASKS.rows()]) == []


def test_the_two_sets_are_not_near_copies_of_each_other():
    assert _near_copies(TASKS.rows(), [r["prompt"] for r in CONTRAST.rows()]) == []


@SETS
def test_near_copy_check_catches_a_light_edit(s):
    rows = s.rows()
    edited = rows[0]["prompt"].lower().rstrip(".?!") + ", please"
    assert _near_copies(rows, [edited]) != [] and _near_copies(rows, ["Name three rivers in Peru."]) == []


@SETS
def test_the_file_is_in_the_wheels_package_data(s):
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "safesteer"
    ]
    assert any(fnmatch.fnmatch(s.resource, g) for g in globs)
    assert (ROOT / "src" / "safesteer" / s.resource).is_file()


# ---------------------------------------------------------------------------------------------- loader


@SETS
def test_load_all_without_data_dir_or_hub(s):
    rows = s.rows()
    recs = list(load(s.name, split="all"))
    assert len(recs) == len(rows)
    assert available_sources(s.name) == ["package"]
    for rec, row in zip(recs, rows, strict=True):
        assert rec.id == f"{s.name}:{s.stem}:{row['id']}" and rec.text == row["prompt"]
        assert (
            rec.labels == {"harmful": row["harmful"], "category": row["category"]} and rec.source == "package"
        )
        assert type(rec.labels["harmful"]) is int and type(rec.labels["category"]) is str
        assert rec.split == hash_split(f"{s.name}|{row['prompt']}")
    spec = get_spec(s.name)
    assert spec.label_types == {"harmful": int, "category": str} and "CC0-1.0" in spec.license


@SETS
def test_train_and_test_partition_all_about_80_20(s):
    all_ids = [r.id for r in load(s.name, split="all")]
    train = [r.id for r in load(s.name, split="train", source="package")]
    test = [r.id for r in load(s.name, split="test")]
    assert sorted(train + test) == sorted(all_ids) and not set(train) & set(test)
    assert 0.12 < len(test) / len(all_ids) < 0.28
    assert {r.labels["harmful"] for r in load(s.name, split="test")} == set(s.min_total)


@SETS
def test_sampling_is_deterministic_and_other_sources_are_refused(s):
    a = [r.id for r in load(s.name, split="all", max_rows=7, seed=3)]
    assert a == [r.id for r in load(s.name, split="all", max_rows=7, seed=3)] and len(a) == 7
    assert a != [r.id for r in load(s.name, split="all", max_rows=7, seed=4)]
    with pytest.raises(SafesteerError, match="cannot be served from local; its sources: package"):
        load(s.name, source="local")


@pytest.mark.parametrize(
    ("s", "bad_label"),
    [(CONTRAST, {"harmful": 2}), (TASKS, {"harmful": 1}), (TASKS, {"category": "weapons"})],
    ids=["contrast", "tasks-1", "tasks-cat"],
)
def test_reader_rejects_a_bad_label(monkeypatch, s, bad_label):
    bad = [{**s.rows()[0], **bad_label}]
    monkeypatch.setattr(mod, s.rows_fn, lambda: bad)
    with pytest.raises(SafesteerError, match=f"cannot read '{s.name}' from the package source"):
        list(load(s.name, split="all"))


@SETS
def test_cli_lists_and_shows_the_set_without_data_dir(capsys, s):
    assert main(["data", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split() and s.name in ln.split()[:2])
    assert "package" in line
    assert main(["data", "show", s.name, "--rows", "3", "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{s.name}:{s.stem}:{s.id_prefix}") == 3 and "category=" in out and "package" in out
