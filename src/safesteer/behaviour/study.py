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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from safesteer import layout
from safesteer.behaviour import policy as pol
from safesteer.behaviour.checkpoint import StepStore, step_key
from safesteer.behaviour.context import Run
from safesteer.behaviour.heldout import self_checks, test, verify
from safesteer.behaviour.pairs import pair_line
from safesteer.behaviour.steps import (
    Choice,
    Directions,
    Features,
    GateFit,
    Sweep,
    choose,
    directions,
    features,
    fit_gate,
    sweep,
)
from safesteer.errors import SafesteerError
from safesteer.evaluate.judges import build_judge
from safesteer.io import atomic_path, write_json
from safesteer.models import load_backbone


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
    judge: str = "phrases"
    """The refusal judge, by name (:mod:`safesteer.evaluate.judges`: phrases, classifier, openai)."""
    judge_model: str = ""
    """The judge's model: a local text-classification model (classifier) or the endpoint's model (openai)."""
    judge_url: str = ""
    """The judge's OpenAI-compatible endpoint (openai), e.g. ``http://127.0.0.1:8000/v1``."""


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def _fingerprint(directions: Any) -> list[Any]:
    """What the extra directions contribute to the steps' keys (names, layers, vectors' bytes)."""
    if directions is None:
        return []
    import hashlib

    return [
        [n, directions[n].layer, hashlib.sha256(directions[n].vector.tobytes()).hexdigest()[:16]]
        for n in directions.names()
    ]


def run_study(
    cfg: StudyConfig, out_dir: str | Path, backbone: Any = None, extra_directions: Any = None
) -> dict[str, Any]:
    """Run every step and write ``summary.json``, ``pareto.csv``, ``answers.csv``, ``gate/``, ``directions/``.

    ``extra_directions`` (a :class:`~safesteer.steering.DirectionSet`, e.g. the pipeline's probe /
    SAE / hybrid directions, oriented so that α ≥ 0 adds refusal) supplies every strategy of
    ``cfg.strategies`` other than ``refusal_caa`` / ``refusal_dim``; they are judged by the same sweep.
    The returned summary also holds ``seconds`` (wall clock per step), which the files leave out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    judge = build_judge(
        cfg.judge, model=cfg.judge_model, url=cfg.judge_url
    )  # a bad name fails before the model loads
    bb = backbone or load_backbone(cfg.model)
    if bb.kind != "causal":
        raise SafesteerError("the behaviour study generates answers; it needs a causal LM")
    settings = {k: v for k, v in asdict(cfg).items() if k != "threads"}  # threads change no result
    base_key = step_key(settings, str(getattr(bb, "name", "")), _fingerprint(extra_directions))
    run = Run(cfg, bb, judge, out, StepStore(out / layout.STEPS_DIR), base_key, _say, extra_directions)
    times: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        value = fn(run, *args)
        times[name] = time.perf_counter() - t
        return value

    f = timed("features", features)
    g = timed("gate", fit_gate, f)
    d = timed("directions", directions, f)
    t0 = time.perf_counter()
    s = sweep(run, f, g, d)
    ch = choose(run, g, s)
    times["validation"] = time.perf_counter() - t0
    te = timed("test", test, f, g, d, ch)
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
    summary = build_summary(cfg, f, g, d, s, ch, results, times)
    write_json(out / layout.SUMMARY, {k: v for k, v in summary.items() if k != "seconds"})
    return summary


def build_summary(
    cfg: StudyConfig,
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
        "config": asdict(cfg),
        "gate": {
            "layer": g.layer,
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
