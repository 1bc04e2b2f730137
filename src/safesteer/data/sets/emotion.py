"""Emotion data: GoEmotions (multi-label) and EmpatheticDialogues (32 situation emotions)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safesteer.data.records import DatasetSpec, LabelValue, Row, canonical_split, one_hot
from safesteer.data.sets._common import read_csv, read_jsonl
from safesteer.data.sources import HubTable, download
from safesteer.errors import SafesteerError

# ----------------------------------------------------------------------------------------- GoEmotions

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
"""The 27 emotions + neutral of the simplified GoEmotions, in label-id order."""


def _go_labels(ids: Iterable[int]) -> dict[str, LabelValue]:
    return one_hot((GO_EMOTIONS[i] for i in ids), GO_EMOTIONS)


def _go_local(root: Path) -> Iterator[Row]:
    folder = root / "goemotions"
    lines = (folder / "labels.txt").read_text(encoding="utf-8").splitlines()
    names = tuple(line.strip() for line in lines if line.strip())
    if names != GO_EMOTIONS:
        raise SafesteerError(
            f"{folder / 'labels.txt'} does not list the 28 GoEmotions labels in the usual order"
        )
    for stem in ("train", "dev", "test"):
        split = canonical_split(stem)
        rows = read_csv(folder / f"{stem}.tsv", delimiter="\t", fieldnames=["text", "labels", "id"])
        for i, r in enumerate(rows):
            ids = [int(x) for x in r["labels"].split(",") if x.strip()]
            yield Row(f"{stem}:{i}", r["text"], _go_labels(ids), split)


def _go_hub(row: dict[str, Any]):
    yield "", row["text"], _go_labels(int(i) for i in row["labels"]), None


GO_EMOTIONS_SPEC = DatasetSpec(
    name="go_emotions",
    description="GoEmotions (Demszky et al. 2020): Reddit comments, 27 emotions + neutral, multi-label",
    labels={e: f"int 0/1: annotated with '{e}'" for e in GO_EMOTIONS},
    label_types={e: int for e in GO_EMOTIONS},
    license="Apache-2.0",
    hub_id="google-research-datasets/go_emotions",
    splits="train -> train, dev/validation + test -> test (hub config 'simplified')",
    local_files=tuple(f"goemotions/{f}" for f in ("train.tsv", "dev.tsv", "test.tsv", "labels.txt")),
    read_local=_go_local,
    read_hub=HubTable(
        "google-research-datasets/go_emotions",
        {"train": "train", "validation": "test", "test": "test"},
        _go_hub,
        configs=("simplified",),
    ),
)

# ------------------------------------------------------------------------------- EmpatheticDialogues

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

ED_URL = "https://dl.fbaipublicfiles.com/parlai/empatheticdialogues/empatheticdialogues.tar.gz"
ED_TAR_SPLITS = (("train.csv", "train"), ("valid.csv", "test"), ("test.csv", "test"))


def _ed_labels(emotion: str) -> dict[str, LabelValue]:
    if emotion not in ED_EMOTIONS:
        raise ValueError(f"unknown EmpatheticDialogues emotion {emotion!r}")
    return {"emotion": emotion, **one_hot([emotion], ED_EMOTIONS)}


def parse_ed_csv(lines: Iterable[str]) -> Iterator[tuple[str, str, list[str]]]:
    """Parse an original EmpatheticDialogues CSV into ``(conv_id, emotion, utterances)`` per dialogue.

    The files are not RFC CSV: fields never contain commas (they are written as ``_comma_``), so a
    line splits on ``,``. Columns: conv_id, utterance_idx, context (the emotion), prompt, speaker_idx,
    utterance, then optional selfeval/tags/candidates; lines with fewer than 6 fields are skipped.
    Utterances are ordered by utterance_idx.
    """
    order: list[str] = []
    dialogues: dict[str, tuple[str, list[tuple[int, str]]]] = {}
    it = iter(lines)
    next(it, None)  # header
    for line in it:
        parts = line.rstrip("\r\n").split(",")
        if len(parts) < 6 or not parts[1].strip().isdigit():
            continue
        conv, idx, emotion, utterance = parts[0], int(parts[1]), parts[2].strip(), parts[5]
        if conv not in dialogues:
            order.append(conv)
            dialogues[conv] = (emotion, [])
        dialogues[conv][1].append((idx, utterance.replace("_comma_", ",").strip()))
    for conv in order:
        emotion, utts = dialogues[conv]
        yield conv, emotion, [u for _, u in sorted(utts)]


def dialogue_contexts(utterances: list[str]) -> Iterator[list[str]]:
    """The speaker-side prefixes that are answered: utterances[:1], [:3], ... (as the offline jsonl has
    them)."""
    for k in range(1, len(utterances), 2):
        yield utterances[:k]


def _ed_local(root: Path) -> Iterator[Row]:
    for stem in ("dev", "test"):
        for i, r in enumerate(read_jsonl(root / f"empathetic_dialogues/{stem}.jsonl")):
            context = [str(u) for u in r["context"]]
            # all prefixes of one dialogue share its first utterance: keep them in one split
            yield Row(f"{stem}:{i}", "\n".join(context), _ed_labels(r["emotion"]), None, context[0])


def _ed_hub(wanted: frozenset[str], scan_limit: int | None) -> Iterator[Row]:
    path = download(ED_URL, "empatheticdialogues.tar.gz")
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for fname, split in ED_TAR_SPLITS:
                if split not in wanted:
                    continue
                if fname not in members:
                    raise SafesteerError(f"{path} has no {fname}; delete it to download it again")
                handle = tar.extractfile(members[fname])
                assert handle is not None
                lines = io.TextIOWrapper(handle, encoding="utf-8", errors="replace")
                n = 0
                for _conv, emotion, utts in parse_ed_csv(lines):
                    for context in dialogue_contexts(utts):
                        yield Row(f"{Path(fname).stem}:{n}", "\n".join(context), _ed_labels(emotion), split)
                        n += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SafesteerError(
            f"{path} is not a readable tarball ({exc}); delete it to download it again"
        ) from exc


EMPATHETIC_DIALOGUES = DatasetSpec(
    name="empathetic_dialogues",
    description="EmpatheticDialogues (Rashkin et al. 2019): dialogue contexts grounded in one of 32 emotions",
    labels={
        "emotion": "str: the situation's emotion",
        **{e: f"int 0/1: emotion == '{e}'" for e in ED_EMOTIONS},
    },
    label_types={"emotion": str, **{e: int for e in ED_EMOTIONS}},
    license="CC BY-NC 4.0",
    hub_id="facebook/empathetic_dialogues",
    splits=(
        "hub: the original tarball (the hub loading script is unreliable), train -> train, valid + "
        "test -> test; local dev+test jsonl: 80/20 hash split per dialogue"
    ),
    local_files=("empathetic_dialogues/dev.jsonl", "empathetic_dialogues/test.jsonl"),
    read_local=_ed_local,
    read_hub=_ed_hub,
)

SPECS: tuple[DatasetSpec, ...] = (GO_EMOTIONS_SPEC, EMPATHETIC_DIALOGUES)
