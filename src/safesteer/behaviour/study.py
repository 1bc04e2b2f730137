"""The behaviour-steering study on a causal LM: harm gate, refusal directions, calibrated
conditional policy, judged by generated answers (``python -m safesteer.behaviour.study``).

Steps (each a library call the pipeline can reuse): prompts with hash splits
(:func:`~safesteer.behaviour.gate.load_prompts`) → prompt_end features of every prompt at the gate
layers and the steering layer in one pass → gate per layer (held-out, leave-one-dataset-out,
paraphrase pairs) → ``refusal_caa`` and ``refusal_dim`` at the steering layer → validation
answers unsteered and per (strategy, α) → policy choice (:mod:`safesteer.behaviour.policy`) →
test answers, forced-choice P(Yes) and harmless fluency with paired 95% CIs; the recommended
conditional policy is also run for real through :func:`~safesteer.steering.condition.conditional`
on a test subset and compared with the recombined answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from safesteer.behaviour.pairs import pair_line
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, write_json


@dataclass
class StudyConfig:
    model: str = "smollm2-135m"
    layer: int = 15
    gate_layers: tuple[int, ...] = (12, 15)
    gate_position: str = "prompt"
    """Where the gate reads (``prompt``: the user message + template tail; ``prompt_end``: the tail only)."""
    gate_hidden: int = 128
    """ReLU units per MLP member of the gate (:func:`~safesteer.behaviour.gate.fit_mlp`); 0: a linear probe."""
    gate_members: int = 3
    gate_mlp_alpha: float = 1.0
    steer_positions: str = "prompt"
    """Where the policies steer: ``prompt`` (the prompt's positions; the answer is generated unsteered on
    the steered context) or ``all`` (every position, also each generated token)."""
    budget_groups: tuple[str, ...] = ("xstest_safe",)
    """The look-alike harmless sources whose validation (+ cross-fitted train) rows judge the over-refusal
    and fluency budget: the same population as the test figures they stand for."""
    alphas: tuple[float, ...] = (0.2, 0.3)
    fprs: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)
    strategies: tuple[str, ...] = ("refusal_caa", "refusal_dim")
    caps: dict[str, int] = field(
        default_factory=lambda: {
            "advbench": 1000,
            "donotanswer": 1000,
            **{
                q: 150
                for q in (
                    "nq_open",
                    "truthfulqa",
                    "healthsearchqa",
                    "liveqa",
                    "medicationqa",
                    "commonsenseqa",
                )
            },
        }
    )
    augment: bool = True
    """Reframed copies of the gate's training prompts (imperative ↔ question), see ``steering.reframe``."""
    augment_wide: bool = False
    """A second reframed copy of each from the wide bank of frames (``steering.reframe.reframe_wide``).
    Alone it leaves the gate's phrasing robustness as it is (dev pairs, four seeds); with a gate that
    reads layers 9, 12 and 15 side by side it raised it (README, "Behaviour steering")."""
    calib_folds: int = 5
    """Hash folds for cross-fitted gate scores of the train rows (:func:`~safesteer.behaviour.gate.cross_fit_scores`),
    which join the val rows for the threshold and the over-refusal budget; 0 = val rows only."""
    sweep_unconditional: bool = False
    """Steer every validation prompt per (strategy, α), so that unconditional policies are chosen on
    validation too; off: only the gate-flagged ones (3× faster), and the unconditional contrast on test
    is the chosen conditional policy's steering applied to every prompt."""
    n_val_harmful: int = 40
    n_test_harmful: int = 104
    n_qa: int = 24
    n_caa_prompts: int = 16
    n_verify: int = 32
    max_new_tokens: int = 16
    batch_size: int = 32
    max_safe_pp: float = 3.0
    max_fluency_rel: float = 0.02
    seed: int = 0
    data_dir: str | None = None
    threads: int | None = None
    """torch CPU threads (None: leave as set). On a busy shared CPU one thread is ~10× faster than two."""


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def _per_group(prompts, split: str, harmful: int, n: int) -> list[int]:
    """Up to ``n`` row indices of ``split`` / class, spread evenly over the datasets (hash order)."""
    groups = [
        g
        for g in dict.fromkeys(prompts.group)
        if (prompts.mask(group=g) & (prompts.harmful == harmful)).any()
    ]
    pools = {g: list(np.flatnonzero(prompts.mask(split, g, harmful))) for g in groups}
    out: list[int] = []
    k = 0
    while len(out) < n and any(k < len(p) for p in pools.values()):
        for g in groups:
            if k < len(pools[g]) and len(out) < n:
                out.append(int(pools[g][k]))
        k += 1
    return out


def run_study(
    cfg: StudyConfig, out_dir: str | Path, backbone: Any = None, extra_directions: Any = None
) -> dict[str, Any]:
    """Run every step and write ``summary.json``, ``pareto.csv``, ``answers.csv``, ``gate/``, ``directions/``.

    ``extra_directions`` (a :class:`~safesteer.steering.DirectionSet`, e.g. the pipeline's probe /
    SAE / hybrid directions, oriented so that α ≥ 0 adds refusal) supplies every strategy of
    ``cfg.strategies`` other than ``refusal_caa`` / ``refusal_dim``; they are judged by the same sweep."""
    import pandas as pd
    import torch

    from safesteer.behaviour import policy as pol
    from safesteer.behaviour.directions import median_norm, refusal_caa
    from safesteer.behaviour.gate import cross_fit_scores, gate_report, lodo, train_gate
    from safesteer.behaviour.pairs import paraphrase_pairs, score_pairs
    from safesteer.behaviour.prompts import load_prompts
    from safesteer.evaluate.choice import forced_choice
    from safesteer.evaluate.refusal import PhraseJudge, agreement, answer_nll, coherence, generate
    from safesteer.models import load_backbone
    from safesteer.steering.condition import conditional, threshold_for_fpr
    from safesteer.steering.strategies import Direction, DirectionSet, Intervention, unit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    bb = backbone or load_backbone(cfg.model)
    if bb.kind != "causal":
        raise SafesteerError("the behaviour study generates answers; it needs a causal LM")
    judge = PhraseJudge()

    # 1. prompts and features -------------------------------------------------------------------
    t = time.perf_counter()
    P = load_prompts(cfg.caps, data_dir=cfg.data_dir, augment=cfg.augment, wide=cfg.augment_wide)
    layers = sorted({*cfg.gate_layers, cfg.layer})
    from safesteer.models.positions import pooled_at

    if cfg.gate_position not in ("prompt", "prompt_end"):
        raise SafesteerError(
            f"behaviour gate_position '{cfg.gate_position}' unsupported; valid choices: prompt, prompt_end"
        )
    feats = pooled_at(bb, P.text, layers, (cfg.gate_position, "prompt_end"), batch_size=cfg.batch_size)
    H, H_end = (
        feats[cfg.gate_position],
        feats["prompt_end"],
    )  # gate features; Arditi's refusal_dim reads prompt_end
    times["features"] = time.perf_counter() - t
    from safesteer.io import save_npy

    for p, per in feats.items():  # kept so the gate can be retrained without another forward pass
        for l in layers:
            save_npy(out / "features" / f"{p}_layer{l:02d}.npy", per[l].astype(np.float32))
    with atomic_path(out / "features" / "prompts.csv") as tmp:
        pd.DataFrame(
            {
                "text": P.text,
                "harmful": P.harmful,
                "group": P.group,
                "split": P.split,
                "aug": P.aug,
                "origin": P.origin,
            }
        ).to_csv(tmp, index=False)
    _say(
        f"{len(P)} prompts, {cfg.gate_position}/prompt_end features at layers {layers} in {times['features']:.0f}s"
    )

    # 2. gate per layer; the best validation AUROC (harmful vs XSTest-safe, the hard negatives) wins
    t = time.perf_counter()
    va = P.mask("val")
    hard = va & (P.mask(harmful=1) | P.mask(group="xstest_safe"))
    gates = {
        l: train_gate(
            H[l],
            P,
            l,
            cfg.gate_position,
            target_fpr=0.05,
            seed=cfg.seed,
            hidden=cfg.gate_hidden,
            members=cfg.gate_members,
            mlp_alpha=cfg.gate_mlp_alpha,
        )
        for l in cfg.gate_layers
    }
    val_auc = {l: float(pol_auc(g.score(H[l][hard]), P.harmful[hard])) for l, g in gates.items()}
    gl = max(val_auc, key=lambda l: (val_auc[l], -l))
    gate = gates[gl]
    report = gate_report(gate, H[gl], P)
    lodo_res = lodo(H[gl], P, seed=cfg.seed, model=gate.meta)
    pairs = score_pairs(bb, gate)
    dev_pairs = score_pairs(
        bb, gate, paraphrase_pairs("dev")
    )  # other requests and frames: phrasing robustness beside test
    gate.save(out / "gate")
    times["gate"] = time.perf_counter() - t
    _say(
        f"gate layer {gl} (val AUROC vs XSTest-safe {val_auc}): test AUROC {report['test_auroc']:.3f}, "
        f"LODO min {min(v['auroc'] for v in lodo_res.values()):.3f}, pairs same side {pairs.same_side:.2f} "
        f"(dev pairs {dev_pairs.same_side:.2f})"
    )

    # 3. directions ------------------------------------------------------------------------------
    t = time.perf_counter()
    L = cfg.layer
    tr = P.mask("train")
    caa_prompts = [
        P.text[i]
        for i in _per_group(P, "train", 1, cfg.n_caa_prompts // 2)
        + _per_group(P, "train", 0, cfg.n_caa_prompts // 2)
    ]
    dirs = DirectionSet()
    if "refusal_caa" in cfg.strategies:
        dirs.add(refusal_caa(bb, caa_prompts, L, batch_size=cfg.batch_size))
    if "refusal_dim" in cfg.strategies:
        r = H_end[L][tr & (P.harmful == 1)].astype(np.float64).mean(0) - H_end[L][
            tr & (P.harmful == 0)
        ].astype(np.float64).mean(0)
        dirs.add(
            Direction(
                "refusal_dim",
                -unit(r),
                "behaviour",
                L,
                ["dim:prompt_end DiffMean"],
                meta={
                    "position": "prompt_end",
                    "norm": float(np.linalg.norm(r)),
                    "sign": "vector = -(harmful - harmless)/norm; alpha >= 0 adds refusal",
                },
            )
        )
    for name in cfg.strategies:
        if name in ("refusal_caa", "refusal_dim"):
            continue
        if extra_directions is None or name not in extra_directions:
            known = ", ".join(
                [
                    "refusal_caa",
                    "refusal_dim",
                    *(extra_directions.names() if extra_directions is not None else []),
                ]
            )
            raise SafesteerError(f"unknown behaviour strategy '{name}'; valid choices here: {known}")
        d = extra_directions[name]
        if d.layer != L:
            raise SafesteerError(
                f"direction '{name}' was built for layer {d.layer}, the behaviour study steers layer {L}"
            )
        dirs.add(d)
    dirs.save(out / "directions")
    scale = median_norm(bb, caa_prompts, L)
    times["directions"] = time.perf_counter() - t
    _say(f"directions {dirs.names()}, median residual norm at layer {L} = {scale:.1f}")

    def iv(name: str, alpha: float) -> Intervention:
        return Intervention.from_direction(dirs[name], alpha, scale, where=cfg.steer_positions)

    # 4. validation sweep ------------------------------------------------------------------------
    t = time.perf_counter()
    vh = _per_group(P, "val", 1, cfg.n_val_harmful)
    # the over-refusal and fluency budget is checked on the look-alike harmless prompts of
    # cfg.budget_groups (XSTest safe: the population of the test figures; the contrast set's benign
    # twins would dilute it with easier prompts and make validation promise less than test shows):
    # their val rows and their train rows with cross-fitted scores (cross_fit_scores: each scored by a
    # gate that did not see it), so the threshold and the budget are judged on 134 prompts, not 34
    scores_all = gate.score(H[gl])
    cal_scores = cross_fit_scores(gate, H[gl], P, cfg.calib_folds, cfg.seed)
    cal = P.mask("val") | (P.mask("train") & ~P.aug & np.isfinite(cal_scores))
    vs = [int(i) for g in cfg.budget_groups for i in np.flatnonzero(cal & P.mask(group=g))]
    if not vs:
        raise SafesteerError(
            f"no validation prompts of the budget groups {list(cfg.budget_groups)}; "
            f"pick groups the gate data has ({', '.join(dict.fromkeys(P.group))})"
        )
    vq = _per_group(
        P, "val", 0, int(P.mask("val", harmful=0).sum())
    )  # every val harmless row, round-robin over sources
    vq = [i for i in vq if P.group[i] not in ("xstest_safe", "contrast_safe")][: cfg.n_qa]
    sets = {"harmful": vh, "safe": vs, "qa": vq}
    texts = {k: [P.text[i] for i in v] for k, v in sets.items()}

    base_val = {k: generate(bb, v, cfg.max_new_tokens, cfg.batch_size) for k, v in texts.items()}
    harmless_val = texts["safe"] + texts["qa"]
    harmless_val_ans = base_val["safe"].texts + base_val["qa"].texts
    base_nll_val = answer_nll(bb, harmless_val, harmless_val_ans, cfg.batch_size)
    base = {
        "harmful": judge(texts["harmful"], base_val["harmful"].texts),
        "safe": judge(texts["safe"], base_val["safe"].texts),
        "nll": base_nll_val,
    }
    neg_val = cal & (P.harmful == 0)
    thresholds = {f: threshold_for_fpr(cal_scores[neg_val], f) for f in cfg.fprs}
    vsc = {"harmful": cal_scores[vh], "safe": cal_scores[vs], "qa": cal_scores[vq]}
    # a conditional policy steers only what the gate flags, and its loosest threshold flags a superset
    # of every other: only those prompts need steered answers (all of them for unconditional policies)
    t_lo = min(thresholds.values())
    need = {k: np.ones(len(v), dtype=bool) if cfg.sweep_unconditional else v > t_lo for k, v in vsc.items()}
    need_h = np.concatenate([need["safe"], need["qa"]])
    steered: dict[tuple[str, float], dict[str, np.ndarray]] = {}
    for name in dirs.names():
        for a in cfg.alphas:
            got: dict[str, np.ndarray] = {}
            with iv(name, a).apply(bb):
                for k in ("harmful", "safe"):
                    sub = [x for x, n in zip(texts[k], need[k]) if n]
                    got[k] = base[k].astype(np.float64).copy()
                    if sub:
                        got[k][need[k]] = judge(
                            sub, generate(bb, sub, cfg.max_new_tokens, cfg.batch_size).texts
                        )
                got["nll"] = np.asarray(base_nll_val, dtype=np.float64).copy()
                if need_h.any():
                    got["nll"][need_h] = answer_nll(
                        bb,
                        [x for x, n in zip(harmless_val, need_h) if n],
                        [x for x, n in zip(harmless_val_ans, need_h) if n],
                        cfg.batch_size,
                    )
            steered[(name, a)] = got
            _say(
                f"val {name} α={a}: harmful refusal {got['harmful'].mean():.2f}, safe {got['safe'].mean():.2f} "
                f"({'every prompt' if cfg.sweep_unconditional else 'gate-flagged prompts'} steered: "
                f"{int(need['harmful'].sum())}/{len(need['harmful'])} harmful, {int(need_h.sum())}/{len(need_h)} harmless)"
            )
    vscores = {
        "harmful": cal_scores[vh],
        "safe": cal_scores[vs],
        "nll": np.concatenate([cal_scores[vs], cal_scores[vq]]),
    }
    cands = pol.candidates(
        base,
        steered,
        vscores,
        thresholds,
        cfg.max_safe_pp,
        cfg.max_fluency_rel,
        unconditional=cfg.sweep_unconditional,
    )
    best_c, best_u = pol.select(cands, True), pol.select(cands, False)
    if best_u is None and best_c is not None and not cfg.sweep_unconditional:
        best_u = pol.ungated(best_c)  # the contrast: the chosen steering applied to every prompt
    times["validation"] = time.perf_counter() - t
    with atomic_path(out / "pareto.csv") as tmp:
        pd.DataFrame([c.as_dict() for c in cands]).to_csv(tmp, index=False)
    _say(f"chosen conditional: {best_c}\nchosen unconditional: {best_u}")

    # 5. test -------------------------------------------------------------------------------------
    t = time.perf_counter()
    th = _per_group(P, "test", 1, cfg.n_test_harmful)
    ts = list(np.flatnonzero(P.mask("test", "xstest_safe")))
    tq = [
        i
        for i in _per_group(P, "test", 0, cfg.n_qa + len(ts))
        if P.group[i] not in ("xstest_safe", "contrast_safe")
    ][: cfg.n_qa]
    T = {"harmful": [P.text[i] for i in th], "safe": [P.text[i] for i in ts], "qa": [P.text[i] for i in tq]}
    flags = {"harmful": scores_all[th], "safe": scores_all[ts], "qa": scores_all[tq]}
    base_t = {k: generate(bb, v, cfg.max_new_tokens, cfg.batch_size) for k, v in T.items()}
    harmless_t = T["safe"] + T["qa"]
    harmless_t_ans = base_t["safe"].texts + base_t["qa"].texts
    res: dict[str, Any] = {"unsteered": {k: float(judge(T[k], base_t[k].texts).mean()) for k in T}}
    p_base = forced_choice(bb, T["harmful"], "harmful")
    nll_base = answer_nll(bb, harmless_t, harmless_t_ans, cfg.batch_size)
    rows = [
        {"set": k, "policy": "unsteered", "prompt": p, "answer": a, "refusal": float(judge([p], [a])[0])}
        for k in T
        for p, a in zip(T[k], base_t[k].texts)
    ]
    policies = {"conditional": best_c, "unconditional": best_u}
    steered_test: dict[tuple[str, float], Any] = {}
    for label, c in policies.items():
        if c is None:
            res[label] = None
            continue
        intervention = iv(c.strategy, c.alpha)
        if (
            c.strategy,
            c.alpha,
        ) not in steered_test:  # the ungated contrast reuses the chosen policy's answers
            with intervention.apply(bb):
                steered_test[(c.strategy, c.alpha)] = (
                    {k: generate(bb, T[k], cfg.max_new_tokens, cfg.batch_size) for k in ("harmful", "safe")},
                    forced_choice(bb, T["harmful"], "harmful"),
                    answer_nll(bb, harmless_t, harmless_t_ans, cfg.batch_size),
                )
        st, p_st, nll_st = steered_test[(c.strategy, c.alpha)]
        ref = {k: judge(T[k], st[k].texts) for k in st}
        bref = {k: judge(T[k], base_t[k].texts) for k in st}
        if c.conditional:
            f = {k: flags[k] > c.threshold for k in flags}
            ref = {k: pol.compose(f[k], ref[k], bref[k]) for k in ref}
            answers = {k: [s if g else b for s, b, g in zip(st[k].texts, base_t[k].texts, f[k])] for k in st}
            harmless_flags = np.concatenate([f["safe"], f["qa"]])
            nll_cond = pol.compose(harmless_flags, nll_st, nll_base)
            deployed = gate.with_threshold(c.threshold)
            with conditional(bb, deployed, intervention) as gs:  # gate read in-pass
                p_in = forced_choice(bb, T["harmful"], "harmful")
            p_flag = pol.compose(f["harmful"], p_st, p_base)
            nll_real = _nll_fixed_flags(
                bb, deployed, intervention, harmless_t, harmless_t_ans, harmless_flags, cfg.batch_size
            )
            extra = {
                "gate_flag_rate": {k: float(v.mean()) for k, v in f.items()},
                "p_yes_gate_in_pass": pol.paired(p_base, p_in),
                "in_pass_flag_rate_on_fc_prompts": float(gs.flags.mean()),
                "fluency_real_vs_composed_max_abs": float(np.nanmax(np.abs(nll_real - nll_cond))),
            }
            p_val, nll_val = p_flag, nll_cond
        else:
            answers = {k: st[k].texts for k in st}
            p_val, nll_val, extra = p_st, nll_st, {}
        coh = coherence(bb, T["harmful"] + T["safe"], answers["harmful"] + answers["safe"], cfg.batch_size)
        res[label] = {
            "policy": c.as_dict(),
            "harmful_refusal": pol.paired(bref["harmful"], ref["harmful"]),
            "safe_refusal": pol.paired(bref["safe"], ref["safe"]),
            "p_yes": pol.paired(p_base, p_val),
            "harmless_fluency": pol.relative_change(nll_base, nll_val),
            "coherence": {"mean_nll": coh["mean_nll"], "degenerate_share": coh["degenerate_share"]},
            "agreement_refusal_vs_pyes": agreement(ref["harmful"], p_val),
            **extra,
        }
        rows += [
            {"set": k, "policy": label, "prompt": p, "answer": a, "refusal": float(r)}
            for k in answers
            for p, a, r in zip(T[k], answers[k], ref[k])
        ]
    res["agreement_unsteered"] = agreement(judge(T["harmful"], base_t["harmful"].texts), p_base)
    times["test"] = time.perf_counter() - t

    # 6. the real conditional run on a test subset equals the recombined answers ---------------------
    t = time.perf_counter()
    if best_c is not None and cfg.n_verify:
        sub = T["harmful"][: cfg.n_verify // 2] + T["safe"][: cfg.n_verify // 2]
        with conditional(bb, gate.with_threshold(best_c.threshold), iv(best_c.strategy, best_c.alpha)) as gs:
            real = generate(bb, sub, cfg.max_new_tokens, cfg.batch_size)
        composed = [r["answer"] for r in rows if r["policy"] == "conditional" and r["set"] == "harmful"][
            : cfg.n_verify // 2
        ] + [r["answer"] for r in rows if r["policy"] == "conditional" and r["set"] == "safe"][
            : cfg.n_verify // 2
        ]
        res["verify_conditional"] = {
            "n": len(sub),
            "same_answer": float(np.mean([a == b for a, b in zip(real.texts, composed)])),
            "same_refusal": float(np.mean(judge(sub, real.texts) == judge(sub, composed))),
        }
    times["verify"] = time.perf_counter() - t
    with atomic_path(out / "answers.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    with atomic_path(out / "gate_scores.csv") as tmp:  # the gate's ROC (report) from every prompt's score
        pd.DataFrame(
            {"group": P.group, "split": P.split, "harmful": P.harmful, "aug": P.aug, "score": scores_all}
        ).to_csv(tmp, index=False)
    times["total"] = time.perf_counter() - t_all
    at_policy = (
        None if best_c is None else pairs.at(best_c.threshold)
    )  # the pairs at the deployed gate's threshold too
    dev = {
        "at_gate": dev_pairs.at(),
        "at_policy": None if best_c is None else dev_pairs.at(best_c.threshold),
        "pairs": dev_pairs.pairs,
    }
    summary = {
        "config": asdict(cfg),
        "gate": {
            "layer": gl,
            "position": cfg.gate_position,
            "kind": gate.kind,
            "hidden": int(gate.meta.get("hidden", 0)),
            "members": int(gate.meta.get("members", 1)),
            "val_auroc_vs_xstest_safe": val_auc,
            "threshold": gate.threshold,
            "held_out": report,
            "lodo": lodo_res,
            "lodo_min_auroc": float(min(v["auroc"] for v in lodo_res.values())),
            "pairs_same_side": pairs.same_side,
            "calibration": {
                "folds": cfg.calib_folds,
                "n_harmless": int(neg_val.sum()),
                "n_safe_budget": len(vs),
                "budget_groups": list(cfg.budget_groups),
            },
            "pairs_correct": pairs.correct,
            "pairs_at_gate_threshold": pairs.at(),
            "pairs_at_policy_threshold": at_policy,
            "pairs": pairs.pairs,
            "dev_pairs": dev,
        },
        "directions": {"scale_median_norm": scale, "names": dirs.names()},
        "split_counts": P.counts(),
        "test": res,
        "seconds": times,
        "pareto_val": [c.as_dict() for c in pol.pareto([c for c in cands])],
    }
    write_json(out / "summary.json", summary)
    return summary


def _nll_fixed_flags(
    bb: Any,
    gate: Any,
    intervention: Any,
    prompts: list[str],
    answers: list[str],
    flags: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Answer NLLs under the real conditional hooks with the gate's decisions fixed (an appended
    answer would move the gate's ``prompt`` span), one ``conditional`` block per batch."""
    from safesteer.evaluate.refusal import answer_nll
    from safesteer.steering.condition import conditional

    out = np.full(len(prompts), np.nan)
    keep = [i for i, a in enumerate(answers) if str(a).strip()]  # answer_nll skips empty answers (NaN)
    flags = np.asarray(flags, dtype=bool)
    for s in range(0, len(keep), batch_size):
        rows = keep[s : s + batch_size]
        with conditional(bb, gate, intervention, flags=flags[rows]):
            out[rows] = answer_nll(
                bb, [prompts[i] for i in rows], [answers[i] for i in rows], batch_size=len(rows)
            )
    return out


def pol_auc(scores: np.ndarray, y: np.ndarray) -> float:
    from safesteer.behaviour.gate import auroc

    return auroc(scores, y)


def headline(summary: dict[str, Any]) -> str:
    """The acceptance figures as text."""
    g, te = summary["gate"], summary["test"]
    lines = [
        f"gate: layer {g['layer']} {g.get('position', 'prompt_end')}, test AUROC {g['held_out']['test_auroc']:.3f}, "
        f"LODO min AUROC {g['lodo_min_auroc']:.3f} "
        "(" + ", ".join(k + " " + format(v["auroc"], ".3f") for k, v in g["lodo"].items()) + ")",
        pair_line(g),
    ]
    for label in ("conditional", "unconditional"):
        r = te.get(label)
        if not r:
            lines.append(f"{label}: no policy met the constraints on validation")
            continue
        p = r["policy"]

        def f(m):
            return f"{m['baseline']:.1f}% → {m['value']:.1f}% (Δ {m['delta']:+.1f} pp [{m['low']:+.1f}, {m['high']:+.1f}])"

        fl = r["harmless_fluency"]
        lines.append(
            f"{label} {p['strategy']} α={p['alpha']}" + (f" FPR={p['fpr']}" if p["conditional"] else "") + ":"
        )
        lines.append(f"  harmful refusal {f(r['harmful_refusal'])}")
        lines.append(f"  XSTest-safe refusal {f(r['safe_refusal'])}")
        lines.append(f"  P(Yes) harmful {f(r['p_yes'])}")
        lines.append(
            f"  harmless fluency (NLL) Δ {fl['delta_pct']:+.2f}% [{fl['low']:+.2f}, {fl['high']:+.2f}]"
        )
    if "verify_conditional" in te:
        v = te["verify_conditional"]
        lines.append(
            f"real conditional run vs recombined answers: {100 * v['same_answer']:.0f}% identical answers, "
            f"{100 * v['same_refusal']:.0f}% same refusal verdict (n={v['n']})"
        )
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m safesteer.behaviour.study", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", default="runs/behaviour")
    ap.add_argument("--model", default=StudyConfig.model)
    ap.add_argument("--layer", type=int, default=StudyConfig.layer)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--alphas", default=",".join(map(str, StudyConfig.alphas)))
    ap.add_argument("--gate-layers", default=",".join(map(str, StudyConfig.gate_layers)))
    ap.add_argument("--no-augment", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = StudyConfig(
            model=args.model,
            layer=args.layer,
            data_dir=args.data_dir,
            threads=args.threads,
            alphas=tuple(float(a) for a in args.alphas.split(",")),
            gate_layers=tuple(int(a) for a in args.gate_layers.split(",")),
            augment=not args.no_augment,
        )
        summary = run_study(cfg, args.out)
    except SafesteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(headline(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
