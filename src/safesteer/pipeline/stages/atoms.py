"""The atoms stage: top-k, all-positive and filtered atom selections from the map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer import layout
from safesteer.cartography.atoms import run_atoms


@dataclass(frozen=True)
class AtomsOutputs:
    topk: Path
    all_positive: Path
    filtered: Path
    selected: int


def run_atoms_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> AtomsOutputs:
    model = ctx.config.model
    map_dir, sae = inputs["map"].map_dir, inputs["sae"].sae
    run_atoms(map_dir, out_dir / layout.TOPK_DIR, mode="topk", k=section.k, say=ctx.say)
    run_atoms(map_dir, out_dir / layout.ALL_POSITIVE_DIR, mode="all-positive", say=ctx.say)
    rep = run_atoms(
        map_dir,
        out_dir / layout.FILTERED_DIR,
        mode="filtered",
        sae=sae,
        candidates=section.candidates,
        judge=section.judge,
        screen=section.screen,
        model=model.name,
        judge_model=section.judge_model,
        layer=model.layer,
        alpha_scale=section.alpha_scale,
        r_threshold=section.r_threshold,
        data_dir=ctx.data_dir,
        dedup=section.dedup,
        threshold=section.threshold,
        screen_texts=section.screen_texts,
        readout_rows=section.readout_rows,
        seed=ctx.seed,
        show_progress=ctx.show_progress,
        categories=list(section.categories),
        device=ctx.device,
        say=ctx.say,
    )
    return AtomsOutputs(
        out_dir / layout.TOPK_DIR / layout.TOPK_CSV,
        out_dir / layout.ALL_POSITIVE_DIR / layout.ALL_POSITIVE_CSV,
        out_dir / layout.FILTERED_DIR / layout.FILTERED_CSV,
        int(rep["selected"]),
    )
