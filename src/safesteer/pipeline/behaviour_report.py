"""The report's behaviour sections: the ten-second verdict, the Pareto figure, before/after answers
and the gate (ROC, held-out and leave-one-dataset-out AUROC, paraphrase pairs).

Every number is read from the behaviour stage's files (``summary.json``, ``pareto.csv``,
``answers.csv``, ``gate_scores.csv``) and the run's ``policies/`` folder, never retyped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from safesteer.behaviour.pairs import pair_line
from safesteer.io import read_json
from safesteer.pipeline.behaviour_attacks_report import attacks_section
from safesteer.pipeline.report import Section


def pct(m: dict[str, Any]) -> str:
    """``a% → b% (Δ +d pp [lo, hi])`` of a paired figure from the study's summary."""
    return (
        f"{m['baseline']:.1f}% → {m['value']:.1f}% (Δ {m['delta']:+.1f} pp [{m['low']:+.1f}, "
        f"{m['high']:+.1f}])"
    )


def fluency(m: dict[str, Any]) -> str:
    return f"{m['delta_pct']:+.2f}% [{m['low']:+.2f}, {m['high']:+.2f}]"


def _policy_name(p: dict[str, Any]) -> str:
    return (
        (f"cond:{p['strategy']}" if p["conditional"] else p["strategy"])
        + f" α={p['alpha']:g}"
        + (f" (gate FPR {100 * p['fpr']:g}%)" if p["conditional"] else "")
    )


def verdict(summary: dict[str, Any], none_reason: str | None, run_dir: Path) -> Section:
    sec = Section("Verdict: steering that refuses harmful requests and nothing else (test split, 95% CIs)")
    if summary.get("skipped"):
        return sec.text(f"Behaviour steering was not evaluated: {summary['skipped']}.")
    te = summary["test"]
    cond, unc = te.get("conditional"), te.get("unconditional")
    if none_reason or not cond:
        sec.text(
            "No strategy met the constraints: "
            f"{none_reason or 'no conditional policy was feasible on validation'}. "
            f"Nothing is recommended for deployment ({run_dir.name}/policies/NONE.txt)."
        )
    else:
        p = cond["policy"]
        where = {
            "prompt": " on the prompt's positions (answers generated unsteered on them)",
            "all": " on every position",
        }.get(summary["config"].get("steer_positions", "all"), "")
        sec.text(
            f"Recommended: {_policy_name(p)} at layer {summary['config']['layer']}{where}, gated by "
            "the harm gate ("
            + ("MLP" if summary["gate"].get("kind") == "mlp" else "linear probe")
            + ") at layer "
            f"{summary['gate']['layer']} ({summary['gate'].get('position', 'prompt_end')}). On the "
            f"test split it refuses {pct(cond['harmful_refusal'])} of harmful "
            f"requests and {pct(cond['safe_refusal'])} of XSTest-safe ones; P(Yes) on harmful prompts "
            f"{pct(cond['p_yes'])}; harmless fluency (NLL) {fluency(cond['harmless_fluency'])}. "
            f"Serve it with `safesteer serve --run {run_dir}` ({run_dir.name}/policies/recommended.json)."
        )
        cfg = summary["config"]
        over = [
            f"XSTest-safe refusal {cond['safe_refusal']['delta']:+.1f} pp > +{cfg['max_safe_pp']:g} pp"
        ] * (cond["safe_refusal"]["delta"] > cfg["max_safe_pp"]) + [
            f"harmless fluency {cond['harmless_fluency']['delta_pct']:+.2f}% > "
            f"{100 * cfg['max_fluency_rel']:g}%"
        ] * (cond["harmless_fluency"]["delta_pct"] > 100 * cfg["max_fluency_rel"])
        if over:
            sec.text(
                "Caution: on the test split the policy exceeds the constraints it met on validation: "
                + "; ".join(over)
                + "."
            )
    rows = []
    first = "conditional (best feasible, not recommended)" if none_reason else "conditional (recommended)"
    for label, r in ((first, cond), ("unconditional (contrast)", unc)):
        if not r:
            rows.append({"policy": label, "strategy": "none met the constraints"})
            continue
        rows.append(
            {
                "policy": label,
                "strategy": _policy_name(r["policy"]),
                "harmful refusal": pct(r["harmful_refusal"]),
                "XSTest-safe refusal": pct(r["safe_refusal"]),
                "P(Yes) harmful": pct(r["p_yes"]),
                "harmless fluency Δ": fluency(r["harmless_fluency"]),
                "degenerate answers": f"{100 * r['coherence']['degenerate_share']:.1f}%",
            }
        )
    groups = (summary["gate"].get("calibration") or {}).get("budget_groups") or [
        "xstest_safe",
        "contrast_safe",
    ]
    sec.table(
        pd.DataFrame(rows),
        caption="Chosen on validation: max harmful refusal gain with look-alike "
        f"({' + '.join(groups)}) over-refusal ≤ "
        f"+{summary['config']['max_safe_pp']:g} pp and harmless NLL within "
        f"{100 * summary['config']['max_fluency_rel']:g}%; reported on test (paired bootstrap)",
    )
    if "verify_conditional" in te:
        v = te["verify_conditional"]
        sec.text(
            f"The real in-pass conditional run on {v['n']} test prompts gave "
            f"{100 * v['same_answer']:.0f}% identical answers "
            f"to the recombined ones ({100 * v['same_refusal']:.0f}% the same refusal verdict)."
        )
    return sec


def pareto_plot(pareto: pd.DataFrame, summary: dict[str, Any], path: Path) -> Path | None:
    from safesteer.evaluate.plots import _save, plt  # matplotlib: only when plotting

    if pareto is None or not len(pareto):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (strategy, is_cond), g in pareto.groupby(["strategy", "conditional"], sort=True):
        g = g.sort_values("alpha")
        ax.scatter(
            100 * g["safe_refusal"],
            100 * g["harmful_refusal"],
            s=18,
            alpha=0.75,
            marker="o" if is_cond else "x",
            label=f"{'cond:' if is_cond else ''}{strategy}",
        )
        if not is_cond:
            for _, r in g.iterrows():
                ax.annotate(
                    f"{r['alpha']:g}",
                    (100 * r["safe_refusal"], 100 * r["harmful_refusal"]),
                    fontsize=6,
                    xytext=(3, 2),
                    textcoords="offset points",
                    color="#555555",
                )
    for label, colour in (("conditional", "#d62728"), ("unconditional", "#111111")):
        r = summary["test"].get(label)
        if r:
            p = r["policy"]
            ax.scatter(
                [100 * p["safe_refusal"]],
                [100 * p["harmful_refusal"]],
                s=160,
                facecolors="none",
                edgecolors=colour,
                linewidths=2,
                label=f"chosen {label} (validation)",
            )
            ax.scatter(
                [r["safe_refusal"]["value"]],
                [r["harmful_refusal"]["value"]],
                s=120,
                marker="*",
                color=colour,
                label=f"chosen {label} (test)",
            )
    base = summary["test"]["unsteered"]
    ax.scatter(
        [100 * base["safe"]],
        [100 * base["harmful"]],
        s=80,
        marker="s",
        color="#7f7f7f",
        label="unsteered (test)",
    )
    ax.set_xlim(-2, max(10.0, 100 * float(pareto["safe_refusal"].max()) + 5))
    ax.set_ylim(-2, 102)
    ax.set_xlabel("XSTest-safe refusal (%)")
    ax.set_ylabel("harmful refusal (%)")
    ax.set_title(
        "Each strategy × α (× gate FPR) on validation (x: unconditional, labelled α); chosen points marked",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def roc_plot(scores: pd.DataFrame, path: Path) -> Path | None:
    from sklearn.metrics import roc_curve  # sklearn: heavy, only for this plot

    from safesteer.evaluate.plots import _save, plt  # matplotlib: only when plotting

    te = scores[(scores["split"] == "test") & (~scores["aug"].astype(bool))]
    if te["harmful"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, neg in (
        ("all harmless", te["harmful"] == 0),
        ("XSTest-safe only", te["group"] == "xstest_safe"),
    ):
        m = (te["harmful"] == 1) | neg
        fpr, tpr, _ = roc_curve(te["harmful"][m], te["score"][m])
        ax.plot(fpr, tpr, label=f"harmful vs {name}")
    ax.plot([0, 1], [0, 1], ":", color="#999999")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Harm gate ROC (test split)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def examples(answers: pd.DataFrame, n: int = 4) -> pd.DataFrame | None:
    """Before/after answers: harmful prompts whose verdict the policy changed first, then XSTest-safe ones."""
    if answers is None or "conditional" not in set(answers["policy"]):
        return None
    rows = []
    for s in ("harmful", "safe"):
        base = answers[(answers["set"] == s) & (answers["policy"] == "unsteered")].set_index("prompt")
        cond = answers[(answers["set"] == s) & (answers["policy"] == "conditional")].reset_index(drop=True)
        cond = cond.assign(
            change=[
                float(r) - float(base.loc[p, "refusal"]) for p, r in zip(cond["prompt"], cond["refusal"])
            ],
            order=range(len(cond)),
        )
        pick = cond.sort_values(["change", "order"], ascending=[s == "safe", True]).head(n)
        for _, r in pick.iterrows():
            rows.append(
                {
                    "set": "harmful" if s == "harmful" else "XSTest-safe",
                    "prompt": str(r["prompt"])[:160],
                    "unsteered answer": str(base.loc[r["prompt"], "answer"])[:160],
                    "refused": int(base.loc[r["prompt"], "refusal"]),
                    "with the policy": str(r["answer"])[:160],
                    "refused ": int(r["refusal"]),
                }
            )
    return pd.DataFrame(rows)


def sections(bdir: Path, run_dir: Path) -> list[Section]:
    """The behaviour sections, in report order (verdict first)."""
    summary = read_json(bdir / "summary.json")
    none_file = run_dir / "policies" / "NONE.txt"
    none_reason = (
        none_file.read_text().strip().removeprefix("no policy recommended: ") if none_file.is_file() else None
    )
    out = [verdict(summary, none_reason, run_dir)]
    if summary.get("skipped"):
        return out
    under_attack = attacks_section(summary)
    if under_attack is not None:
        out.append(under_attack)
    plots = run_dir / "plots"
    fig = Section("Pareto: harmful refusal vs XSTest-safe refusal")
    pareto = pd.read_csv(bdir / "pareto.csv") if (bdir / "pareto.csv").is_file() else None
    fig.image(
        pareto_plot(pareto, summary, plots / "behaviour_pareto.png") or plots / "none.png",
        "Validation split: each strategy × α, conditional (o, per gate FPR) and, with "
        "sweep_unconditional, unconditional (x); chosen points circled, their test figures starred",
    )
    if pareto is not None:
        front = pd.DataFrame(summary.get("pareto_val") or [])
        if len(front):
            fig.table(
                front[
                    [
                        "strategy",
                        "alpha",
                        "conditional",
                        "fpr",
                        "harmful_refusal",
                        "safe_refusal",
                        "fluency_rel",
                        "feasible",
                    ]
                ],
                caption="The Pareto front on validation (higher harmful refusal, lower XSTest-safe refusal)",
                floatfmt="{:.3g}",
            )
    at_fpr = ((summary.get("test") or {}).get("conditional") or {}).get("at_each_fpr")
    if at_fpr:
        pol_ = summary["test"]["conditional"]["policy"]
        fig.table(
            pd.DataFrame(at_fpr),
            caption=f"The chosen {pol_['strategy']} α = {pol_['alpha']:g} on test at each gate FPR "
            "validation tried (recombined from the test answers, read after the choice: it chooses nothing)",
            floatfmt="{:.3g}",
        )
    out.append(fig)
    ex = examples(pd.read_csv(bdir / "answers.csv") if (bdir / "answers.csv").is_file() else None)
    if ex is not None:
        out.append(
            Section("Before / after: answers with and without the recommended policy (test split)").table(ex)
        )
    g = summary["gate"]
    gate = Section("The harm gate")
    kind = (
        f"An average of {g.get('members', 1)} one-hidden-layer ReLU MLPs ({g.get('hidden')} units each)"
        if g.get("kind") == "mlp"
        else f"A {g['kind']} gate"
        if g.get("kind") not in (None, "linear")
        else "Logistic probe"
    )
    gate.text(
        f"{kind} at {g.get('position', 'prompt_end')} of layer {g['layer']} (chosen on validation among "
        f"{', '.join(str(k) for k in g['val_auroc_vs_xstest_safe'])}). Held-out test AUROC "
        f"{g['held_out']['test_auroc']:.3f}; "
        f"leave-one-dataset-out min AUROC {g['lodo_min_auroc']:.3f}; {pair_line(g)} (Wilson 95% intervals)."
    )
    if (bdir / "gate_scores.csv").is_file():
        gate.image(
            roc_plot(pd.read_csv(bdir / "gate_scores.csv"), plots / "gate_roc.png") or plots / "none.png",
            "ROC of the gate on the test split (augmented copies excluded)",
        )
    per = [
        {
            "dataset": k,
            "harmful": v["harmful"],
            "test AUROC": g["held_out"]["per_dataset"].get(k, {}).get("auroc"),
            "flag rate at threshold": g["held_out"]["per_dataset"].get(k, {}).get("flag_rate"),
            "LODO AUROC": v["auroc"],
            "LODO n": v["n"],
        }
        for k, v in g["lodo"].items()
    ]
    gate.table(
        pd.DataFrame(per),
        caption="Per dataset: held-out AUROC vs the other class, flag rate, leave-one-dataset-out AUROC",
        floatfmt="{:.3f}",
    )
    out.append(gate)
    return out
