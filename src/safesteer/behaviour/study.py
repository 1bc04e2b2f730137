"""The behaviour-steering study on a causal LM: harm gate, refusal directions, calibrated
conditional policy, judged by generated answers (``python -m safesteer.behaviour.study``).

:func:`run_study` is the named steps of :mod:`safesteer.behaviour.steps` in order —
``features`` → ``fit_gate`` → ``directions`` → ``sweep`` → ``choose`` → ``test`` → ``verify`` —
each kept under ``steps/`` with a key of its inputs, so a killed study resumes at the step it was
in and writes the same files. The study's own checks (the real in-pass conditional run gives the
recombined answers; the in-pass fluency check agrees with the recombined NLLs) must hold, else it
stops with an error naming the check.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from safesteer import layout
from safesteer.behaviour import policy as pol
from safesteer.behaviour.answer_gate import fit_answer_gate
from safesteer.behaviour.checkpoint import StepStore, step_key
from safesteer.behaviour.config import GATE_ONLY, StudyConfig
from safesteer.behaviour.context import Run
from safesteer.behaviour.heldout import self_checks, test, verify
from safesteer.behaviour.pairs import pair_line
from safesteer.behaviour.segments import pieces
from safesteer.behaviour.steps import Directions, Features, GateFit, directions, features, fit_gate
from safesteer.behaviour.sweep import Choice, Sweep, choose, sweep
from safesteer.errors import SafesteerError
from safesteer.evaluate.judges import build_judge
from safesteer.io import atomic_path, write_json
from safesteer.models import load_backbone


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def _fingerprint(directions: Any) -> list[Any]:
    """What the extra directions contribute to the steps' keys (names, layers, vectors' bytes)."""
    if directions is None:
        return []

    return [
        [n, directions[n].layer, hashlib.sha256(directions[n].vector.tobytes()).hexdigest()[:16]]
        for n in directions.names()
    ]


STEER_ONLY = ("alphas", "steer_positions", "max_safe_pp", "max_fluency_rel")
"""Settings only the sweep's steered answers, the choice and the test read (not in the base key)."""


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    *,
    model: str = "smollm2-135m",
    layer: int = 15,
    seed: int = 0,
    data_dir: str | Path | None = None,
    backbone: Any = None,
    extra_directions: Any = None,
) -> dict[str, Any]:
    """Run every step and write ``summary.json``, ``pareto.csv``, ``answers.csv``, ``gate/``, ``directions/``.

    ``extra_directions`` (a :class:`~safesteer.steering.DirectionSet`, e.g. the pipeline's probe /
    SAE / hybrid directions, oriented so that α ≥ 0 adds refusal) supplies every strategy of
    ``cfg.strategies`` other than ``refusal_caa`` / ``refusal_dim``; they are judged by the same sweep.
    ``model`` / ``layer``: the causal LM (unless ``backbone`` is that model, loaded) and the
    steering layer; ``seed`` and ``data_dir`` (the offline data folder) as the run's.
    The returned summary also holds ``seconds`` (wall clock per step), which the files leave out."""
    cfg.validate()
    data_dir = None if data_dir is None else str(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    judge = build_judge(
        cfg.judge, model=cfg.judge_model, url=cfg.judge_url
    )  # a bad name fails before the model loads
    bb = backbone or load_backbone(model)
    if bb.kind != "causal":
        raise SafesteerError("the behaviour study generates answers; it needs a causal LM")
    record = cfg.record(model, layer, seed, data_dir)
    # threads change no result; the family folds change the gate's fold scores on, not the features
    # (fit_gate and answer_gate put them in their own keys); how hard and where the chosen direction
    # steers and the budget the choice keeps change only the steered answers and the choice (the sweep's
    # steered steps and the test put them in theirs: a new α reuses the features, the gate and the rest);
    # the gate's own settings are in fit_gate's key (another gate kind reuses the features and directions)
    skip = ("threads", "family_folds", *STEER_ONLY, *GATE_ONLY)
    settings = {k: v for k, v in record.items() if k not in skip}
    base_key = step_key(settings, str(getattr(bb, "name", "")), _fingerprint(extra_directions))
    store = StepStore(out / layout.STEPS_DIR)
    run = Run(cfg, bb, judge, out, store, base_key, _say, layer, seed, data_dir, extra_directions)
    times: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        value = fn(run, *args)
        times[name] = time.perf_counter() - t
        return value

    f = timed("features", features)
    pc = timed("pieces", pieces, f) if cfg.gate_segments else None
    g = timed("gate", fit_gate, f, pc)
    d = timed("directions", directions, f)
    t0 = time.perf_counter()
    s = sweep(run, f, g, d)
    ch = choose(run, g, s)
    times["validation"] = time.perf_counter() - t0
    ag = timed("answer_gate", fit_answer_gate, f, g) if cfg.attacks else None
    te = timed("test", test, f, g, d, ch, ag)
    results = dict(te.results)
    v = timed("verify", verify, g, d, ch, te)
    if v is not None:
        results["verify_conditional"] = v
    problems = self_checks(results)
    if problems:
        raise SafesteerError(
            "the behaviour study's self-check failed: " + "; ".join(problems) + f" (answers in {out})"
        )
    with atomic_path(out / layout.ANSWERS_CSV) as tmp:
        pd.DataFrame(te.rows).to_csv(tmp, index=False)
    P = f.prompts
    with atomic_path(
        out / layout.GATE_SCORES_CSV
    ) as tmp:  # the gate's ROC (report) from every prompt's score
        pd.DataFrame(
            {"group": P.group, "split": P.split, "harmful": P.harmful, "aug": P.aug, "score": g.scores}
        ).to_csv(tmp, index=False)
    times["total"] = time.perf_counter() - t_all
    summary = build_summary(cfg, record, f, g, d, s, ch, results, times)
    write_json(out / layout.TIMINGS, times)  # wall clock apart: summary.json stays byte-reproducible
    write_json(out / layout.SUMMARY, {k: v for k, v in summary.items() if k != "seconds"})
    return summary


def build_summary(
    cfg: StudyConfig,
    record: dict[str, Any],
    f: Features,
    g: GateFit,
    d: Directions,
    s: Sweep,
    ch: Choice,
    results: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Every figure of the study as one JSON-able dict (``summary.json`` is it without ``seconds``)."""
    best_c, pairs, dev_pairs, gate = ch.conditional, g.pairs, g.dev_pairs, g.gate
    dev = {
        "at_gate": dev_pairs.at(),
        "at_policy": None if best_c is None else dev_pairs.at(best_c.threshold),
        "pairs": dev_pairs.pairs,
    }
    return {
        "config": record,
        "gate": {
            "layer": g.layer,
            **({"layers": list(gate.layers)} if len(gate.layers) > 1 else {}),
            "position": cfg.gate_position,
            "kind": gate.kind,
            "hidden": int(gate.meta.get("hidden", 0)),
            "members": int(gate.meta.get("members", 1)),
            "val_auroc_vs_xstest_safe": g.val_auroc,
            "threshold": gate.threshold,
            "held_out": g.report,
            "lodo": g.lodo,
            "lodo_min_auroc": float(min(v["auroc"] for v in g.lodo.values())),
            "pairs_same_side": pairs.same_side,
            "calibration": {
                "folds": cfg.calib_folds,
                "n_harmless": s.n_harmless,
                "n_safe_budget": len(s.rows["safe"]),
                "budget_groups": list(cfg.budget_groups),
            },
            "pairs_correct": pairs.correct,
            "pairs_at_gate_threshold": pairs.at(),
            # the pairs at the deployed gate's threshold too
            "pairs_at_policy_threshold": None if best_c is None else pairs.at(best_c.threshold),
            "pairs": pairs.pairs,
            "dev_pairs": dev,
        },
        "directions": {"scale_median_norm": d.scale, "names": d.dirs.names()},
        "split_counts": f.prompts.counts(),
        "test": results,
        "seconds": seconds,
        "pareto_val": [c.as_dict() for c in pol.pareto(list(ch.candidates))],
    }


def headline(summary: dict[str, Any]) -> str:
    """The acceptance figures as text."""
    g, te = summary["gate"], summary["test"]
    lines = [
        f"gate: layer {g['layer']} {g.get('position', 'prompt_end')}, test AUROC "
        f"{g['held_out']['test_auroc']:.3f}, LODO min AUROC {g['lodo_min_auroc']:.3f} "
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
            return (
                f"{m['baseline']:.1f}% → {m['value']:.1f}% (Δ {m['delta']:+.1f} pp [{m['low']:+.1f}, "
                f"{m['high']:+.1f}])"
            )

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
    att = te.get("attacks") or {}
    for key, what in (("wrapped_harmful", "wrapped harmful"), ("wrapped_benign", "wrapped benign")):
        if key in att:
            r = att[key]["refusal"]
            lines.append(
                f"  {what} ({att[key]['families']} held-out families, n={att[key]['n']}) refusal "
                f"{r['baseline']:.1f}% → {r['value']:.1f}% (Δ {r['delta']:+.1f} pp "
                f"[{r['low']:+.1f}, {r['high']:+.1f}])"
            )
    for key in ("lookalikes_heldout", "conv:harmful", "conv:benign"):
        if key in att.get("per_set", {}):
            r = att["per_set"][key]["refusal"]
            lines.append(f"  {key} refusal {r['baseline']:.1f}% → {r['value']:.1f}% (Δ {r['delta']:+.1f} pp)")
    if "chat_turns_flag_rate" in att:
        lines.append(f"  short chat turns flagged {100 * att['chat_turns_flag_rate']['flag_rate']:.1f}%")
    if "verify_conditional" in te:
        v = te["verify_conditional"]
        lines.append(
            f"real conditional run vs recombined answers: {100 * v['same_answer']:.0f}% identical answers, "
            f"{100 * v['same_refusal']:.0f}% same refusal verdict (n={v['n']})"
        )
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m safesteer.behaviour.study``: the study on its own, defaults from :class:`StudyConfig`."""
    d = StudyConfig()
    ap = argparse.ArgumentParser(
        prog="python -m safesteer.behaviour.study", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", default="runs/behaviour")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--alphas", default=",".join(map(str, d.alphas)))
    ap.add_argument("--gate-layers", default=",".join(map(str, d.gate_layers)))
    ap.add_argument(
        "--strategies", default="refusal_caa,refusal_dim", help="the study's own (no pipeline directions)"
    )
    ap.add_argument("--judge", default=d.judge)
    ap.add_argument("--no-augment", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = StudyConfig(
            threads=args.threads,
            alphas=[float(a) for a in args.alphas.split(",")],
            gate_layers=[int(a) for a in args.gate_layers.split(",")],
            strategies=args.strategies.split(","),
            judge=args.judge,
            augment=not args.no_augment,
        )
        summary = run_study(cfg, args.out, model=args.model, layer=args.layer, data_dir=args.data_dir)
    except SafesteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(headline(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
