"""Named binary concept labels built from the datasets.

A :class:`LabelSpec` says which rows are positive and which are negative, as a union of
:class:`Part` s (dataset + condition on one of its labels). The same spec works on

* an activation store's label frame (one column per label, NaN where absent, a ``dataset`` column):
  :meth:`LabelSpec.y_from_frame` gives 1/0/NaN per row (NaN = not part of this concept), and
* the datasets themselves: :func:`collect_texts` draws texts for a spec (for probes on freshly
  pooled activations, causal screening and tests).

Named specs (:func:`get_spec`, :func:`spec_names`):

==================  ==========================================================================  =========
name                positives vs negatives                                                       category
==================  ==========================================================================  =========
toxicity            ToxiGen hate + RealToxicityPrompts toxic vs ToxiGen neutral + GoEmotions      toxicity
toxicity_madlibs    bias_madlibs BAD vs NOT_BAD                                                  toxicity
rtp:<attribute>     RTP (scored) attribute ≥ 0.5 vs < 0.5 (insult, threat, profanity, …)         toxicity
harmfulness         AdvBench + DoNotAnswer vs XSTest safe + HH-RLHF chosen                        harm
harm_beavertails    BeaverTails harmful vs XSTest safe                                           harm
harm:<category>     BeaverTails category vs the other BeaverTails categories                     harm
emotion:<e>         GoEmotions e vs GoEmotions not-e (28 labels incl. neutral)                    emotion
empathy:<e>         EmpatheticDialogues e vs the other ED emotions (32)                          empathy
identity:<group>    ToxiGen target group vs the other groups                                     identity
==================  ==========================================================================  =========
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from safesteer.data import load
from safesteer.errors import SafesteerError, choices_hint

GO_EMOTIONS: tuple[str, ...] = (
    "admiration",
    "amusement",
    "anger",
    "annoyance",
    "approval",
    "caring",
    "confusion",
    "curiosity",
    "desire",
    "disappointment",
    "disapproval",
    "disgust",
    "embarrassment",
    "excitement",
    "fear",
    "gratitude",
    "grief",
    "joy",
    "love",
    "nervousness",
    "optimism",
    "pride",
    "realization",
    "relief",
    "remorse",
    "sadness",
    "surprise",
    "neutral",
)
ED_EMOTIONS: tuple[str, ...] = (
    "afraid",
    "angry",
    "annoyed",
    "anticipating",
    "anxious",
    "apprehensive",
    "ashamed",
    "caring",
    "confident",
    "content",
    "devastated",
    "disappointed",
    "disgusted",
    "embarrassed",
    "excited",
    "faithful",
    "furious",
    "grateful",
    "guilty",
    "hopeful",
    "impressed",
    "jealous",
    "joyful",
    "lonely",
    "nostalgic",
    "prepared",
    "proud",
    "sad",
    "sentimental",
    "surprised",
    "terrified",
    "trusting",
)
TOXIGEN_GROUPS: tuple[str, ...] = (
    "asian",
    "bisexual",
    "black",
    "chinese",
    "immigrant",
    "jewish",
    "latino",
    "lgbtq",
    "mental_disability",
    "mexican",
    "middle_east",
    "muslim",
    "native_american",
    "physical_disability",
    "trans",
    "women",
)
RTP_ATTRIBUTES: tuple[str, ...] = (
    "severe_toxicity",
    "profanity",
    "sexually_explicit",
    "flirtation",
    "identity_attack",
    "threat",
    "insult",
)
BEAVERTAILS_LABELS: tuple[str, ...] = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics_politics",
    "discrimination_stereotype_injustice",
    "drug_abuse_weapons_banned_substance",
    "financial_crime_property_crime_theft",
    "hate_speech_offensive_language",
    "misinformation_regarding_ethics_laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit_adult_content",
    "terrorism_organized_crime",
    "violence_aiding_and_abetting_incitement",
)

#: macro-categories used by the filtered atom selection (identity is mapped but not steered on)
MACRO_CATEGORIES: tuple[str, ...] = ("toxicity", "harm", "emotion", "empathy")


@dataclass(frozen=True)
class Part:
    """Rows of ``dataset`` whose label ``column`` satisfies ``op value`` (``column=None``: every row).

    ``op``: ``eq`` (==), ``ne`` (!=, rows lacking the label excluded), ``ge`` (≥), ``lt`` (<).
    """

    dataset: str
    column: str | None = None
    value: Any = 1
    op: str = "eq"

    def describe(self) -> str:
        if self.column is None:
            return self.dataset
        sym = {"eq": "==", "ne": "!=", "ge": ">=", "lt": "<"}[self.op]
        return f"{self.dataset}[{self.column} {sym} {self.value!r}]"

    def _test(self, v: Any) -> bool:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        if self.op == "eq":
            return _eq(v, self.value)
        if self.op == "ne":
            return not _eq(v, self.value)
        try:
            return float(v) >= float(self.value) if self.op == "ge" else float(v) < float(self.value)
        except (TypeError, ValueError):
            return False

    def match_record(self, dataset: str, labels: dict[str, Any]) -> bool:
        if dataset != self.dataset:
            return False
        if self.column is None:
            return True
        return self.column in labels and self._test(labels[self.column])

    def match_frame(self, df: pd.DataFrame) -> np.ndarray:
        ds = (
            df["dataset"].astype(str).to_numpy()
            if "dataset" in df.columns
            else np.full(len(df), "", dtype=object)
        )
        m = ds == self.dataset
        if self.column is None or not m.any():
            return m
        if self.column not in df.columns:
            return np.zeros(len(df), dtype=bool)
        col = df[self.column]
        out = np.zeros(len(df), dtype=bool)
        idx = np.flatnonzero(m)
        vals = col.to_numpy()[idx]
        out[idx] = [self._test(v) for v in vals]
        return out


def _eq(a: Any, b: Any) -> bool:
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return str(a) == str(b)


@dataclass(frozen=True)
class LabelSpec:
    """A binary concept: positives vs negatives, each a union of :class:`Part` s."""

    name: str
    category: str
    description: str
    positives: tuple[Part, ...]
    negatives: tuple[Part, ...]

    @property
    def datasets(self) -> list[str]:
        return sorted({p.dataset for p in self.positives + self.negatives})

    def y_from_frame(self, df: pd.DataFrame) -> np.ndarray:
        """1.0 / 0.0 / NaN per row of a label frame (NaN = outside the spec or in both sides)."""
        pos = np.zeros(len(df), dtype=bool)
        neg = np.zeros(len(df), dtype=bool)
        for p in self.positives:
            pos |= p.match_frame(df)
        for p in self.negatives:
            neg |= p.match_frame(df)
        y = np.full(len(df), np.nan)
        y[pos & ~neg] = 1.0
        y[neg & ~pos] = 0.0
        return y

    def y_from_record(self, dataset: str, labels: dict[str, Any]) -> float:
        pos = any(p.match_record(dataset, labels) for p in self.positives)
        neg = any(p.match_record(dataset, labels) for p in self.negatives)
        return 1.0 if pos and not neg else 0.0 if neg and not pos else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "description": self.description,
            "positives": [p.describe() for p in self.positives],
            "negatives": [p.describe() for p in self.negatives],
        }


def _spec_table() -> dict[str, LabelSpec]:
    specs: list[LabelSpec] = [
        LabelSpec(
            "toxicity",
            "toxicity",
            "ToxiGen hate + RealToxicityPrompts toxic vs ToxiGen neutral + GoEmotions",
            (Part("toxigen", "toxic", 1), Part("realtoxicityprompts", "toxic", 1)),
            (Part("toxigen", "toxic", 0), Part("go_emotions")),
        ),
        LabelSpec(
            "toxicity_madlibs",
            "toxicity",
            "bias_madlibs identity templates: BAD vs NOT_BAD",
            (Part("bias_madlibs", "toxic", 1),),
            (Part("bias_madlibs", "toxic", 0),),
        ),
        LabelSpec(
            "harmfulness",
            "harm",
            "AdvBench + DoNotAnswer vs XSTest safe + HH-RLHF chosen",
            (Part("advbench"), Part("donotanswer")),
            (Part("xstest", "unsafe", 0), Part("hh_rlhf_harmless", "chosen", 1)),
        ),
        LabelSpec(
            "harm_beavertails",
            "harm",
            "BeaverTails harmful QA vs XSTest safe prompts",
            (Part("beavertails", "harmful", 1),),
            (Part("xstest", "unsafe", 0),),
        ),
    ]
    for a in RTP_ATTRIBUTES:
        specs.append(
            LabelSpec(
                f"rtp:{a}",
                "toxicity",
                f"RealToxicityPrompts (scored) {a} >= 0.5 vs < 0.5",
                (Part("realtoxicityprompts", a, 0.5, "ge"),),
                (Part("realtoxicityprompts", a, 0.5, "lt"),),
            )
        )
    for c in BEAVERTAILS_LABELS:
        specs.append(
            LabelSpec(
                f"harm:{c}",
                "harm",
                f"BeaverTails category {c} vs the other harmful categories",
                (Part("beavertails", c, 1),),
                (Part("beavertails", c, 0),),
            )
        )
    for e in GO_EMOTIONS:
        specs.append(
            LabelSpec(
                f"emotion:{e}",
                "emotion",
                f"GoEmotions '{e}' vs not '{e}'",
                (Part("go_emotions", e, 1),),
                (Part("go_emotions", e, 0),),
            )
        )
    for e in ED_EMOTIONS:
        specs.append(
            LabelSpec(
                f"empathy:{e}",
                "empathy",
                f"EmpatheticDialogues '{e}' vs the other emotions",
                (Part("empathetic_dialogues", e, 1),),
                (Part("empathetic_dialogues", e, 0),),
            )
        )
    for g in TOXIGEN_GROUPS:
        specs.append(_identity_spec(g))
    return {s.name: s for s in specs}


def _identity_spec(group: str) -> LabelSpec:
    return LabelSpec(
        f"identity:{group}",
        "identity",
        f"ToxiGen texts about '{group}' vs about other groups",
        (Part("toxigen", "target_group", group),),
        (Part("toxigen", "target_group", group, "ne"),),
    )


SPECS: dict[str, LabelSpec] = _spec_table()


def spec_names(category: str | None = None) -> list[str]:
    return [n for n, s in SPECS.items() if category is None or s.category == category]


def get_spec(name: str) -> LabelSpec:
    """Named spec; ``identity:<any group>`` works for groups beyond ToxiGen's offline ones."""
    if name in SPECS:
        return SPECS[name]
    if name.startswith("identity:") and len(name) > len("identity:"):
        return _identity_spec(name.split(":", 1)[1])
    short = [n for n in SPECS if ":" not in n] + [
        "emotion:<e>",
        "empathy:<e>",
        "rtp:<attr>",
        "harm:<category>",
        "identity:<group>",
    ]
    raise SafesteerError(choices_hint(f"label '{name}'", short))


def category_of(label: str) -> str:
    return get_spec(label).category if (label in SPECS or label.startswith("identity:")) else "other"


def specs_for_frame(
    df: pd.DataFrame, names: Iterable[str] | None = None, min_per_class: int = 1
) -> dict[str, np.ndarray]:
    """``{label: y}`` for every spec (or those in ``names``) with ≥ ``min_per_class`` rows per class in
    ``df``.

    Identity groups found in a ``target_group`` column are added beyond the built-in list.
    """
    chosen = list(names) if names is not None else list(SPECS)
    if names is None and "target_group" in df.columns:
        for g in sorted({str(v) for v in df["target_group"].dropna().unique() if str(v)}):
            if f"identity:{g}" not in chosen:
                chosen.append(f"identity:{g}")
    out: dict[str, np.ndarray] = {}
    for name in chosen:
        y = get_spec(name).y_from_frame(df)
        if np.sum(y == 1) >= min_per_class and np.sum(y == 0) >= min_per_class:
            out[name] = y
    return out


# ------------------------------------------------------------------------------------ from datasets
@dataclass
class LabelledTexts:
    """Texts drawn for a spec: parallel lists of ids, texts, labels (0/1) and the dataset split."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    y: list[int] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    dataset: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, mask: Sequence[bool]) -> "LabelledTexts":
        m = list(mask)
        pick = lambda xs: [x for x, k in zip(xs, m) if k]  # noqa: E731
        return LabelledTexts(
            pick(self.ids), pick(self.texts), pick(self.y), pick(self.split), pick(self.dataset)
        )


@functools.lru_cache(maxsize=8)
def _records(dataset: str, split: str, source: str, data_dir: str | None) -> tuple:
    """All records of a dataset split, cached (label specs often share GoEmotions/ToxiGen)."""
    return tuple(load(dataset, split=split, source=source, data_dir=data_dir))


def collect_texts(
    spec: LabelSpec | str,
    *,
    split: str = "all",
    max_per_part: int | None = 200,
    data_dir=None,
    source: str = "auto",
    seed: int = 0,
    max_chars: int | None = 2000,
) -> LabelledTexts:
    """Draw up to ``max_per_part`` texts per positive/negative part (seeded sample) for ``spec``.

    Each dataset is read once; rows that match neither side are skipped; texts are cut to
    ``max_chars`` characters (long dialogues). Returns rows grouped positives first.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    out = LabelledTexts()
    parts = [(p, 1) for p in spec.positives] + [(p, 0) for p in spec.negatives]
    by_ds: dict[str, list[tuple[Part, int]]] = {}
    for p, side in parts:
        by_ds.setdefault(p.dataset, []).append((p, side))
    buckets: dict[tuple[int, int], list] = {}
    for ds, plist in by_ds.items():
        for rec in _records(ds, split, source, str(data_dir) if data_dir is not None else None):
            y = spec.y_from_record(ds, rec.labels)
            if math.isnan(y):
                continue
            for p, side in plist:
                if side == int(y) and p.match_record(ds, rec.labels):
                    buckets.setdefault((parts.index((p, side)), side), []).append(rec)
                    break
    rng = random.Random(seed)
    for (_part, side), recs in sorted(buckets.items()):
        if max_per_part is not None and len(recs) > max_per_part:
            recs = rng.sample(recs, max_per_part)
        for r in recs:
            text = r.text if max_chars is None else r.text[:max_chars]
            out.ids.append(r.id)
            out.texts.append(text)
            out.y.append(side)
            out.split.append(r.split)
            out.dataset.append(r.id.split(":", 1)[0])
    if not any(out.y) or all(out.y):
        raise SafesteerError(
            f"label '{spec.name}' found only one class in the data ({', '.join(spec.datasets)}); check "
            "--data-dir"
        )
    return out
