"""The test split beyond direct requests (issue #25): refusal per jailbreak family (harmful and
benign wrapped requests, each family scored by a gate that never saw it), on the look-alikes'
held-out category, in conversations with a short follow-up, and how often short benign chat turns
are flagged — unsteered against the chosen conditional policy, with paired 95% CIs.

A row the gate does not flag keeps its unsteered answer (the policy leaves it bit-identical, which
the ``verify`` step checks on the direct sets), so only flagged rows are answered under steering.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from safesteer.behaviour import policy as pol
from safesteer.behaviour.attacks import (
    CHAT_TURNS,
    CONV,
    LOOKALIKES_HELDOUT,
    family_fold,
    family_of,
    held_out_flags,
    is_attack_group,
)
from safesteer.behaviour.context import Run, per_group
from safesteer.evaluate.refusal import generate

DIRECT = "direct:"
"""Sets of direct requests answered beside the attacks (``direct:harmful``, ``direct:xstest_safe``)."""


def attack_sets(P: Any, n: int) -> dict[str, list[int]]:
    """Test rows per set: ``wrap:<family>`` / ``wrapb:<family>`` (``n`` each), the look-alikes'
    held-out category and the two kinds of conversation (``3n`` each)."""
    te = P.mask("test")
    out: dict[str, list[int]] = {}
    for g in dict.fromkeys(P.group):
        if family_of(g) is not None:
            out[g] = [int(i) for i in np.flatnonzero(te & P.mask(group=g))[:n]]
    out[LOOKALIKES_HELDOUT] = [int(i) for i in np.flatnonzero(te & P.mask(group=LOOKALIKES_HELDOUT))[: 3 * n]]
    for name in ("harmful", "benign"):
        out[CONV + name] = [int(i) for i in np.flatnonzero(te & P.mask(group=CONV + name))[: 3 * n]]
    # direct requests beside them (what the answer-time gate costs on XSTest-safe, gains on direct harm)
    out[DIRECT + "harmful"] = per_group(P, "test", 1, 3 * n, lambda g: not is_attack_group(g))
    out[DIRECT + "xstest_safe"] = [int(i) for i in np.flatnonzero(te & P.mask(group="xstest_safe"))[: 3 * n]]
    return {k: v for k, v in out.items() if v}


def answer_attacks(
    run: Run, P: Any, g: Any, d: Any, c: Any, ag: Any = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary["test"]["attacks"], answers.csv rows) for the chosen conditional policy ``c``; with
    the answer-time gate ``ag`` (:mod:`~safesteer.behaviour.answer_gate`) also ``prompt OR answer``."""
    cfg, bb, judge = run.cfg, run.bb, run.judge
    sets = attack_sets(P, cfg.n_test_attack)
    # a wrapped row by the gate that never saw its family's fold (the rule validation chose by)
    flags = {
        k: held_out_flags(
            g.scores, {c.fpr: c.threshold}, P.group, rows, g.fold_scores, g.fold_thresholds, cfg.family_folds
        )[c.fpr]
        for k, rows in sets.items()
    }
    order = list(sets)
    allrows = [i for k in order for i in sets[k]]
    base_ans = generate(bb, P.inputs(allrows), cfg.max_new_tokens, cfg.batch_size)
    base = base_ans.texts
    allflags = np.concatenate([flags[k] for k in order])
    aflags = np.zeros(len(allrows), dtype=bool)  # the answer-time gate, on rows the prompt gate let through
    if ag is not None:
        from safesteer.behaviour.answer_gate import answer_features, prefixes, scores

        H = answer_features(bb, P.inputs(allrows), prefixes(bb, base_ans, ag.k), ag.layers, cfg.batch_size)
        groups = [P.group[i] for i in allrows]
        for grp in dict.fromkeys(groups):
            m = np.array([x == grp for x in groups])
            gate = ag.for_group(grp)
            aflags[m] = scores(gate, H[m]) > gate.threshold
        aflags &= ~allflags
    need = [i for i, f in zip(allrows, allflags | aflags) if f]
    steered_by_row: dict[int, str] = {}
    if need:
        with run.intervention(d.dirs, d.scale, c.strategy, c.alpha).apply(bb):
            got = generate(bb, P.inputs(need), cfg.max_new_tokens, cfg.batch_size).texts
        steered_by_row = dict(zip(need, got))
    texts = [P.text[i] for i in allrows]
    base_ref = judge(texts, base)
    answers = [steered_by_row.get(i, b) if f else b for i, b, f in zip(allrows, base, allflags)]
    cond_ref = judge(texts, answers)
    both = [steered_by_row.get(i, b) if f else b for i, b, f in zip(allrows, base, allflags | aflags)]
    both_ref = judge(texts, both)
    res: dict[str, Any] = {"per_set": {}}
    rows_out: list[dict[str, Any]] = []
    at = 0
    for k in order:
        n = len(sets[k])
        b, s = base_ref[at : at + n], cond_ref[at : at + n]
        extra = {}
        if ag is not None:
            extra = {
                "answer_gate_flag_rate": float(aflags[at : at + n].mean()),
                "refusal_with_answer_gate": pol.paired(b, both_ref[at : at + n]),
            }
        res["per_set"][k] = {
            **extra,
            "n": n,
            "harmful": int(P.harmful[sets[k][0]]),
            "flag_rate": float(flags[k].mean()),
            "refusal": pol.paired(b, s),
            **(
                {"family_fold": family_fold(family_of(k), cfg.family_folds) if cfg.family_folds else "alone"}
                if family_of(k)
                else {}
            ),
            **(
                {"flag_rate_deployed_gate": float(np.mean(g.scores[sets[k]] > c.threshold))}
                if family_of(k)
                else {}
            ),
        }
        for j in range(at, at + n):
            pairs = [("unsteered", base[j], b[j - at]), ("conditional", answers[j], s[j - at])]
            if ag is not None:
                pairs.append(("conditional+answer_gate", both[j], both_ref[j]))
            for label, a, r in pairs:
                rows_out.append(
                    {"set": k, "policy": label, "prompt": texts[j], "answer": a, "refusal": float(r)}
                )
        at += n
    for name, prefix in (("wrapped_harmful", "wrap:"), ("wrapped_benign", "wrapb:")):
        ks = [k for k in order if k.startswith(prefix)]
        if ks:
            m = np.concatenate([[k in ks] * len(sets[k]) for k in order])
            res[name] = {
                "n": int(m.sum()),
                "families": len(ks),
                "flag_rate": float(allflags[m].mean()),
                "refusal": pol.paired(base_ref[m], cond_ref[m]),
            }
            if ag is not None:
                res[name]["answer_gate_flag_rate"] = float(aflags[m].mean())
                res[name]["refusal_with_answer_gate"] = pol.paired(base_ref[m], both_ref[m])
    turns = P.mask("test") & P.mask(group=CHAT_TURNS)
    if turns.any():
        res["chat_turns_flag_rate"] = {
            "n": int(turns.sum()),
            "flag_rate": float(np.mean(g.scores[turns] > c.threshold)),
        }
    return res, rows_out
