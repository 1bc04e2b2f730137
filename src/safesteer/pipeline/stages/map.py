"""The map stage: concept cartography over the SAE's atoms (difference of means, point-biserial r, firing
frequency)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer.cartography.map import run_map


@dataclass(frozen=True)
class MapOutputs:
    map_dir: Path  # atom_map.parquet, top_activations.parquet, summary.json, stats/, link.json
    n_atoms: int
    n_rows: int


def run_map_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> MapOutputs:
    s = run_map(
        inputs["encode"].latents,
        inputs["extract"].acts,
        out_dir,
        heldout=section.heldout,
        top_k=section.top_k,
        probe_dirs=list(inputs["probes"].dirs.values()),
        sae=inputs["sae"].sae,
        method=section.method,
        n_atoms_link=section.n_atoms_link,
        min_per_class=section.min_per_class,
        show_progress=ctx.show_progress,
        say=ctx.say,
    )
    return MapOutputs(out_dir, int(s["n_atoms"]), int(s["n_rows"]))
