"""The evaluate stage: the direction set through the evaluation suite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer import layout
from safesteer.evaluate.directions import evaluate_directions, suite_config
from safesteer.steering.build import CONCEPTS


@dataclass(frozen=True)
class EvaluateOutputs:
    folder: Path  # results.csv/json, table.csv, calibration.json, plots/
    results: Path


def run_evaluate_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> EvaluateOutputs:
    c = ctx.config
    cfg = suite_config(section, c.model.layer, seed=ctx.seed, source=c.data.source, data_dir=ctx.data_dir)
    probe_dirs = {
        key: inputs["probes"].dirs[label] for key, label in CONCEPTS.items() if label in inputs["probes"].dirs
    }
    evaluate_directions(
        c.model.name,
        inputs["directions"].directions,
        out_dir,
        cfg,
        device=ctx.device,
        probe_dirs=probe_dirs,
        plots=section.plots,
        progress=ctx.say,
        note=ctx.say,
    )
    return EvaluateOutputs(out_dir, out_dir / layout.RESULTS_CSV)
