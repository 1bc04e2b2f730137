"""The segmented gate in the study (``gate_segments = true``; :mod:`safesteer.steering.segments`).

* :func:`piece_rows` — the pieces of every gate prompt (the text the gate reads), flat, with the row
  each came from; their pooled vectors are the ``pieces`` step's.
* :func:`with_pieces` — the gate's training rows with pieces added as augmented copies of their
  prompt (multiple-instance learning): *every* piece of a harmless train prompt is a negative (a
  jailbreak template's sentences around a harmless request are harmless), and the top piece of a
  harmful train prompt with pieces — by a gate fitted on whole prompts — a positive (the request
  inside its wrapper). The copies sit in their prompt's cross-fitting fold and family fold
  (``origin``, ``group``), so no gate scores a prompt whose pieces it trained on.
* :func:`piece_scores` — every prompt's score as the segmented gate gives it: the largest of its
  own and its pieces'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from safesteer.behaviour.prompts import Prompts
from safesteer.steering.segments import expand, segment_max


@dataclass
class Pieces:
    text: list[str]
    owner: np.ndarray  # the prompt row each piece came from
    gate: dict[int, np.ndarray]  # pooled at the gate position, per layer
    key: str


def piece_rows(P: Prompts) -> tuple[list[str], np.ndarray]:
    """The pieces of every prompt's gate text (``P.text``), flat, and the row each came from."""
    return expand(P.text)


def with_pieces(
    P: Prompts,
    H: np.ndarray,
    piece_text: list[str],
    owner: np.ndarray,
    piece_H: np.ndarray,
    score0: np.ndarray,
) -> tuple[Prompts, np.ndarray]:
    """``(P, H)`` with the train rows' pieces appended as augmented copies (see the module text);
    ``score0`` are the pieces' scores by the whole-prompt gate (it picks a harmful prompt's piece)."""
    tr = np.asarray(P.split) == "train"
    keep: list[int] = []
    label: list[int] = []
    for row in np.unique(owner[tr[owner]]) if len(owner) else []:
        idx = np.flatnonzero(owner == row)
        if P.harmful[row]:
            keep.append(int(idx[np.argmax(score0[idx])]))
            label.append(1)
        else:
            keep += [int(i) for i in idx]
            label += [0] * len(idx)
    k = np.asarray(keep, dtype=np.int64)
    rows = owner[k]
    rows = np.where(P.aug[rows], P.origin[rows], rows)  # a reframed copy's pieces: in its original's fold
    rows = np.where(rows < 0, owner[k], rows)
    ext = Prompts(
        list(P.text) + [piece_text[i] for i in k],
        np.concatenate([P.harmful, np.asarray(label, dtype=P.harmful.dtype)]),
        list(P.group) + [P.group[r] for r in owner[k]],
        list(P.split) + ["train"] * len(k),
        np.concatenate([P.aug, np.ones(len(k), dtype=bool)]),
        np.concatenate([P.origin, rows]),
        list(P.chats or [None] * len(P)) + [None] * len(k),
    )
    return ext, np.vstack([H, piece_H[k]]) if len(k) else H


def piece_scores(
    score: Callable[[np.ndarray], np.ndarray], H: np.ndarray, pc: Any, piece_H: np.ndarray
) -> np.ndarray:
    """Every prompt's segmented score by ``score`` (rows of ``H``; its pieces' vectors ``piece_H``)."""
    whole = score(H)
    if pc is None or not len(pc.owner):
        return whole
    return segment_max(whole, score(piece_H), pc.owner)
