"""The evaluation suite: strategies × metrics, α calibrated on validation, reported on test with CIs.

Metrics: the registered metric groups (:mod:`.registry`; built-ins and their table in :mod:`.groups`).

Every steered number comes with a 95 % bootstrap CI and a *paired* bootstrap comparison with the
unsteered model on the same test items (Δ, its CI, a two-sided p-value). Per strategy, α is chosen
on the validation split (``train`` hash split of each dataset) by :mod:`.calibrate`; the ``random``
control is not calibrated — it uses the largest α chosen for any other strategy, so that it
controls for the *size* of the intervention. α is given in units of the layer's median token norm
(``alpha_unit="norm"``, measured on validation WikiText passages) or in raw units.

The entanglement matrix holds, for each strategy and metric, z = Δ / SE(Δ) (SE of the paired
bootstrap): how clearly a strategy moves each metric, whatever its units.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.evaluate.calibrate import DEFAULT_BUDGET, Calibration, calibrate, random_control
from safesteer.evaluate.evaluator import Evaluator, load_eval_data
from safesteer.evaluate.groups import HARMFUL_SETS
from safesteer.evaluate.outputs import SuiteResult, _jsonable_extra, _merge_extras, write_outputs
from safesteer.evaluate.registry import METRICS, GroupResult, MetricSpec
from safesteer.steering.strategies import Direction, DirectionSet, Intervention


def default_metrics() -> list[str]:
    """Every registered metric that does not need generation (read at each SuiteConfig(): plug-ins count)."""
    return [m for m in METRICS if not METRICS[m].causal_only]


DEFAULT_METRICS = tuple(default_metrics())  # the built-ins' defaults, at import
DEFAULT_ALPHAS = (-1.0, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1.0)
"""α grid in norm units. Negative values (toward the unsafe direction) are included on purpose: on chat
models adding a harm direction can *raise* refusals (Arditi et al. 2024), so the sign is left to the
validation data; the report states the chosen α and its sign."""
SAFETY_OBJECTIVES = ("yes_harmful", "harm_probe", "tox_probe", "yes_toxic")


@dataclass
class SuiteConfig:
    """What to run. ``alphas`` in ``alpha_unit`` (``norm``: × the layer's median token norm)."""

    layer: int
    strategies: list[str] | None = None
    metrics: list[str] = field(default_factory=default_metrics)
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # grid of SAE clamping strategies
    alpha_unit: str = "norm"
    calibrate: bool = True
    objective: str = "yes_harmful"
    budget: float = DEFAULT_BUDGET
    random_alpha: str | float = (
        "max"  # "max": largest chosen |α|; "each": one random row per chosen α; or a number
    )
    max_prompts: int = 100
    max_bias: int | None = None  # rows of CrowS / StereoSet (None: max_prompts)
    calib_prompts: int = 40
    generation: bool = False  # refusal_* metrics run only when True (and the LM is causal)
    max_new_tokens: int = 48
    n_boot: int = 2000
    ci_method: str = "percentile"
    seed: int = 0
    batch_size: int = 16
    data_dir: str | None = None
    source: str = "auto"

    def check(self, kind: str) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise SafesteerError(
                f"unknown metric(s) {', '.join(unknown)}; valid choices: {', '.join(METRICS)}"
            )
        if self.alpha_unit not in ("norm", "raw"):
            raise SafesteerError(f"alpha unit must be 'norm' or 'raw', got '{self.alpha_unit}'")
        if self.objective not in SAFETY_OBJECTIVES:
            raise SafesteerError(
                f"unknown calibration objective '{self.objective}'; valid choices: "
                f"{', '.join(SAFETY_OBJECTIVES)}"
            )
        if not self.alphas:
            raise SafesteerError("no alpha given; pass at least one")
        if not isinstance(self.random_alpha, (int, float)) and self.random_alpha not in ("max", "each"):
            raise SafesteerError(f"random alpha must be 'max', 'each' or a number, got {self.random_alpha!r}")
        if self.max_prompts < 2:
            raise SafesteerError("--max-prompts must be at least 2 (CIs need several items)")


# -------------------------------------------------------------------------------------- the suite


def reference_norm(backbone: Any, layer: int, texts: Sequence[str], max_texts: int = 16) -> float:
    """Median L2 norm of layer-``layer`` token vectors over ``texts`` (real tokens only)."""
    enc = backbone.tokenize(list(texts)[:max_texts], max_length=128)
    h = backbone.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer]
    norms = h.float().norm(dim=-1)[enc.attention_mask.bool()]
    return float(torch.median(norms))


def run_suite(
    backbone: Any,
    directions: DirectionSet,
    cfg: SuiteConfig,
    probes: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    interventions: dict[str, Callable[[float], Intervention]] | None = None,
) -> SuiteResult:
    """Calibrate α per strategy on validation, evaluate every metric on test, compare to unsteered.

    ``interventions`` (optional): extra strategies as ``name -> (alpha -> Intervention)`` (e.g. SAE
    clamping with λ = alpha); they are calibrated and reported like the direction strategies.

    Every steered pass reuses the unsteered pass's blocks ``0..layer`` over the same items
    (:meth:`Backbone.prefix_cache`), which roughly halves the cost of a mid-layer evaluation.
    """
    cache = getattr(backbone, "prefix_cache", None)
    with cache(cfg.layer) if cache is not None else contextlib.nullcontext():
        return _run_suite(backbone, directions, cfg, probes, progress, interventions)


def _run_suite(backbone, directions, cfg, probes, progress, interventions) -> SuiteResult:
    cfg.check(backbone.kind)
    say = progress or (lambda msg: None)
    ev = Evaluator(backbone, cfg, probes, say)
    names = _strategy_names(directions, cfg, interventions)
    groups = ev.groups_for(cfg.metrics)
    if not groups:
        raise SafesteerError(
            "no metric can run here (probe metrics need --probe-tox/--probe-harm; generation needs a "
            "causal LM)"
        )
    scale = 1.0
    if cfg.alpha_unit == "norm":
        scale = reference_norm(backbone, cfg.layer, ev.data("fluency", "train", max(4, cfg.calib_prompts)))
        say(f"alpha unit: median token norm at layer {cfg.layer} = {scale:.2f}")

    def make_ivs(name: str, alpha: float) -> list[Intervention]:
        if interventions and name in interventions:
            return [interventions[name](alpha)]
        d: Direction = directions[name.split("@", 1)[0]]
        return Intervention.ensemble(d, alpha, scale, layer=cfg.layer)

    names, calibrations = calibrate_strategies(ev, names, make_ivs, interventions or {})
    rows, baseline, extras = score_strategies(ev, groups, names, calibrations, make_ivs)
    conf = asdict(cfg)
    conf.update({"model_kind": backbone.kind, "model": getattr(backbone, "name", "?"), "alpha_scale": scale})
    return SuiteResult(rows, calibrations, baseline, extras, conf, scale)


def _strategy_names(directions: DirectionSet, cfg: SuiteConfig, interventions: dict | None) -> list[str]:
    names = list(cfg.strategies) if cfg.strategies else directions.names()
    for n in names:
        if n not in directions and not (interventions and n in interventions):
            directions[n]  # raises the one-line error listing what exists
    if interventions:
        names += [n for n in interventions if n not in names and (not cfg.strategies or n in cfg.strategies)]
    return names


MakeIvs = Callable[[str, float], "list[Intervention]"]


def calibrate_strategies(
    ev: Evaluator, names: list[str], make_ivs: MakeIvs, interventions: dict[str, Any]
) -> tuple[list[str], dict[str, Calibration]]:
    """α per strategy on the validation split (the ``random`` control by :func:`random_control`).

    Returns the strategy names in report order (``random`` may become one ``random@α`` per chosen α)
    and their calibrations.
    """
    cfg, say = ev.cfg, ev.progress
    obj_group, nc = METRICS[cfg.objective].group, cfg.calib_prompts

    def members(group: str, ivs: list[Intervention]) -> list[GroupResult]:
        return [ev.run_group(group, "train", nc, iv) for iv in ivs]

    def measure(name: str):
        def m(alpha: float) -> tuple[float, float]:
            ivs = make_ivs(name, alpha)
            s = float(np.mean([np.mean(r.items[cfg.objective]) for r in members(obj_group, ivs)]))
            f = float(np.mean([np.mean(r.items["fluency"]) for r in members("fluency", ivs)]))
            return s, f

        return m

    def grid(name: str) -> list[float]:
        return list(cfg.lambdas) if name in interventions else list(cfg.alphas)

    calibrations: dict[str, Calibration] = {}
    base_val: tuple[float, float] | None = None
    for name in names:
        g = grid(name)
        if name == "random" or not (cfg.calibrate and len(g) > 1):
            continue
        if base_val is None:
            if obj_group not in ev.groups_for([cfg.objective]):
                raise SafesteerError(
                    f"calibration objective '{cfg.objective}' cannot run here (its probe is missing)"
                )
            base_val = (
                float(np.mean(ev.run_group(obj_group, "train", nc, None).items[cfg.objective])),
                float(np.mean(ev.run_group("fluency", "train", nc, None).items["fluency"])),
            )
        say(f"calibrating {name} on validation ({len(g)} values)")
        calibrations[name] = calibrate(name, g, measure(name), cfg.budget, base_val, say)
    for name in names:
        if name in calibrations or name == "random":
            continue
        calibrations[name] = Calibration(
            name, float(grid(name)[0]), cfg.budget, [], "fixed value (no calibration)"
        )
    if "random" in names:
        chosen = [c.alpha for n, c in calibrations.items() if n not in interventions]
        control = random_control(chosen, cfg.alphas, cfg.random_alpha, cfg.budget)
        if "random" not in control:
            names = [n for n in names if n != "random"] + list(control)
        calibrations.update(control)
    return names, calibrations


def score_strategies(
    ev: Evaluator,
    groups: list[str],
    names: list[str],
    calibrations: dict[str, Calibration],
    make_ivs: MakeIvs,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The test split: the unsteered model, then each strategy at its α, compared item by item."""
    cfg, say = ev.cfg, ev.progress
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {"strategies": {}}
    say("scoring the unsteered model on the test split")
    base_results = {g: ev.run_group(g, "test", ev.size(g), None) for g in groups}
    baseline: dict[str, Any] = {"groups": {g: _jsonable_extra(r.extra) for g, r in base_results.items()}}
    for g, r in base_results.items():
        items = ev.data(g, "test", ev.size(g))
        rows += [
            {"strategy": "unsteered", "alpha": 0.0, "alpha_raw": 0.0, **ev.compare(metric, r, r, items)}
            for metric in r.items
            if metric in cfg.metrics
        ]
    for name in names:
        cal = calibrations[name]
        ivs = make_ivs(name, cal.alpha)
        raw = ivs[0].alpha
        say(
            f"evaluating {name} at alpha={cal.alpha:g} on the test split"
            + (f" ({len(ivs)} directions)" if len(ivs) > 1 else "")
        )
        info = extras["strategies"][name] = {
            "alpha": cal.alpha,
            "alpha_raw": raw,
            "members": len(ivs),
            "groups": {},
        }
        for g in groups:
            n = ev.size(g)
            res = [ev.run_group(g, "test", n, iv) for iv in ivs] if cal.alpha != 0.0 else [base_results[g]]
            items = ev.data(g, "test", n)
            info["groups"][g] = _merge_extras([r.extra for r in res])
            rows += [
                {
                    "strategy": name,
                    "alpha": cal.alpha,
                    "alpha_raw": raw,
                    **ev.compare(metric, base_results[g], res, items),
                }
                for metric in res[0].items
                if metric in cfg.metrics
            ]
    return rows, baseline, extras


__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_METRICS",
    "Evaluator",
    "GroupResult",
    "HARMFUL_SETS",
    "METRICS",
    "MetricSpec",
    "SAFETY_OBJECTIVES",
    "SuiteConfig",
    "SuiteResult",
    "calibrate_strategies",
    "default_metrics",
    "load_eval_data",
    "reference_norm",
    "run_suite",
    "score_strategies",
    "write_outputs",
]
