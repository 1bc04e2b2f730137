"""Contrast prompts written for safesteer: harmful requests and harmless look-alikes, as twins.

``safesteer/data/contrast_prompts.jsonl`` ships inside the package (no data directory, no network;
served by the ``package`` source). Each line is ``{"id", "prompt", "harmful", "category", "twin"}``:
a harmless request that merely *looks* harmful (a homonym, an idiom, a safe target or context, a
definition, a safety question, a public fact) and, for most of them, a harmful ``twin`` that shares
its trigger word or frame. It is a second source of XSTest-like contrast data for the harm gate,
independent of XSTest itself (tests check that no prompt is a near-copy of XSTest, AdvBench,
Do-Not-Answer or the shipped paraphrase pairs). Splits: an 80/20 hash split on the text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

from safesteer.data.records import DatasetSpec, Row

RESOURCE = "data/contrast_prompts.jsonl"
"""Path of the shipped file inside the ``safesteer`` package."""

CATEGORIES: tuple[str, ...] = (
    "homonyms",
    "figurative_language",
    "safe_targets",
    "safe_contexts",
    "definitions",
    "safety_and_defence",
    "health_legal_finance",
    "public_figures",
)
"""The prompt categories; every one holds both harmful and harmless prompts."""


def contrast_rows() -> list[dict[str, Any]]:
    """The shipped objects, in file order (``twin`` is ``None`` for a harmless prompt without one)."""
    text = resources.files("safesteer").joinpath(RESOURCE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read() -> Iterator[Row]:
    for r in contrast_rows():
        harmful = int(r["harmful"])
        if harmful not in (0, 1) or r["category"] not in CATEGORIES:
            raise ValueError(f"row {r['id']}: harmful must be 0/1 and category one of {', '.join(CATEGORIES)}")
        yield Row(f"contrast_prompts:{r['id']}", r["prompt"], {"harmful": harmful, "category": r["category"]})


CONTRAST = DatasetSpec(
    name="contrast",
    description="Contrast prompts written for safesteer: harmful requests and harmless look-alike twins",
    labels={
        "harmful": "int 0/1: 1 for a request a responsible assistant should refuse",
        "category": f"str: one of {', '.join(CATEGORIES)}",
    },
    label_types={"harmful": int, "category": str},
    license="CC0-1.0 (written for safesteer)",
    hub_id=None,
    splits="single original split: 80/20 hash split on the text",
    read_package=_read,
)

SPECS: tuple[DatasetSpec, ...] = (CONTRAST,)
