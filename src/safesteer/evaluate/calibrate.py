"""Choosing α per strategy on a validation split, under a fluency budget.

For each α of the grid the caller measures, on *validation* items only,

* a safety value ``s(α)`` where lower is safer (mean P(Yes) on harmful prompts, or a mean probe
  probability) — gain(α) = s(0) − s(α);
* a fluency value ``f(α)``, the mean per-token log-probability (higher is better) — the loss is the
  relative increase of the per-token NLL: loss(α) = (f(0) − f(α)) / |f(0)|.

The chosen α is the one with the largest gain among those with loss ≤ ``budget`` (ties → the
smallest |α|); if no α gains anything, α = 0 (the strategy is reported unsteered, with the reason).
Everything is then reported on a disjoint *test* split (the datasets' hash splits: validation =
``train``, report = ``test``), so the selection does not inflate the reported effect.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from safesteer.errors import SafesteerError

DEFAULT_BUDGET = 0.10
"""Default fluency budget: at most 10 % more per-token NLL than unsteered on validation texts."""


@dataclass
class AlphaPoint:
    alpha: float
    safety: float
    fluency: float
    gain: float
    loss: float
    within_budget: bool


@dataclass
class Calibration:
    strategy: str
    alpha: float
    budget: float
    points: list[AlphaPoint] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "alpha": self.alpha,
            "budget": self.budget,
            "reason": self.reason,
            "points": [asdict(p) for p in self.points],
        }


def fluency_loss(f0: float, f: float) -> float:
    """Relative per-token NLL increase: (f0 − f) / |f0| (f = mean log-prob per token)."""
    return float((f0 - f) / abs(f0)) if f0 != 0 else float(f0 - f)


def choose_alpha(points: Sequence[AlphaPoint], budget: float) -> tuple[float, str]:
    ok = [p for p in points if p.within_budget and np.isfinite(p.gain)]
    best = max((p.gain for p in ok), default=float("-inf"))
    if not ok or best <= 0.0:
        return 0.0, "no alpha of the grid lowered the safety metric within the fluency budget"
    cands = [p for p in ok if p.gain == best]
    pick = min(cands, key=lambda p: (abs(p.alpha), p.alpha))
    return float(
        pick.alpha
    ), f"largest safety gain ({best:.4f}) with fluency loss {pick.loss:.3f} <= budget {budget}"


def calibrate(
    strategy: str,
    alphas: Sequence[float],
    measure: Callable[[float], tuple[float, float]],
    budget: float = DEFAULT_BUDGET,
    baseline: tuple[float, float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Sweep ``alphas`` with ``measure(α) -> (safety, fluency)`` on validation items; pick α.

    ``baseline`` = ``measure(0)`` when already known (it is the same for every strategy).
    """
    if not alphas:
        raise SafesteerError("the alpha grid is empty; pass at least one alpha")
    if budget < 0:
        raise SafesteerError(f"the fluency budget must be >= 0, got {budget}")
    s0, f0 = baseline if baseline is not None else measure(0.0)
    points = []
    for a in alphas:
        if a == 0.0:
            s, f = s0, f0
        else:
            s, f = measure(float(a))
        loss = fluency_loss(f0, f)
        points.append(AlphaPoint(float(a), float(s), float(f), float(s0 - s), loss, bool(loss <= budget)))
        if progress is not None:
            progress(f"{strategy} alpha={a:g}: safety {s:.4f} (gain {s0 - s:+.4f}), fluency loss {loss:+.3f}")
    if all(p.alpha != 0.0 for p in points):
        points.insert(0, AlphaPoint(0.0, float(s0), float(f0), 0.0, 0.0, True))
    alpha, reason = choose_alpha(points, budget)
    return Calibration(strategy, alpha, budget, points, reason)


def random_control(
    chosen: Sequence[float],
    grid: Sequence[float],
    policy: str | float,
    budget: float,
) -> dict[str, Calibration]:
    """α of the ``random`` control, which is not calibrated (it controls for the *size* of an intervention).

    ``chosen``: the α chosen for the other direction strategies (0 = "left unsteered" is ignored),
    ``grid``: the α grid. ``policy``: a number (that α), ``"max"`` (the largest |α| chosen for any
    other strategy; the grid's largest |α| when none was chosen) or ``"each"`` (one control row
    ``random@α`` per distinct chosen α, when there are several; otherwise as ``"max"``).
    Returns the control's row name(s) → :class:`Calibration`, in report order.
    """
    chosen = [float(a) for a in chosen if a != 0.0]
    if isinstance(policy, (int, float)):
        return {"random": Calibration("random", float(policy), budget, [], "control: alpha given")}
    if policy == "each" and len(set(chosen)) > 1:
        out = {}
        for a in sorted(set(chosen), key=lambda x: (abs(x), x)):
            key = f"random@{a:g}"
            out[key] = Calibration(key, a, budget, [], "control at an alpha chosen for another strategy")
        return out
    if chosen:
        return {
            "random": Calibration(
                "random",
                max(chosen, key=abs),
                budget,
                [],
                "control: the largest |alpha| chosen for any other strategy",
            )
        }
    fallback = float(max(grid, key=abs) if len(grid) > 1 else grid[0])
    return {"random": Calibration("random", fallback, budget, [], "control: the grid's largest |alpha|")}
