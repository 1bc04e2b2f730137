"""The study's last two steps, on the test split: ``test`` (answers, P(Yes), fluency and coherence
of the unsteered model and of the chosen policies, with paired 95% CIs) and ``verify`` (the real
in-pass conditional run against the answers recombined from the steered and unsteered ones)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from safesteer.behaviour import policy as pol
from safesteer.behaviour.attacks import is_attack_group
from safesteer.behaviour.checkpoint import step_key
from safesteer.behaviour.context import Run, per_group
from safesteer.behaviour.heldout_attacks import answer_attacks
from safesteer.behaviour.steps import NOT_QA, Directions, Features, GateFit
from safesteer.behaviour.sweep import Choice
from safesteer.evaluate.choice import forced_choice
from safesteer.evaluate.refusal import agreement, answer_nll, coherence, generate
from safesteer.steering.condition import GateState, conditional, gate_flags, is_segmented


@dataclass
class TestResult:
    texts: dict[str, list[str]]  # the test prompts per set (harmful, safe, qa)
    results: dict[str, Any]  # summary["test"] before verify
    rows: list[dict[str, Any]]  # answers.csv
    key: str


def test(run: Run, f: Features, g: GateFit, d: Directions, ch: Choice, ag: Any = None) -> TestResult:
    cfg, P = run.cfg, f.prompts
    key = step_key(
        run.base_key,
        "test",
        cfg.steer_positions,  # the base key leaves it out (study.STEER_ONLY)
        f.key,
        g.key,
        d.key,
        *(c and c.as_dict() for c in (ch.conditional, ch.unconditional)),
        *([ag.key] if ag is not None else []),
    )
    th = per_group(P, "test", 1, cfg.n_test_harmful, lambda g: not is_attack_group(g))
    ts = list(np.flatnonzero(P.mask("test", "xstest_safe")))
    tq = [
        i
        for i in per_group(P, "test", 0, cfg.n_qa + len(ts))
        if P.group[i] not in NOT_QA and not is_attack_group(P.group[i])
    ]
    tq = tq[: cfg.n_qa]
    texts = {
        "harmful": [P.text[i] for i in th],
        "safe": [P.text[i] for i in ts],
        "qa": [P.text[i] for i in tq],
    }
    flags = {"harmful": g.scores[th], "safe": g.scores[ts], "qa": g.scores[tq]}
    return run.cached(
        "test",
        key,
        lambda: TestResult(
            texts, *_with_attacks(run, P, g, d, ch, ag, *_answer_test(run, texts, flags, g, d, ch)), key
        ),
        lambda r: ({"results": r.results, "rows": r.rows}, None),
        lambda data, _: TestResult(texts, data["results"], data["rows"], key),
    )


def _answer_test(
    run: Run, T: dict[str, list[str]], flags: dict[str, np.ndarray], g: GateFit, d: Directions, ch: Choice
):
    cfg, bb, judge = run.cfg, run.bb, run.judge
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
    steered_test: dict[tuple[str, float], Any] = {}
    for label, c in (("conditional", ch.conditional), ("unconditional", ch.unconditional)):
        if c is None:
            res[label] = None
            continue
        intervention = run.intervention(d.dirs, d.scale, c.strategy, c.alpha)
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
            # where the chosen point sits: its α on test at each threshold validation tried (chooses nothing)
            front = pol.at_each_fpr(
                ch.candidates,
                c,
                {
                    "harmful": flags["harmful"],
                    "safe": flags["safe"],
                    "nll": np.r_[flags["safe"], flags["qa"]],
                },
                {"harmful": ref["harmful"], "safe": ref["safe"], "nll": nll_st},
                {"harmful": bref["harmful"], "safe": bref["safe"], "nll": nll_base},
            )
            f = {k: flags[k] > c.threshold for k in flags}
            ref = {k: pol.compose(f[k], ref[k], bref[k]) for k in ref}
            answers = {
                k: [s if gk else b for s, b, gk in zip(st[k].texts, base_t[k].texts, f[k])] for k in st
            }
            harmless_flags = np.concatenate([f["safe"], f["qa"]])
            nll_cond = pol.compose(harmless_flags, nll_st, nll_base)
            deployed = g.gate.with_threshold(c.threshold)
            if is_segmented(deployed):  # it decides in passes of its own first, as the service does
                pre = gate_flags(bb, deployed, T["harmful"], cfg.batch_size)
                p_in = by_flags(
                    bb, intervention, T["harmful"], pre, lambda x: forced_choice(bb, x, "harmful")
                )
                gs = GateState(flagged=[pre])
            else:
                with conditional(bb, deployed, intervention) as gs:  # gate read in-pass
                    p_in = forced_choice(bb, T["harmful"], "harmful")
            p_flag = pol.compose(f["harmful"], p_st, p_base)
            nll_real = nll_fixed_flags(
                bb, deployed, intervention, harmless_t, harmless_t_ans, harmless_flags, cfg.batch_size
            )
            extra = {
                "gate_flag_rate": {k: float(v.mean()) for k, v in f.items()},
                "p_yes_gate_in_pass": pol.paired(p_base, p_in),
                "in_pass_flag_rate_on_fc_prompts": float(gs.flags.mean()),
                "fluency_real_vs_composed_max_abs": float(np.nanmax(np.abs(nll_real - nll_cond))),
                "at_each_fpr": front,
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
    return res, rows


def _with_attacks(
    run: Run, P: Any, g: GateFit, d: Directions, ch: Choice, ag: Any, res: dict, rows: list
) -> tuple[dict, list]:
    """The direct sets' results and rows, with the attack sets' (:mod:`heldout_attacks`) when the study has
    them and a conditional policy was chosen."""
    if run.cfg.attacks and ch.conditional is not None and any(map(is_attack_group, P.group)):
        res["attacks"], more = answer_attacks(run, P, g, d, ch.conditional, ag)
        rows = rows + more
    return res, rows


def by_flags(
    bb: Any, intervention: Any, texts: list[str], flags: np.ndarray, fn: Callable[[list[str]], Any]
) -> list:
    """``fn`` of the flagged ``texts`` under ``intervention`` and of the others plain, in the texts'
    order: a policy whose gate decided before the pass (the segmented gate, as the service runs it)."""
    flags = np.asarray(flags, dtype=bool)
    out: list[Any] = [None] * len(texts)
    for on in (True, False):
        rows = list(np.flatnonzero(flags == on))
        if not rows:
            continue
        with intervention.apply(bb) if on else contextlib.nullcontext():
            got = fn([texts[i] for i in rows])
        for i, v in zip(rows, got):
            out[i] = v
    return np.asarray(out) if out and not isinstance(out[0], str) else out


def nll_fixed_flags(
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


# -------------------------------------------------------------------------------------------- verify
FLUENCY_CHECK_TOL = 1e-3
"""The largest |NLL(real in-pass run) − NLL(recombined)| per harmless answer the study accepts."""


def verify(run: Run, g: GateFit, d: Directions, ch: Choice, t: TestResult) -> dict[str, Any] | None:
    """The chosen conditional policy run for real (gate read in-pass) on the first ``n_verify / 2``
    harmful and XSTest-safe test prompts, against the answers recombined by the ``test`` step."""
    cfg, c = run.cfg, ch.conditional
    if c is None or not cfg.n_verify:
        return None
    half = cfg.n_verify // 2
    sub = t.texts["harmful"][:half] + t.texts["safe"][:half]
    key = step_key(run.base_key, "verify", t.key)

    def compute() -> dict[str, Any]:
        deployed = g.gate.with_threshold(c.threshold)
        iv = run.intervention(d.dirs, d.scale, c.strategy, c.alpha)
        gen = lambda x: generate(run.bb, x, cfg.max_new_tokens, cfg.batch_size).texts  # noqa: E731
        if is_segmented(deployed):  # decided in passes of its own first, then answered (the service's order)
            real_texts = by_flags(run.bb, iv, sub, gate_flags(run.bb, deployed, sub, cfg.batch_size), gen)
        else:
            with conditional(run.bb, deployed, iv):
                real_texts = gen(sub)
        composed = [r["answer"] for r in t.rows if r["policy"] == "conditional" and r["set"] == "harmful"][
            :half
        ]
        composed += [r["answer"] for r in t.rows if r["policy"] == "conditional" and r["set"] == "safe"][
            :half
        ]
        return {
            "n": len(sub),
            "same_answer": float(np.mean([a == b for a, b in zip(real_texts, composed)])),
            "same_refusal": float(np.mean(run.judge(sub, real_texts) == run.judge(sub, composed))),
        }

    return run.cached("verify", key, compute, lambda v: (v, None), lambda data, _: data)


def self_checks(test_results: dict[str, Any]) -> list[str]:
    """What the study's own checks found wrong (empty: all hold): the in-pass fluency check agrees
    with the recombined NLLs, and the real conditional run gives the recombined answers."""
    problems = []
    cond = test_results.get("conditional")
    if cond:
        gap = cond.get("fluency_real_vs_composed_max_abs", 0.0)
        if not gap <= FLUENCY_CHECK_TOL:
            problems.append(
                f"in-pass fluency differs from the recombined NLLs by {gap:.2g} (tolerance "
                f"{FLUENCY_CHECK_TOL})"
            )
    v = test_results.get("verify_conditional")
    if v and v["same_answer"] < 1.0:
        problems.append(
            f"the real conditional run gave the recombined answer on {100 * v['same_answer']:.0f}% of "
            f"{v['n']} prompts (expected 100%)"
        )
    return problems
