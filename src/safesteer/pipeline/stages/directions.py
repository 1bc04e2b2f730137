"""The directions stage: probe, SAE and hybrid steering directions from the probes and atom selections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer.steering import read_atoms
from safesteer.steering.build import CONCEPTS, directions_from_files, split_atom_selections


@dataclass(frozen=True)
class DirectionsOutputs:
    directions: Path  # directions.safetensors + directions.json
    names: tuple[str, ...]


def run_directions_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> DirectionsOutputs:
    a = inputs["atoms"]
    csvs = split_atom_selections({"top20": a.topk, "all": a.all_positive, "filtered": a.filtered}, out_dir)
    probe_dirs = {
        key: inputs["probes"].dirs[label] for key, label in CONCEPTS.items() if label in inputs["probes"].dirs
    }
    ds = directions_from_files(
        ctx.config.model.layer,
        probe_dirs=probe_dirs,
        sae=inputs["sae"].sae,
        atoms={name: read_atoms(path) for name, path in csvs.items()},
        seed=section.random_seed + ctx.seed,
        random_members=section.random_members,
    )
    ds.save(out_dir)
    return DirectionsOutputs(out_dir, tuple(ds.names()))
