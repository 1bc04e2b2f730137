"""The segmented reading of a request: the gate scores the whole text *and* each of its pieces read
alone, and fires when any of them does (issue #25).

A jailbreak wraps a request in a costume — a persona, a story, a rule list, a few-shot ladder, a
conversation. Pooled over the whole prompt, the residual reads the costume: on SmolLM2 the gate's
AUROC, harmful vs benign requests in the same wrappers of families it never saw, is 0.71, against
0.96 on direct requests, and pooling over windows of the same pass does not help (the windows'
residuals already carry the costume; ``docs/jailbreaks.md``). Read *alone*, the request inside is a
direct request again. So the segmented gate splits the text into its sentences, lines and clauses
(after a colon: "Task: …", "…the answer to: …"), renders each as its own user message, scores each
with the same gate and takes the maximum. A text of one piece is read exactly as before.

The same rule serves the study and the service: :func:`pieces` is what both read, and
:func:`segment_max` how a text's score comes from its pieces'.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

MIN_WORDS = 3
"""A piece needs at least this many words ("Go on." or "(t)ruly amazing" is not a request)."""
MAX_PIECES = 64
"""Pieces read per text at most (a 2,000-character DAN prompt has about 25): the first and the last
halves are kept, where wrappers put the request."""

_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+|(?<=:)\s+")


def pieces(text: str, min_words: int = MIN_WORDS, max_pieces: int = MAX_PIECES) -> list[str]:
    """The sentences, lines and after-colon clauses of ``text`` with at least ``min_words`` words,
    in order, without repeats and without the whole text itself (empty: the text is one piece)."""
    whole = text.strip()
    out: list[str] = []
    seen = {whole}
    for p in _SPLIT.split(whole):
        p = p.strip()
        if len(p.split()) >= min_words and p not in seen:
            seen.add(p)
            out.append(p)
    if len(out) > max_pieces:
        out = out[: max_pieces // 2] + out[len(out) - (max_pieces - max_pieces // 2) :]
    return out


def expand(texts: Sequence[str], **kw) -> tuple[list[str], np.ndarray]:
    """The pieces of every text, flat, and the index of the text each came from."""
    flat: list[str] = []
    owner: list[int] = []
    for i, t in enumerate(texts):
        ps = pieces(t, **kw)
        flat += ps
        owner += [i] * len(ps)
    return flat, np.asarray(owner, dtype=np.int64)


def segment_max(whole: np.ndarray, piece_scores: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per text: the largest of its own score (``whole``) and its pieces' (``piece_scores``, the
    ``owner`` of each). NaN pieces are skipped; a NaN whole stays NaN (a row not scored)."""
    out = np.asarray(whole, dtype=np.float64).copy()
    s = np.asarray(piece_scores, dtype=np.float64)
    o = np.asarray(owner, dtype=np.int64)
    if len(s) != len(o):
        raise ValueError(f"{len(s)} piece scores for {len(o)} owners")
    ok = ~np.isnan(s) & ~np.isnan(out[o]) if len(o) else np.zeros(0, bool)
    np.maximum.at(out, o[ok], s[ok])
    return out
