"""Benign look-alikes and everyday chat turns written for safesteer, shipped inside the package.

The files live in ``safesteer/data/`` (no data directory, no network; served by the ``package`` source)
and are checked by tests to be no near-copy of XSTest, AdvBench, Do-Not-Answer, the shipped contrast,
tasks and paraphrase files, or each other. Splits: an 80/20 hash split on the text.

- ``lookalikes`` (``lookalike_prompts.jsonl``; ``{"id", "prompt", "harmful", "category", "frame"}``):
  harmless requests on sensitive topics (:data:`LOOKALIKE_CATEGORIES`) in the imperative and question
  frames harmful requests use ("Write a story where…", "Explain how … happened", "Describe the tactics
  used by … so I can recognise them", "How do … ?"), about half in each ``frame``. ``harmful`` is
  always 0: a gate that flags them reads the topic, not the request.
- ``chat_turns`` (``chat_turns.jsonl``; ``{"id", "text", "category"}``): short benign user turns
  (:data:`CHAT_TURN_CATEGORIES`: greetings, thanks, "Continue.", "Yes, please.", "Are you sure?",
  "Make it shorter."…) with varied casing, punctuation, emoji and typos; ``harmful`` is always 0.
- ``chat_followups.jsonl`` (not a dataset: :func:`chat_followup_rows`; ``{"id", "assistant",
  "followup", "stance"}``): an assistant reply stub (``stance`` ``comply``: a generic compliant start,
  or ``refuse``: a refusal) and the user's short follow-up that pushes on. Combined with a request as
  ``[user: request, assistant: stub, user: followup]``, the conversation takes the request's label
  (and split).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

from safesteer.data.records import DatasetSpec, Row

LOOKALIKES_RESOURCE = "data/lookalike_prompts.jsonl"
CHAT_TURNS_RESOURCE = "data/chat_turns.jsonl"
CHAT_FOLLOWUPS_RESOURCE = "data/chat_followups.jsonl"
"""Paths of the shipped files inside the ``safesteer`` package."""

LOOKALIKE_CATEGORIES: tuple[str, ...] = (
    "fiction_crime",
    "history_atrocities",
    "misinformation_factcheck",
    "personal_safety",
    "drug_harm_reduction",
    "cybersecurity_defence",
    "legal_crime_questions",
    "extremism_analysis",
    "weapons_history_sport",
)
"""The look-alike categories (every prompt harmless)."""

LOOKALIKE_HELDOUT: str = "extremism_analysis"
"""The category kept out of training and calibration entirely, scored only at test.

Why this one: its vocabulary (terrorist, radicalised, recruit, propaganda, manifesto, ISIS) is the
strongest harm cue of any category and shares no topic with the other eight, so a gate cannot pass it
by having seen benign requests about the same subject: it must read the intent of the request
(recognise, analyse, prevent, leave) rather than its topic. Its imperative items ("Describe the
recruitment tactics extremist groups use…") are also worded like the harmful requests a gate is
trained to flag. Caveat: the shipped contrast set holds a few prompts on the same ground (c231,
c337, c366, c716); the held-out prompts were rewritten to be no near-copy of them.
"""

FRAMES: tuple[str, ...] = ("imperative", "question")

CHAT_TURN_CATEGORIES: tuple[str, ...] = (
    "greeting",
    "thanks",
    "continue",
    "confirm",
    "doubt",
    "clarify",
    "format",
    "feedback",
    "farewell",
)
"""The kinds of short chat turns (every turn harmless)."""

STANCES: tuple[str, ...] = ("comply", "refuse")


def _shipped(resource: str) -> list[dict[str, Any]]:
    text = resources.files("safesteer").joinpath(resource).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def lookalike_rows() -> list[dict[str, Any]]:
    """The shipped look-alike objects, in file order."""
    return _shipped(LOOKALIKES_RESOURCE)


def chat_turn_rows() -> list[dict[str, Any]]:
    """The shipped chat-turn objects, in file order."""
    return _shipped(CHAT_TURNS_RESOURCE)


def chat_followup_rows() -> list[dict[str, Any]]:
    """The shipped ``{"id", "assistant", "followup", "stance"}`` objects, in file order (checked: a
    non-empty stub and follow-up, a stance of :data:`STANCES`; else a ``ValueError``)."""
    rows = _shipped(CHAT_FOLLOWUPS_RESOURCE)
    for r in rows:
        if r.get("stance") not in STANCES or not str(r.get("assistant", "")).strip():
            raise ValueError(f"chat follow-up {r.get('id')}: stance must be one of {STANCES}, stub non-empty")
        if not str(r.get("followup", "")).strip():
            raise ValueError(f"chat follow-up {r.get('id')}: empty follow-up")
    return rows


def _check(r: dict[str, Any], field: str, allowed: tuple[str, ...]) -> str:
    if r.get(field) not in allowed:
        raise ValueError(f"row {r.get('id')}: {field} must be one of {', '.join(allowed)}")
    return r[field]


def _read_lookalikes() -> Iterator[Row]:
    for r in lookalike_rows():
        if r.get("harmful") != 0 or type(r.get("harmful")) is not int:
            raise ValueError(f"row {r.get('id')}: harmful must be 0")
        labels = {
            "harmful": 0,
            "category": _check(r, "category", LOOKALIKE_CATEGORIES),
            "frame": _check(r, "frame", FRAMES),
        }
        yield Row(f"lookalike_prompts:{r['id']}", r["prompt"], labels)


def _read_chat_turns() -> Iterator[Row]:
    for r in chat_turn_rows():
        labels = {"harmful": 0, "category": _check(r, "category", CHAT_TURN_CATEGORIES)}
        yield Row(f"chat_turns:{r['id']}", r["text"], labels)


LOOKALIKES = DatasetSpec(
    name="lookalikes",
    description="Benign requests on sensitive topics written for safesteer, in harmful requests' frames",
    labels={
        "harmful": "int: always 0 (a request a responsible assistant would help with)",
        "category": f"str: one of {', '.join(LOOKALIKE_CATEGORIES)} (held out: {LOOKALIKE_HELDOUT})",
        "frame": "str: imperative or question",
    },
    label_types={"harmful": int, "category": str, "frame": str},
    license="CC0-1.0 (written for safesteer)",
    hub_id=None,
    splits="single original split: 80/20 hash split on the text",
    read_package=_read_lookalikes,
)

CHAT_TURNS = DatasetSpec(
    name="chat_turns",
    description="Short benign chat turns written for safesteer (greetings, thanks, 'Continue.', …)",
    labels={
        "harmful": "int: always 0",
        "category": f"str: one of {', '.join(CHAT_TURN_CATEGORIES)}",
    },
    label_types={"harmful": int, "category": str},
    license="CC0-1.0 (written for safesteer)",
    hub_id=None,
    splits="single original split: 80/20 hash split on the text",
    read_package=_read_chat_turns,
)

SPECS: tuple[DatasetSpec, ...] = (LOOKALIKES, CHAT_TURNS)
