"""The ``behaviour`` pipeline stage: the behaviour study (:mod:`safesteer.behaviour.study`) on the run's
model, with the directions stage's probe / SAE / hybrid strategies judged beside ``refusal_caa`` and
``refusal_dim`` by the same generation metrics, and the calibrated conditional policy packaged for
the service (:mod:`safesteer.serve.bundle`).

Strategies taken from the directions stage point toward *unsafe* (α ≥ 0 steers away from it); the
behaviour study's convention is "α ≥ 0 adds refusal", and on a causal LM adding the harm direction
is what makes it refuse, so they enter the sweep sign-flipped (recorded in each direction's meta).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer.errors import SafesteerError
from safesteer.io import write_json
from safesteer.layout import POLICY_DIR, SUMMARY, TIMINGS

BEHAVIOUR_OWN = ("refusal_caa", "refusal_dim")


@dataclass(frozen=True)
class BehaviourOutputs:
    dir: Path
    summary: Path
    policy: Path  # the service bundle: recommended.json (or NONE.txt), gate/, directions/
    recommended: bool
    skipped: str  # why the stage did not run the study ("" when it did)


def study_config(section: Any, model: str, layer: int, seed: int, data_dir: Path | None):
    """The :class:`~safesteer.behaviour.study.StudyConfig` of a ``[behaviour]`` section."""
    from safesteer.behaviour.prompts import QA_SETS
    from safesteer.behaviour.study import StudyConfig

    caps = {
        "advbench": section.cap_harmful,
        "donotanswer": section.cap_harmful,
        **{q: section.cap_qa for q in QA_SETS},
        **{s: section.cap_shipped for s in ("contrast_safe", "contrast_unsafe", "tasks")},
    }
    return StudyConfig(
        model=model,
        layer=layer,
        gate_layers=tuple(section.gate_layers),
        gate_position=section.gate_position,
        gate_hidden=section.gate_hidden,
        gate_members=section.gate_members,
        gate_mlp_alpha=section.gate_mlp_alpha,
        alphas=tuple(section.alphas),
        steer_positions=section.steer_positions,
        budget_groups=tuple(section.budget_groups),
        fprs=tuple(section.fprs),
        strategies=tuple(section.strategies),
        caps=caps,
        augment=section.augment,
        augment_wide=section.augment_wide,
        sweep_unconditional=section.sweep_unconditional,
        calib_folds=section.calib_folds,
        n_val_harmful=section.n_val_harmful,
        n_test_harmful=section.n_test_harmful,
        n_qa=section.n_qa,
        n_caa_prompts=section.n_caa_prompts,
        n_verify=section.n_verify,
        max_new_tokens=section.max_new_tokens,
        batch_size=section.batch_size,
        max_safe_pp=section.max_safe_pp,
        max_fluency_rel=section.max_fluency_rel,
        seed=seed,
        data_dir=None if data_dir is None else str(data_dir),
        threads=section.threads or None,
        judge=section.judge,
        judge_model=section.judge_model,
        judge_url=section.judge_url,
    )


def toward_refusal(directions: Any, names: Any) -> Any:
    """The named directions of a pipeline :class:`DirectionSet`, sign-flipped (α ≥ 0 adds the unsafe direction)."""
    from safesteer.steering.strategies import Direction, DirectionSet

    out = DirectionSet()
    for name in names:
        if name in BEHAVIOUR_OWN:
            continue
        if name not in directions:
            raise SafesteerError(
                f"unknown behaviour strategy '{name}'; valid choices: "
                f"{', '.join([*BEHAVIOUR_OWN, *directions.names()])}"
            )
        d = directions[name]
        if d.members:
            raise SafesteerError(
                f"behaviour strategy '{name}' is an ensemble (a random control); pick a single direction"
            )
        out.add(
            Direction(
                d.name,
                -d.vector,
                d.kind,
                d.layer,
                list(d.sources),
                list(d.atoms),
                {
                    **d.meta,
                    "behaviour_sign": "vector = -(pipeline direction toward unsafe): alpha >= 0 adds it (toward refusal)",
                },
            )
        )
    return out


def run_behaviour_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> BehaviourOutputs:
    from safesteer.serve.bundle import write_bundle

    out_dir = Path(out_dir)
    policy = out_dir / POLICY_DIR
    c = ctx.config
    skipped = ""
    if not section.enabled:
        skipped = "[behaviour] enabled = false"
    bb = None
    if not skipped:
        from safesteer.models import load_backbone

        bb = load_backbone(c.model.name, device=ctx.device)
        if bb.kind != "causal":
            skipped = f"{c.model.name} is a {bb.kind} LM; behaviour steering is judged by generated answers (causal LMs)"
    if skipped:
        ctx.say(f"behaviour: skipped ({skipped})")
        write_json(out_dir / SUMMARY, {"skipped": skipped})
        write_bundle(None, out_dir, policy, model=c.model.name)
        return BehaviourOutputs(out_dir, out_dir / SUMMARY, policy, False, skipped)
    from safesteer.behaviour.study import run_study
    from safesteer.steering.strategies import DirectionSet

    extra = toward_refusal(DirectionSet.load(inputs["directions"].directions), section.strategies)
    cfg = study_config(section, c.model.name, c.model.layer, ctx.seed, ctx.data_dir)
    summary = run_study(cfg, out_dir, bb, extra_directions=extra)
    write_json(
        out_dir / TIMINGS, summary.pop("seconds", {})
    )  # wall clock apart: the stage files stay byte-reproducible
    write_json(out_dir / SUMMARY, summary)
    recommended = write_bundle(summary, out_dir, policy, model=c.model.name)
    return BehaviourOutputs(out_dir, out_dir / SUMMARY, policy, recommended, "")
