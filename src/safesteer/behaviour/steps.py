"""The named steps of the behaviour study, each a function of a :class:`Run` and the outputs of
the steps before it (small typed dataclasses), each output kept under ``steps/`` with a key of its
inputs (:mod:`safesteer.behaviour.checkpoint`) so a killed study resumes where it was.

``features`` → [``pieces`` →] ``fit_gate`` → ``directions`` → ``sweep`` → ``choose`` → ``test`` → ``verify``:

* ``features``: pooled residuals of every gate prompt at the gate position and ``prompt_end``, at
  the gate layers and the steering layer, in one pass (also written to ``features/``);
* ``pieces`` (``gate_segments`` only; :mod:`safesteer.behaviour.segments`): each prompt's pieces
  read alone, pooled at the gate position and layers;
* ``fit_gate``: one gate per gate layer; the best validation AUROC (harmful vs XSTest safe, the
  hard negatives) wins; its held-out, leave-one-dataset-out and paraphrase-pair metrics, and the
  cross-fitted calibration scores of the train rows;
* ``directions``: ``refusal_caa`` and ``refusal_dim`` at the steering layer (+ the pipeline's
  directions), and the median residual norm that scales α;
* ``sweep`` and ``choose`` (:mod:`safesteer.behaviour.sweep`): validation answers unsteered and per
  (strategy, α), each candidate kept on its own; every candidate policy on validation and the chosen
  conditional / unconditional one;
* ``test``: test answers, forced-choice P(Yes) and harmless fluency with paired 95% CIs, and the
  chosen policy read in-pass for P(Yes) and the fluency check;
* ``verify``: the real conditional run on a test subset against the recombined answers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safesteer import layout
from safesteer.behaviour.attacks import (
    CHAT_TURNS,
    LOOKALIKES,
    LOOKALIKES_HELDOUT,
    add_attack_rows,
    direct_rows,
    family_fold_scores,
)
from safesteer.behaviour.checkpoint import step_key
from safesteer.behaviour.config import GATE_ONLY
from safesteer.behaviour.context import Run, StaleStep, per_group
from safesteer.behaviour.directions import median_norm, refusal_caa, refusal_dim_from_features
from safesteer.behaviour.gate import auroc, cross_fit_scores, gate_report, lodo, train_gate
from safesteer.behaviour.pairs import PairResult, paraphrase_pairs, score_pairs
from safesteer.behaviour.prompts import Prompts, load_prompts
from safesteer.behaviour.segments import Pieces, with_pieces
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, load_npy, save_npy, sha256_file
from safesteer.models.positions import pooled_at
from safesteer.steering.condition import Condition, threshold_for_fpr
from safesteer.steering.gates import gate_kind, stack_features
from safesteer.steering.segments import segment_max
from safesteer.steering.strategies import DirectionSet

SETS = ("harmful", "safe", "qa")
NOT_QA = ("xstest_safe", "contrast_safe", LOOKALIKES, LOOKALIKES_HELDOUT, CHAT_TURNS)
"""Harmless groups kept out of the fluency rows (look-alikes of harm, and turns with nothing to answer)."""


# ------------------------------------------------------------------------------------------ features
@dataclass
class Features:
    prompts: Prompts
    layers: list[int]
    gate: dict[int, np.ndarray]  # at cfg.gate_position, per layer
    end: dict[int, np.ndarray]  # at prompt_end (Arditi's refusal_dim reads there), per layer
    key: str


def features(run: Run) -> Features:
    cfg = run.cfg
    if cfg.gate_position not in ("prompt", "prompt_end"):
        raise SafesteerError(
            f"behaviour gate_position '{cfg.gate_position}' unsupported; valid choices: prompt, prompt_end"
        )
    layers = sorted({*cfg.gate_layers, run.layer})
    key = step_key(run.base_key, "features")
    positions = list(dict.fromkeys((cfg.gate_position, "prompt_end")))

    def compute() -> Features:
        t = time.perf_counter()
        P = load_prompts(cfg.caps(), data_dir=run.data_dir, augment=cfg.augment, wide=cfg.augment_wide)
        if cfg.attacks:
            P = add_attack_rows(
                P,
                run.data_dir,
                cfg.families,
                dict(zip(("train", "val", "test"), cfg.n_wrap)),
                dict(zip(("train", "val", "test"), cfg.n_conv)),
                cfg.family_max_chars,
                cfg.gate_window,
            )
        feats = pooled_at(
            run.bb, P.text, layers, (cfg.gate_position, "prompt_end"), batch_size=cfg.batch_size
        )
        for p, per in feats.items():  # kept so the gate can be retrained without another forward pass
            for l in layers:
                save_npy(run.out / layout.FEATURES_DIR / f"{p}_layer{l:02d}.npy", per[l].astype(np.float32))
        cols = {"text": P.text, "harmful": P.harmful, "group": P.group, "split": P.split}
        cols.update({"aug": P.aug, "origin": P.origin})
        if any(c is not None for c in P.chats or ()):  # the conversation each row's model input is
            cols["chat"] = [None if c is None else json.dumps(c, ensure_ascii=False) for c in P.chats or ()]
        with atomic_path(run.out / layout.FEATURES_DIR / "prompts.csv") as tmp:
            pd.DataFrame(cols).to_csv(tmp, index=False)
        run.say(
            f"{len(P)} prompts, {cfg.gate_position}/prompt_end features at layers {layers} "
            f"in {time.perf_counter() - t:.0f}s"
        )
        return Features(P, layers, feats[cfg.gate_position], feats["prompt_end"], key)

    def vectors(p: str, l: int) -> Path:  # the stage's features/ files hold the vectors: not kept twice
        return run.out / layout.FEATURES_DIR / f"{p}_layer{l:02d}.npy"

    def save(f: Features):
        P = f.prompts
        files = {vectors(p, l).name: sha256_file(vectors(p, l)) for p in positions for l in f.layers}
        data = {"text": P.text, "group": P.group, "split": P.split, "layers": f.layers, "sha256": files}
        if any(c is not None for c in P.chats or ()):
            data["chats"] = P.chats
        return data, {"harmful": P.harmful, "aug": P.aug, "origin": P.origin}

    def load(data, arrays) -> Features:
        for name, digest in data["sha256"].items():
            path = run.out / layout.FEATURES_DIR / name
            if not path.is_file() or sha256_file(path) != digest:
                raise StaleStep(f"{name} is missing or changed")
        P = Prompts(
            data["text"],
            arrays["harmful"],
            data["group"],
            data["split"],
            arrays["aug"],
            arrays["origin"],
            data.get("chats"),
        )
        L = [int(l) for l in data["layers"]]
        per = {p: {l: load_npy(vectors(p, l)) for l in L} for p in positions}
        return Features(P, L, per[cfg.gate_position], per["prompt_end"], key)

    return run.cached("features", key, compute, save, load)


# ------------------------------------------------------------------------------------------ fit_gate
def _folds(cfg: Any) -> list[str]:
    """The family folds in the keys of the steps that use them (the default, 2, keeps the older keys)."""
    return [f"family_folds={cfg.family_folds}"] if cfg.family_folds != 2 else []


@dataclass
class GateFit:
    layer: int  # the deepest layer the gate reads
    gate: Condition
    val_auroc: dict[Any, float]  # per candidate (a gate layer, or "l1+l2+…" for a gate reading them together)
    report: dict[str, Any]
    lodo: dict[str, Any]
    pairs: PairResult
    dev_pairs: PairResult
    scores: np.ndarray  # every prompt's score by the deployed gate
    cal_scores: np.ndarray  # cross-fitted on train rows, the gate's own on val (NaN elsewhere)
    key: str
    # wrapped rows scored by a gate that never saw their family's fold (NaN elsewhere), and its
    # thresholds per FPR (attacks.family_fold_scores); empty without attack rows
    fold_scores: np.ndarray | None = None
    fold_thresholds: dict[int, dict[float, float]] | None = None


def fit_gate(run: Run, f: Features, pc: Pieces | None = None) -> GateFit:
    cfg, P = run.cfg, f.prompts
    gate_settings = {k: getattr(cfg, k) for k in GATE_ONLY}  # the base key leaves them out
    key = step_key(
        run.base_key, "fit_gate", gate_settings, f.key, *([pc.key] if pc is not None else []), *_folds(cfg)
    )

    kind = cfg.gate_kind or None
    together = kind is not None and gate_kind(kind).reads_layers_together
    # one gate per gate layer (keyed by the layer), or one reading them all side by side (keyed "l1+l2+…")
    groups = {"+".join(map(str, cfg.gate_layers)): tuple(cfg.gate_layers)} if together else None
    options = {"inner": "mlp" if cfg.gate_hidden else "linear"} if together else None

    def compute() -> GateFit:
        va = P.mask("val")
        hard = va & (P.mask(harmful=1) | P.mask(group="xstest_safe"))
        reads = groups or {l: (l,) for l in cfg.gate_layers}
        feats = {k: stack_features(f.gate, ls) for k, ls in reads.items()}

        def train(k: Any, H: np.ndarray, rows: Prompts) -> Condition:
            ls = reads[k]
            return train_gate(
                H,
                rows,
                ls[0] if len(ls) == 1 else ls,
                cfg.gate_position,
                target_fpr=0.05,
                seed=run.seed,
                hidden=cfg.gate_hidden,
                members=cfg.gate_members,
                mlp_alpha=cfg.gate_mlp_alpha,
                kind=kind,
                options=options,
            )

        gates = {k: train(k, feats[k], P) for k in reads}
        # the segmented gate: the whole-prompt gate picks each harmful train prompt's piece, then the
        # gate is fitted again with the pieces as extra rows (behaviour.segments)
        pf = {k: stack_features(pc.gate, ls) for k, ls in reads.items()} if pc is not None else {}
        ext = {k: with_pieces(P, feats[k], pc.text, pc.owner, pf[k], gates[k].score(pf[k])) for k in pf}
        if pc is not None:
            gates = {k: train(k, ext[k][1], ext[k][0]) for k in reads}
            for g in gates.values():
                g.meta["segments"] = True
        scored = {  # the segmented score: the largest of the prompt's own and its pieces'
            k: segment_max(g.score(feats[k]), g.score(pf[k]), pc.owner)
            if pc is not None
            else g.score(feats[k])
            for k, g in gates.items()
        }
        val_auc = {k: float(auroc(scored[k][hard], P.harmful[hard])) for k in gates}
        gl = max(val_auc, key=lambda k: (val_auc[k], -max(reads[k])))
        gate, H = gates[gl], feats[gl]
        Px, Hx = ext[gl] if pc is not None else (P, H)
        pieces_of = (pf[gl], pc.owner) if pc is not None else None
        report = gate_report(gate, H, P)
        if pc is not None:  # gate_report reads whole prompts; the segmented gate's own, beside it
            # its own threshold at the target FPR on the harmless val rows, as it scores them
            gate.threshold = threshold_for_fpr(scored[gl][P.mask("val", harmful=0)], gate.meta["target_fpr"])
            te = P.mask("test")
            report["test_auroc_segmented"] = auroc(scored[gl][te], P.harmful[te])
        n0 = direct_rows(P)  # leave-one-dataset-out over the request sources (wrapped copies aside)
        lodo_res = lodo(H[:n0], P.head(n0), seed=run.seed, model=gate.meta)
        pairs = score_pairs(run.bb, gate)
        dev_pairs = score_pairs(run.bb, gate, paraphrase_pairs("dev"))  # phrasing robustness beside test
        gate.save(run.out / layout.GATE_DIR)
        run.say(
            f"gate layer {gl} (val AUROC vs XSTest-safe {val_auc}): test AUROC {report['test_auroc']:.3f}, "
            f"LODO min {min(v['auroc'] for v in lodo_res.values()):.3f}, pairs same side "
            f"{pairs.same_side:.2f} (dev pairs {dev_pairs.same_side:.2f})"
        )
        # calibration: each train row scored by a gate that did not see it (cross_fit_scores)
        n = len(P)
        cal = cross_fit_scores(gate, Hx, Px, cfg.calib_folds, run.seed, pieces=pieces_of)[:n]
        folds = (
            family_fold_scores(gate, Hx, Px, cfg.fprs, run.seed, pieces=pieces_of, folds=cfg.family_folds)
            if n0 < n
            else (None, None)
        )
        folds = (None if folds[0] is None else folds[0][:n], folds[1])
        return GateFit(
            gate.layer, gate, val_auc, report, lodo_res, pairs, dev_pairs, scored[gl], cal, key, *folds
        )

    def save(g: GateFit):
        data = {
            "layer": g.layer,
            "val_auroc": [[k, v] for k, v in g.val_auroc.items()],
            "report": g.report,
            "lodo": g.lodo,
            "pairs": [g.pairs.pairs, g.pairs.threshold],
            "dev_pairs": [g.dev_pairs.pairs, g.dev_pairs.threshold],
        }
        arrays = {"scores": g.scores, "cal_scores": g.cal_scores}
        if g.fold_scores is not None:
            arrays["fold_scores"] = g.fold_scores
            data["fold_thresholds"] = {
                str(k): [[f, t] for f, t in v.items()] for k, v in g.fold_thresholds.items()
            }
        return data, arrays

    def load(data, arrays) -> GateFit:
        gate = Condition.load(run.out / layout.GATE_DIR)
        return GateFit(
            int(data["layer"]),
            gate,
            {k: float(v) for k, v in data["val_auroc"]},
            data["report"],
            data["lodo"],
            PairResult(*data["pairs"]),
            PairResult(*data["dev_pairs"]),
            arrays["scores"],
            arrays["cal_scores"],
            key,
            arrays.get("fold_scores"),
            {int(k): {float(f): float(t) for f, t in v} for k, v in data["fold_thresholds"].items()}
            if "fold_thresholds" in data
            else None,
        )

    return run.cached("fit_gate", key, compute, save, load)


# ---------------------------------------------------------------------------------------- directions
@dataclass
class Directions:
    dirs: DirectionSet
    scale: float  # the median residual norm at the steering layer (α is a multiple of it)
    key: str


def directions(run: Run, f: Features) -> Directions:
    cfg, P, L = run.cfg, f.prompts, run.layer
    key = step_key(run.base_key, "directions", f.key)

    def compute() -> Directions:
        tr = P.mask("train")
        half = cfg.n_caa_prompts // 2
        caa_prompts = [P.text[i] for i in per_group(P, "train", 1, half) + per_group(P, "train", 0, half)]
        dirs = DirectionSet()
        if "refusal_caa" in cfg.strategies:
            dirs.add(refusal_caa(run.bb, caa_prompts, L, batch_size=cfg.batch_size))
        if "refusal_dim" in cfg.strategies:
            dirs.add(
                refusal_dim_from_features(f.end[L][tr & (P.harmful == 1)], f.end[L][tr & (P.harmful == 0)], L)
            )
        for name in cfg.strategies:
            if name in ("refusal_caa", "refusal_dim"):
                continue
            extra = run.extra_directions
            if extra is None or name not in extra:
                known = ", ".join(
                    ["refusal_caa", "refusal_dim", *(extra.names() if extra is not None else [])]
                )
                raise SafesteerError(f"unknown behaviour strategy '{name}'; valid choices here: {known}")
            if extra[name].layer != L:
                raise SafesteerError(
                    f"direction '{name}' was built for layer {extra[name].layer}, the behaviour study "
                    f"steers layer {L}"
                )
            dirs.add(extra[name])
        dirs.save(run.out / layout.DIRECTIONS_DIR)
        scale = median_norm(run.bb, caa_prompts, L)
        run.say(f"directions {dirs.names()}, median residual norm at layer {L} = {scale:.1f}")
        return Directions(dirs, scale, key)

    return run.cached(
        "directions",
        key,
        compute,
        lambda d: ({"scale": d.scale}, None),
        lambda data, _: Directions(
            DirectionSet.load(run.out / layout.DIRECTIONS_DIR), float(data["scale"]), key
        ),
    )
