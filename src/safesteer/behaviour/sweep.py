"""The behaviour study's validation steps: ``sweep`` (validation answers unsteered and per (strategy, α),
each candidate kept on its own step) and ``choose`` (every candidate policy on validation, pure: the
chosen conditional and unconditional ones). See :mod:`safesteer.behaviour.steps` for the steps before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from safesteer import layout
from safesteer.behaviour import policy as pol
from safesteer.behaviour.attacks import budget_mask, direct_rows, held_out_flags, is_attack_group
from safesteer.behaviour.checkpoint import step_key
from safesteer.behaviour.context import Run, per_group
from safesteer.behaviour.steps import NOT_QA, Directions, Features, GateFit
from safesteer.errors import SafesteerError
from safesteer.evaluate.refusal import answer_nll, generate
from safesteer.io import atomic_path
from safesteer.steering.condition import threshold_for_fpr


# --------------------------------------------------------------------------------------------- sweep
@dataclass
class Sweep:
    rows: dict[str, list[int]]  # harmful / safe (the budget) / qa validation rows
    base: dict[str, np.ndarray]  # unsteered refusal flags (harmful, safe) and harmless NLL
    steered: dict[tuple[str, float], dict[str, np.ndarray]]  # the same per (strategy, α)
    thresholds: dict[float, float]  # FPR → gate threshold on the calibration pool
    n_harmless: int  # harmless rows of the calibration pool
    key: str
    flags: dict[float, dict[str, np.ndarray]]  # per FPR: the rows of each set the gate flags (val_flags)


def val_flags(
    run: Run, P: Any, g: GateFit, rows: dict[str, list[int]], thresholds: dict[float, float]
) -> dict[float, dict[str, np.ndarray]]:
    """Per FPR, the validation rows of each set the gate flags: direct ones by their calibration scores,
    wrapped ones by the gate that never saw their family (:func:`attacks.held_out_flags`: the rule the
    test's family figures follow, so validation does not credit the deployed gate with having seen it)."""
    per = {
        k: held_out_flags(
            g.cal_scores, thresholds, P.group, v, g.fold_scores, g.fold_thresholds, run.cfg.family_folds
        )
        for k, v in rows.items()
    }
    return {fpr: {k: per[k][fpr] for k in rows} for fpr in thresholds}


def sweep_step(strategy: str, alpha: float) -> str:
    """The kept step of one strategy's steered answers at one α (named by both: a new α or strategy in
    the grid leaves the others' files where they are)."""
    return f"sweep_{strategy}_a{float(alpha):g}"


def sweep(run: Run, f: Features, g: GateFit, d: Directions) -> Sweep:
    cfg, P, bb = run.cfg, f.prompts, run.bb
    key0 = step_key(run.base_key, "sweep", f.key, g.key, d.key)
    # steered answers where the gate flags; a wrapped val row is flagged by the gate that never saw its family
    key = key0 if g.fold_scores is None else step_key(key0, "wrapped rows: held-out family flags")
    # the gain is counted on direct harmful requests and, beside them, on wrapped ones and conversations
    vh = per_group(P, "val", 1, cfg.n_val_harmful, lambda g: not is_attack_group(g))
    vh += per_group(P, "val", 1, cfg.n_val_harmful, is_attack_group)
    # the over-refusal and fluency budget is checked on the look-alike harmless prompts of
    # cfg.budget_groups (XSTest safe: the population of the test figures; the contrast set's benign
    # twins would dilute it with easier prompts and make validation promise less than test shows):
    # their val rows and their train rows with cross-fitted scores, so the threshold and the budget
    # are judged on 134 prompts, not 34
    # (wrapped and conversation rows: val only — a cross-fitted train row's fold gate may have seen its
    # request in another wrapper)
    direct = np.arange(len(P)) < direct_rows(P)
    cal = P.mask("val") | (P.mask("train") & ~P.aug & direct & np.isfinite(g.cal_scores))
    vs = [int(i) for i in np.flatnonzero(cal & budget_mask(P, cfg.budget_groups))]
    if not vs:
        raise SafesteerError(
            f"no validation prompts of the budget groups {list(cfg.budget_groups)}; "
            f"pick groups the gate data has ({', '.join(dict.fromkeys(P.group))})"
        )
    vq = per_group(P, "val", 0, int(P.mask("val", harmful=0).sum()))  # every val harmless row, round-robin
    vq = [i for i in vq if P.group[i] not in NOT_QA and not is_attack_group(P.group[i])][: cfg.n_qa]
    rows = {"harmful": vh, "safe": vs, "qa": vq}
    texts = {k: [P.text[i] for i in v] for k, v in rows.items()}  # what the gate and the judge read
    inputs = {k: P.inputs(v) for k, v in rows.items()}  # what the model answers (a conversation, or text)
    neg = cal & (P.harmful == 0)
    thresholds = {fpr: threshold_for_fpr(g.cal_scores[neg], fpr) for fpr in cfg.fprs}
    flags = val_flags(run, P, g, rows, thresholds)
    harmless = inputs["safe"] + inputs["qa"]

    def base_answers():
        ans = {k: generate(bb, v, cfg.max_new_tokens, cfg.batch_size) for k, v in inputs.items()}
        harmless_ans = ans["safe"].texts + ans["qa"].texts
        return {
            "harmful": run.judge(texts["harmful"], ans["harmful"].texts),
            "safe": run.judge(texts["safe"], ans["safe"].texts),
            "nll": answer_nll(bb, harmless, harmless_ans, cfg.batch_size),
            "harmless_answers": harmless_ans,
        }

    base = run.cached(
        "sweep_base",
        step_key(key0, "base"),
        base_answers,
        lambda b: (
            {"harmless_answers": b["harmless_answers"]},
            {k: b[k] for k in ("harmful", "safe", "nll")},
        ),
        lambda data, arrays: {**arrays, "harmless_answers": data["harmless_answers"]},
    )
    harmless_ans = base.pop("harmless_answers")
    # a conditional policy steers only what the gate flags, and its loosest threshold flags a superset
    # of every other: only those prompts need steered answers (all of them for unconditional policies)
    need = {
        k: np.ones(len(v), dtype=bool)
        if cfg.sweep_unconditional
        else np.any([fl[k] for fl in flags.values()], axis=0)
        for k, v in rows.items()
    }
    need_h = np.concatenate([need["safe"], need["qa"]])
    steered: dict[tuple[str, float], dict[str, np.ndarray]] = {}
    for name in d.dirs.names():
        for a in cfg.alphas:

            def one(name: str = name, a: float = a) -> dict[str, np.ndarray]:
                got: dict[str, np.ndarray] = {}
                with run.intervention(d.dirs, d.scale, name, a).apply(bb):
                    for k in ("harmful", "safe"):
                        sub = [x for x, n in zip(texts[k], need[k]) if n]
                        sub_in = [x for x, n in zip(inputs[k], need[k]) if n]
                        got[k] = base[k].astype(np.float64).copy()
                        if sub:
                            got[k][need[k]] = run.judge(
                                sub, generate(bb, sub_in, cfg.max_new_tokens, cfg.batch_size).texts
                            )
                    got["nll"] = np.asarray(base["nll"], dtype=np.float64).copy()
                    if need_h.any():
                        got["nll"][need_h] = answer_nll(
                            bb,
                            [x for x, n in zip(harmless, need_h) if n],
                            [x for x, n in zip(harmless_ans, need_h) if n],
                            cfg.batch_size,
                        )
                run.say(
                    f"val {name} α={a}: harmful refusal {got['harmful'].mean():.2f}, safe "
                    f"{got['safe'].mean():.2f} "
                    f"({'every prompt' if cfg.sweep_unconditional else 'gate-flagged prompts'} steered: "
                    f"{int(need['harmful'].sum())}/{len(need['harmful'])} harmful, "
                    f"{int(need_h.sum())}/{len(need_h)} harmless)"
                )
                return got

            steered[(name, a)] = run.cached(
                sweep_step(name, a),
                step_key(key, name, a, cfg.steer_positions),  # the base key leaves them out (STEER_ONLY)
                one,
                lambda got: ({}, got),
                lambda _, arrays: dict(arrays),
            )
    return Sweep(rows, base, steered, thresholds, int(neg.sum()), key, flags)


# -------------------------------------------------------------------------------------------- choose
@dataclass
class Choice:
    candidates: list[pol.Candidate]
    conditional: pol.Candidate | None
    unconditional: pol.Candidate | None


def choose(run: Run, g: GateFit, s: Sweep) -> Choice:
    """Every candidate policy on validation (``pareto.csv``) and the chosen ones (pure; no model)."""
    cfg = run.cfg
    flags = {
        fpr: {"harmful": fl["harmful"], "safe": fl["safe"], "nll": np.concatenate([fl["safe"], fl["qa"]])}
        for fpr, fl in s.flags.items()
    }
    cands = pol.candidates(
        s.base,
        s.steered,
        None,
        s.thresholds,
        cfg.max_safe_pp,
        cfg.max_fluency_rel,
        unconditional=cfg.sweep_unconditional,
        flags=flags,
    )
    best_c, best_u = pol.select(cands, True), pol.select(cands, False)
    if best_u is None and best_c is not None and not cfg.sweep_unconditional:
        best_u = pol.ungated(best_c)  # the contrast: the chosen steering applied to every prompt
    with atomic_path(run.out / layout.PARETO_CSV) as tmp:
        pd.DataFrame([c.as_dict() for c in cands]).to_csv(tmp, index=False)
    run.say(f"chosen conditional: {best_c}\nchosen unconditional: {best_u}")
    return Choice(cands, best_c, best_u)
