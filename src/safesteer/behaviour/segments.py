"""The segmented gate in the study (``gate_segments = true``; :mod:`safesteer.steering.segments`).

* :func:`with_pieces` — the gate's training rows with pieces added as augmented copies of their
  prompt (multiple-instance learning): *every* piece of a harmless train prompt is a negative (a
  jailbreak template's sentences around a harmless request are harmless), and the top piece of a
  harmful train prompt with pieces — by a gate fitted on whole prompts — a positive (the request
  inside its wrapper). The copies sit in their prompt's cross-fitting fold and family fold
  (``origin``, ``group``), so no gate scores a prompt whose pieces it trained on.
* :func:`pieces` — the study's step between ``features`` and ``fit_gate``: the pieces of every gate
  prompt (:func:`~safesteer.steering.segments.expand` of the text the gate reads) and their pooled
  vectors. A prompt's segmented score is :func:`~safesteer.steering.segments.segment_max` of its own
  and its pieces'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from safesteer.behaviour.checkpoint import step_key
from safesteer.behaviour.context import Run
from safesteer.behaviour.prompts import Prompts
from safesteer.models.positions import pooled_at
from safesteer.steering.segments import expand


@dataclass
class Pieces:
    text: list[str]
    owner: np.ndarray  # the prompt row each piece came from
    gate: dict[int, np.ndarray]  # pooled at the gate position, per layer
    key: str


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


# the study's step (between features and fit_gate)
def pieces(run: Run, f: Any) -> Pieces | None:
    """The segmented gate's inputs (``gate_segments``): every prompt's pieces and their pooled vectors
    at the gate position and layers, each piece rendered as its own user message. None when off."""
    cfg = run.cfg
    if not cfg.gate_segments:
        return None
    key = step_key(run.base_key, "pieces", f.key)

    def compute() -> Pieces:
        t = time.perf_counter()
        text, owner = expand(f.prompts.text)
        uniq = list(dict.fromkeys(text))
        at = {u: i for i, u in enumerate(uniq)}
        V = pooled_at(run.bb, uniq, f.layers, (cfg.gate_position,), batch_size=cfg.batch_size)[
            cfg.gate_position
        ]
        idx = np.array([at[u] for u in text], dtype=np.int64)
        run.say(
            f"{len(text)} pieces of {len(np.unique(owner))} prompts ({len(uniq)} distinct) read alone in "
            f"{time.perf_counter() - t:.0f}s"
        )
        return Pieces(text, owner, {l: V[l][idx] if len(idx) else V[l][:0] for l in f.layers}, key)

    def save(pc: Pieces):
        return {"text": pc.text, "layers": list(pc.gate)}, {
            "owner": pc.owner,
            **{f"gate_{l}": v.astype(np.float32) for l, v in pc.gate.items()},
        }

    def load(data, arrays) -> Pieces:
        return Pieces(
            data["text"], arrays["owner"], {int(l): arrays[f"gate_{l}"] for l in data["layers"]}, key
        )

    return run.cached("pieces", key, compute, save, load)
