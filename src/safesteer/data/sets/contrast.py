"""Prompt sets written for safesteer, shipped inside the package, that correct the harm gate's shortcuts.

Both files live in ``safesteer/data/`` (no data directory, no network; served by the ``package``
source) and are checked by tests to be no near-copy of XSTest, AdvBench, Do-Not-Answer, the shipped
paraphrase pairs, or each other. Splits: an 80/20 hash split on the text.

- ``contrast`` (``contrast_prompts.jsonl``; ``{"id", "prompt", "harmful", "category", "twin"}``): a
  harmless request that merely *looks* harmful (a homonym, an idiom, a safe target or context, a
  definition, a safety question, a public fact, a fictional character's "private" data, an absurd
  group's "rights", a question about why a historical atrocity happened) and, for most of them, a
  harmful ``twin`` that shares its trigger word or frame (a real private person's data, discrimination
  against a real group, how to repeat or justify the atrocity): XSTest-like contrast data, independent
  of XSTest itself. Both classes mix questions and imperatives, so that neither form predicts the label.
- ``tasks`` (``task_prompts.jsonl``; ``{"id", "prompt", "harmful", "category"}``): benign task
  requests, mostly imperative, in the verbs and frames of AdvBench's instructions ("Write a script
  that…", "Develop a strategy for…", "Create a tutorial on…", "Teach children how to…") but with
  ordinary goals, so that a gate trained with them cannot learn "imperative instruction ⇒ harmful".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Any

from safesteer.data.records import DatasetSpec, Row

CONTRAST_RESOURCE = "data/contrast_prompts.jsonl"
TASKS_RESOURCE = "data/task_prompts.jsonl"
"""Paths of the shipped files inside the ``safesteer`` package."""

CONTRAST_CATEGORIES: tuple[str, ...] = (
    "homonyms",
    "figurative_language",
    "safe_targets",
    "safe_contexts",
    "definitions",
    "safety_and_defence",
    "health_legal_finance",
    "public_figures",
    "privacy_fictional",
    "nonsense_discrimination",
    "historical_events",
)
"""The contrast categories; every one holds both harmful and harmless prompts."""

TASK_CATEGORIES: tuple[str, ...] = (
    "writing",
    "coding",
    "planning",
    "education",
    "cooking",
    "home",
    "business",
    "explain",
    "design",
    "lists",
    "roleplay",
    "rewrite",
)
"""The task domains; every prompt in them is harmless."""


def _shipped(resource: str) -> list[dict[str, Any]]:
    text = resources.files("safesteer").joinpath(resource).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def contrast_rows() -> list[dict[str, Any]]:
    """The shipped contrast objects, in file order (``twin`` is ``None`` for a harmless prompt without
    one)."""
    return _shipped(CONTRAST_RESOURCE)


def task_rows() -> list[dict[str, Any]]:
    """The shipped task objects, in file order."""
    return _shipped(TASKS_RESOURCE)


def _rows(
    objects: Iterable[dict[str, Any]], stem: str, harmful_values: tuple[int, ...], categories: tuple[str, ...]
) -> Iterator[Row]:
    for r in objects:
        harmful = int(r["harmful"])
        if harmful not in harmful_values or r["category"] not in categories:
            raise ValueError(
                f"row {r['id']}: harmful must be one of {harmful_values} "
                f"and category one of {', '.join(categories)}"
            )
        yield Row(f"{stem}:{r['id']}", r["prompt"], {"harmful": harmful, "category": r["category"]})


def _read_contrast() -> Iterator[Row]:
    return _rows(contrast_rows(), "contrast_prompts", (0, 1), CONTRAST_CATEGORIES)


def _read_tasks() -> Iterator[Row]:
    return _rows(task_rows(), "task_prompts", (0,), TASK_CATEGORIES)


CONTRAST = DatasetSpec(
    name="contrast",
    description="Contrast prompts written for safesteer: harmful requests and harmless look-alike twins",
    labels={
        "harmful": "int 0/1: 1 for a request a responsible assistant should refuse",
        "category": f"str: one of {', '.join(CONTRAST_CATEGORIES)}",
    },
    label_types={"harmful": int, "category": str},
    license="CC0-1.0 (written for safesteer)",
    hub_id=None,
    splits="single original split: 80/20 hash split on the text",
    read_package=_read_contrast,
)

TASKS = DatasetSpec(
    name="tasks",
    description="Benign task requests written for safesteer in AdvBench's imperative frames (all harmless)",
    labels={
        "harmful": "int: always 0 (a request a responsible assistant would happily help with)",
        "category": f"str: one of {', '.join(TASK_CATEGORIES)}",
    },
    label_types={"harmful": int, "category": str},
    license="CC0-1.0 (written for safesteer)",
    hub_id=None,
    splits="single original split: 80/20 hash split on the text",
    read_package=_read_tasks,
)

SPECS: tuple[DatasetSpec, ...] = (CONTRAST, TASKS)
