"""Does the harm gate read the request inside a jailbreak wrapper better as the max over windows of the user
content than as the mean over the whole prompt? (Issue #25's open question; results in docs/jailbreaks.md.)

Reads a behaviour stage run with the attack rows (``configs/attacks.toml``): its ``features/prompts.csv``
and ``features/prompt_layer{L}.npy``. For every wrapped row (``wrap:*`` harmful, ``wrapb:*`` benign) it
pools ``W``-token windows of the user content (stride W/2, each with the template's closing tokens, as the
``prompt`` position reads them). Three linear gates (standardised features, plain logistic regression,
C=0.05) are scored on the wrapped test rows of the families of one hash fold, trained without that fold's
families: the direct-only gate on mean pooling; the same with the other fold's wrapped rows (the study's
recipe); and a window gate (multiple-instance style: every window of a wrapped *benign* training prompt is a
negative, the top window of a wrapped harmful one, by the direct gate, a positive), scored as the max over
windows. Beside them the segmented gate (:mod:`safesteer.steering.segments`): the same max, over the
request's *pieces* (sentences, lines, after-colon clauses) each read alone in a pass of its own, with the
direct-only gate and with the multiple-instance training above on pieces instead of windows.

Usage: ``python bench/gate_windows.py RUN/stages/behaviour-*/ [--layer 15] [--window 16] [--model M]``
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from safesteer.models import load_backbone
from safesteer.models.positions import chat_inputs, pooled_at
from safesteer.steering.segments import expand


def _fit(X: np.ndarray, y: np.ndarray):
    sc = StandardScaler().fit(X)
    m = LogisticRegression(C=0.05, max_iter=3000).fit(sc.transform(X), y)
    return lambda Z: m.decision_function(sc.transform(Z))


def _windows(bb, text: str, layer: int, w: int) -> np.ndarray:
    ci = chat_inputs(bb, [text])
    ids = torch.tensor([ci.ids[0]])
    with torch.inference_mode():
        h = bb.forward_layers(ids, torch.ones_like(ids), [layer])[layer][0].double().numpy()
    s, _ = ci.prompt[0]
    ps, pe = ci.prompt_end[0]
    content, tail = h[s:ps], h[ps:pe]
    starts = range(0, max(1, len(content) - w + 1), max(1, w // 2))
    return np.array([np.vstack([content[a : a + w], tail]).mean(0) for a in starts])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", type=Path, help="a behaviour stage folder of a run with attack rows")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args(argv)
    feats = a.stage / "features"
    if not (feats / "prompts.csv").is_file() or not (feats / f"prompt_layer{a.layer}.npy").is_file():
        print(
            f"error: {feats} has no prompts.csv / prompt_layer{a.layer}.npy; give a behaviour stage folder",
            file=sys.stderr,
        )
        return 2
    rows = list(csv.DictReader(open(feats / "prompts.csv", newline="")))
    grp = np.array([r["group"] for r in rows])
    split = np.array([r["split"] for r in rows])
    y = np.array([r["harmful"] in ("1", "1.0", "True", "true") for r in rows])
    X = np.load(feats / f"prompt_layer{a.layer}.npy").astype(np.float64)
    wrapped = np.array([g.startswith(("wrap:", "wrapb:")) for g in grp])
    if not wrapped.any():
        print("error: the run has no wrapped rows; run it with configs/attacks.toml", file=sys.stderr)
        return 2
    chat = np.array([g.startswith("conv:") or bool(r["chat"]) for g, r in zip(grp, rows)])
    fam = np.array([g.split(":", 1)[1] if w else "" for g, w in zip(grp, wrapped)])
    fold = np.array(
        [hashlib.sha256(f"safesteer-family|{f}".encode()).digest()[0] % 2 if f else -1 for f in fam]
    )
    direct = (split == "train") & ~wrapped & ~chat
    bb = load_backbone(a.model)
    idx = np.flatnonzero(wrapped & (split != "val"))
    wins = {}
    for k, i in enumerate(idx):
        wins[i] = _windows(bb, rows[i]["text"], a.layer, a.window)
        if k % 100 == 0:
            print(f"[gate_windows] {k}/{len(idx)} wrapped prompts", file=sys.stderr)
    texts = [rows[i]["text"] for i in idx]
    flat, owner = expand(texts)
    uniq = list(dict.fromkeys(flat))
    V = pooled_at(bb, uniq, [a.layer], ("prompt",), batch_size=32)["prompt"][a.layer].astype(np.float64)
    at = {u: k for k, u in enumerate(uniq)}
    alone = {i: [at[flat[j]] for j in np.flatnonzero(owner == k)] for k, i in enumerate(idx)}
    g0 = _fit(X[direct], y[direct])

    def piece_max(g, i) -> float:
        return float(max(g(X[[i]])[0], *(g(V[alone[i]]) if alone[i] else [-np.inf])))

    scores: dict[str, list[float]] = {
        "direct-only, mean": [],
        "+ wrapped train, mean": [],
        "window max (MIL)": [],
        "segmented, direct-only": [],
        "segmented (MIL on pieces)": [],
    }
    truth: list[bool] = []
    for k in (0, 1):
        tr = [i for i in idx if split[i] == "train" and fold[i] != k]
        neg = np.vstack([wins[i] for i in tr if not y[i]])
        pos = np.array([wins[i][np.argmax(g0(wins[i]))] for i in tr if y[i]])
        gw = _fit(np.vstack([X[direct], neg, pos]), np.r_[y[direct], np.zeros(len(neg)), np.ones(len(pos))])
        m = direct | ((split == "train") & wrapped & (fold != k))
        gm = _fit(X[m], y[m])
        pneg = [V[alone[i]] for i in tr if not y[i] and alone[i]]
        ppos = [V[alone[i]][np.argmax(g0(V[alone[i]]))] for i in tr if y[i] and alone[i]]
        A = np.vstack([X[direct], *pneg, *([np.array(ppos)] if ppos else [])])
        b = np.r_[y[direct], np.zeros(sum(len(n) for n in pneg)), np.ones(len(ppos))]
        gs = _fit(A, b)
        te = [i for i in idx if split[i] == "test" and fold[i] == k]
        scores["segmented, direct-only"] += [piece_max(g0, i) for i in te]
        scores["segmented (MIL on pieces)"] += [piece_max(gs, i) for i in te]
        scores["direct-only, mean"] += list(g0(X[te]))
        scores["+ wrapped train, mean"] += list(gm(X[te]))
        scores["window max (MIL)"] += [float(gw(wins[i]).max()) for i in te]
        truth += list(y[te])
    n, n_h = len(truth), sum(truth)
    print(f"wrapped test rows of held-out families: {n} ({n_h} harmful); layer {a.layer}, W={a.window}")
    for name, s in scores.items():
        print(f"  AUROC harmful vs benign, {name}: {roc_auc_score(truth, s):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
