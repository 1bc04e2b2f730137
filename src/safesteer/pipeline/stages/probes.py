"""The probes stage: one logistic probe per label on the activation store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer import layout
from safesteer.io import write_json
from safesteer.probes.train import run_probe


@dataclass(frozen=True)
class ProbesOutputs:
    dirs: dict[str, Path]  # label -> probe folder (probe.json, direction.npy, diffmean.npy, metrics.json)
    metrics: Path


def run_probes_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> ProbesOutputs:
    metrics = {
        label: run_probe(
            inputs["extract"].acts,
            label,
            out_dir / label,
            balanced=section.balanced,
            seed=ctx.seed,
            holdout=section.holdout,
            test_fraction=section.test_fraction,
            max_rows=section.max_rows,
            cs=list(section.cs) or None,
        )
        for label in section.labels
    }
    write_json(out_dir / layout.PROBE_METRICS, metrics)
    return ProbesOutputs({label: out_dir / label for label in section.labels}, out_dir / layout.PROBE_METRICS)
