"""The report's table of the recommended policy under attack and on borderline requests: refusal per
jailbreak family (harmful and benign requests in the same wrapper; each family scored by a gate that
never saw it), the look-alikes' held-out category, conversations with a short follow-up, and how
often short benign chat turns are flagged. Read from ``summary.json`` (``test.attacks``)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from safesteer.pipeline.report import Section


def _pct(m: dict[str, Any]) -> str:
    return (
        f"{m['baseline']:.1f}% → {m['value']:.1f}% (Δ {m['delta']:+.1f} pp [{m['low']:+.1f}, "
        f"{m['high']:+.1f}])"
    )


def _fold(r: dict[str, Any]) -> str:
    """Which family fold scored the row's set: a hash fold, or the family held out alone."""
    f = r.get("family_fold")
    return "" if f is None else " (held out alone)" if f == "alone" else f" (fold {f})"


def _label(name: str) -> tuple[str, str]:
    """(what the set is, the class of its requests)."""
    if name.startswith("wrap:"):
        return f"family {name[5:]}", "harmful"
    if name.startswith("wrapb:"):
        return f"family {name[6:]}", "benign"
    if name.startswith("conv:"):
        return "conversation + short follow-up", name[5:]
    if name == "lookalikes_heldout":
        return "look-alikes, held-out category", "benign"
    if name.startswith("direct:"):
        return "direct requests", "harmful" if name == "direct:harmful" else "XSTest-safe"
    return name, ""


def attack_rows(attacks: dict[str, Any]) -> pd.DataFrame:
    """One row per set (families sorted, harmful beside benign), pooled rows first."""
    rows = []
    for key, what, cls in (
        ("wrapped_harmful", "all families (held out)", "harmful"),
        ("wrapped_benign", "all families (held out)", "benign"),
    ):
        if key in attacks:
            a = attacks[key]
            rows.append(
                {
                    "set": what,
                    "requests": cls,
                    "n": a["n"],
                    "gate flags": f"{100 * a['flag_rate']:.0f}%",
                    "refusal": _pct(a["refusal"]),
                    **_answer_gate(a),
                }
            )
    per = attacks.get("per_set", {})
    order = sorted(per, key=lambda k: (not k.startswith("wrap"), k.split(":")[-1], k))
    for k in order:
        r = per[k]
        what, cls = _label(k)
        rows.append(
            {
                "set": what + _fold(r),
                "requests": cls,
                "n": r["n"],
                "gate flags": f"{100 * r['flag_rate']:.0f}%"
                + (
                    f" (deployed gate {100 * r['flag_rate_deployed_gate']:.0f}%)"
                    if "flag_rate_deployed_gate" in r
                    else ""
                ),
                "refusal": _pct(r["refusal"]),
                **_answer_gate(r),
            }
        )
    return pd.DataFrame(rows)


def _answer_gate(r: dict[str, Any]) -> dict[str, str]:
    if "refusal_with_answer_gate" not in r:
        return {}
    return {
        "answer-time gate fires": f"{100 * r['answer_gate_flag_rate']:.0f}%",
        "refusal, prompt or answer-time gate": _pct(r["refusal_with_answer_gate"]),
    }


def attacks_section(summary: dict[str, Any]) -> Section | None:
    attacks = ((summary.get("test") or {}).get("attacks")) or None
    if not attacks:
        return None
    sec = Section(
        "Under attack and on borderline requests: refusal by jailbreak family (test split, 95% CIs)"
    )
    turns = attacks.get("chat_turns_flag_rate")
    sec.text(
        "Each family's harmful and benign requests are wrapped alike (a jailbreak around a harmless request "
        "is harmless); every family is scored by a gate trained without its fold of families (the deployed "
        "gate, trained on all, is shown beside it). Rows the gate does not flag keep their unsteered answer."
        + (
            f" Short benign chat turns flagged: {100 * turns['flag_rate']:.1f}% of {turns['n']}."
            if turns
            else ""
        )
    )
    sec.table(attack_rows(attacks), caption="unsteered → recommended conditional policy")
    return sec
