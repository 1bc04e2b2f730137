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

from safesteer.behaviour.study import run_study
from safesteer.errors import SafesteerError
from safesteer.io import write_json
from safesteer.layout import POLICY_DIR, SUMMARY
from safesteer.models import load_backbone
from safesteer.serve.bundle import write_bundle
from safesteer.steering.strategies import Direction, DirectionSet

BEHAVIOUR_OWN = ("refusal_caa", "refusal_dim")


@dataclass(frozen=True)
class BehaviourOutputs:
    dir: Path
    summary: Path
    policy: Path  # the service bundle: recommended.json (or NONE.txt), gate/, directions/
    recommended: bool
    skipped: str  # why the stage did not run the study ("" when it did)


def toward_refusal(directions: Any, names: Any) -> Any:
    """The named directions of a pipeline :class:`DirectionSet`, sign-flipped (α ≥ 0 adds the unsafe
    direction)."""
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
                    "behaviour_sign": "vector = -(pipeline direction toward unsafe): alpha >= 0 adds "
                    "it (toward refusal)",
                },
            )
        )
    return out


def run_behaviour_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> BehaviourOutputs:
    out_dir = Path(out_dir)
    policy = out_dir / POLICY_DIR
    c = ctx.config
    skipped = ""
    if not section.enabled:
        skipped = "[behaviour] enabled = false"
    bb = None
    if not skipped:
        bb = load_backbone(c.model.name, device=ctx.device)
        if bb.kind != "causal":
            skipped = (
                f"{c.model.name} is a {bb.kind} LM; behaviour steering is judged by generated answers "
                "(causal LMs)"
            )
    if skipped:
        ctx.say(f"behaviour: skipped ({skipped})")
        write_json(out_dir / SUMMARY, {"skipped": skipped})
        write_bundle(None, out_dir, policy, model=c.model.name)
        return BehaviourOutputs(out_dir, out_dir / SUMMARY, policy, False, skipped)

    extra = toward_refusal(DirectionSet.load(inputs["directions"].directions), section.strategies)
    summary = run_study(
        section,
        out_dir,
        model=c.model.name,
        layer=c.model.layer,
        seed=ctx.seed,
        data_dir=ctx.data_dir,
        backbone=bb,
        extra_directions=extra,
    )
    recommended = write_bundle(summary, out_dir, policy, model=c.model.name)
    return BehaviourOutputs(out_dir, out_dir / SUMMARY, policy, recommended, "")
