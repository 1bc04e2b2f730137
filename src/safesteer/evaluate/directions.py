"""Evaluate a direction set with the suite (``safesteer evaluate`` and the evaluate stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from safesteer.devices import resolve_device
from safesteer.errors import SafesteerError
from safesteer.evaluate.suite import METRICS, SuiteConfig, run_suite, write_outputs
from safesteer.models import load_backbone
from safesteer.probes import load_probe
from safesteer.sae import load_sae
from safesteer.steering import ClampEdit, DirectionSet, Intervention


def random_alpha_value(value: str | float) -> str | float:
    """``max`` / ``each`` / a number (given as text) → the suite's ``random_alpha``."""
    if isinstance(value, (int, float)) or value in ("max", "each"):
        return value
    try:
        return float(value)
    except ValueError:
        raise SafesteerError(f"--random-alpha must be max, each or a number, got {value!r}") from None


def suite_config(
    section: Any,
    layer: int,
    *,
    seed: int,
    source: str,
    data_dir: Path | None,
    strategies: list[str] | None = None,
    metrics: list[str] | None = None,
):
    """The suite's config from an [evaluate] section (``strategies``/``metrics`` override the section's;
    an empty list of strategies = every strategy of the direction set)."""
    alphas = [float(a) for a in section.alphas]
    cfg = SuiteConfig(
        layer=layer,
        strategies=(list(section.strategies) if strategies is None else list(strategies)) or None,
        alphas=alphas,
        lambdas=[float(x) for x in section.lambdas],
        alpha_unit=section.alpha_unit,
        calibrate=len(alphas) > 1,
        objective=section.objective,
        budget=section.fluency_budget,
        random_alpha=random_alpha_value(section.random_alpha),
        max_prompts=section.max_prompts,
        max_bias=section.max_bias or None,
        calib_prompts=section.calib_prompts,
        generation=section.generation,
        max_new_tokens=section.max_new_tokens,
        n_boot=section.bootstrap,
        ci_method=section.ci_method,
        seed=seed,
        batch_size=section.batch_size,
        data_dir=str(data_dir) if data_dir else None,
        source=source,
    )
    chosen = metrics if metrics is not None else list(section.metrics)
    if chosen:
        cfg.metrics = chosen
    elif section.generation:
        cfg.metrics = list(METRICS)
    return cfg


def clamp_interventions(sae: Path, layer: int, selections: Mapping[str, list[int]]) -> dict[str, Callable]:
    """``clamp_<name>`` → λ ↦ an SAE-clamping intervention of those atoms."""
    sae_obj = load_sae(sae)
    return {
        f"clamp_{name}": (
            lambda lam, atoms=atoms, name=name: Intervention(
                f"clamp_{name}", layer, edit=ClampEdit(sae_obj, atoms, lam=lam, mode="subtract")
            )
        )
        for name, atoms in selections.items()
    }


def evaluate_directions(
    model: str,
    directions: Path,
    out: Path,
    cfg,
    *,
    device: str = "cpu",
    probe_dirs: Mapping[str, Path] | None = None,
    interventions: dict[str, Callable] | None = None,
    plots: bool = True,
    progress: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
):
    """Load the backbone and the direction set, run the suite, write its outputs. Returns (result, written
    paths)."""
    ds = DirectionSet.load(directions)
    strat = cfg.strategies
    if strat:
        for s in strat:
            if not s.startswith("clamp_"):
                ds[s]  # unknown names fail before the model loads
    layers = {ds[n].layer for n in (strat or ds.names()) if n in ds}
    if layers - {cfg.layer} and note is not None:
        note(f"directions were built for layer(s) {sorted(layers)}; steering at --layer {cfg.layer}")
    probes = {}
    if probe_dirs:
        probes = {key: load_probe(path) for key, path in probe_dirs.items()}
    if interventions and strat:
        cfg.strategies = strat + [n for n in interventions if n not in strat]
    bb = load_backbone(model, device=resolve_device(device))
    bb.check_layer(cfg.layer)
    if ds.d_model != bb.d_model:
        raise SafesteerError(
            f"directions have size {ds.d_model} but {model} has d_model {bb.d_model}; build them for "
            "this model"
        )
    result = run_suite(bb, ds, cfg, probes=probes, progress=progress, interventions=interventions)
    return result, write_outputs(result, out, plots=plots)
