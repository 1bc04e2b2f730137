"""The metric registry: every metric group is one object, registered here once.

A *metric group* is one scoring pass over one set of items that yields one or more metrics
(e.g. the StereoSet pass yields LMS, SS and ICAT). It says

* ``name`` and ``metrics`` (:class:`MetricSpec`: name, "good" direction, label),
* ``load(split, n, cfg) -> items`` — its items of a split (``train`` = validation, ``test`` = report),
* ``score(ctx, items, intervention) -> GroupResult`` — per-item values of each metric under an
  intervention (``None`` = unsteered); ``ctx`` is the :class:`~safesteer.evaluate.evaluator.Evaluator`
  (``ctx.bb`` the backbone, ``ctx.cfg`` the :class:`~safesteer.evaluate.suite.SuiteConfig`,
  ``ctx.probes``, ``ctx.cache`` a dict for state shared between passes),
* how base and steered compare: by default the mean over items (paired bootstrap over items);
  a group whose metric is a corpus-level statistic overrides :meth:`MetricGroup.statistic`,
* optionally ``available(ctx)`` (e.g. needs a probe or a causal LM) and ``size(cfg)`` (items per split).

Adding a metric is one new class and one line::

    @register
    class MyGroup(MetricGroup):
        name = "my_group"
        metrics = (MetricSpec("my_metric", "my_group", "lower", "my metric"),)
        def load(self, split, n, cfg): ...
        def score(self, ctx, items, iv): return GroupResult(self.name, {"my_metric": values})

:data:`METRICS` (metric name → spec) is a live view of every registered group's metrics, in
registration order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from safesteer.errors import SafesteerError


@dataclass(frozen=True)
class MetricSpec:
    name: str
    group: str  # the scoring pass that produces it
    better: str  # lower | higher | fifty
    label: str
    causal_only: bool = False


@dataclass
class GroupResult:
    """Per-item outputs of one scoring pass."""

    group: str
    items: dict[str, np.ndarray]  # metric -> per-item values (mean metrics) or scores
    extra: dict[str, Any] = field(default_factory=dict)


Statistic = Callable[[np.ndarray], float]


class MetricGroup:
    """Base class of a metric group (see the module docstring)."""

    name: str = ""
    metrics: tuple[MetricSpec, ...] = ()

    def load(self, split: str, n: int, cfg: Any) -> Any:
        raise NotImplementedError

    def score(self, ctx: Any, items: Any, iv: Any) -> GroupResult:
        raise NotImplementedError

    def available(self, ctx: Any) -> bool:
        """Whether the group can run here (default: always)."""
        return True

    def size(self, cfg: Any) -> int:
        """Items per split (default: ``cfg.max_prompts``)."""
        return int(cfg.max_prompts)

    def statistic(self, metric: str, items: Any, values: np.ndarray) -> tuple[Statistic, int] | None:
        """``(stat(idx) -> float, n)`` when the metric is not the mean of ``values`` over items; else None."""
        return None


GROUPS: dict[str, MetricGroup] = {}
METRICS: dict[str, MetricSpec] = {}


def register(group: MetricGroup | type[MetricGroup]) -> Any:
    """Register a metric group (an instance, or a class with a no-argument constructor: usable as a
    decorator)."""
    obj = group() if isinstance(group, type) else group
    if not obj.name or not obj.metrics:
        raise SafesteerError(f"metric group {type(obj).__name__} needs a name and at least one metric")
    if obj.name in GROUPS:
        raise SafesteerError(f"metric group '{obj.name}' is already registered")
    clash = [m.name for m in obj.metrics if m.name in METRICS]
    if clash:
        raise SafesteerError(f"metric(s) {', '.join(clash)} of group '{obj.name}' are already registered")
    wrong = [m.name for m in obj.metrics if m.group != obj.name]
    if wrong:
        raise SafesteerError(f"metric(s) {', '.join(wrong)} name another group than '{obj.name}'")
    GROUPS[obj.name] = obj
    for m in obj.metrics:
        METRICS[m.name] = m
    return group


def unregister(name: str) -> None:
    """Remove a registered group and its metrics (tests, plug-ins)."""
    obj = GROUPS.pop(name, None)
    if obj is None:
        raise SafesteerError(f"no metric group '{name}' is registered")
    for m in obj.metrics:
        METRICS.pop(m.name, None)


def group(name: str) -> MetricGroup:
    if name not in GROUPS:
        raise SafesteerError(f"unknown metric group {name}")
    return GROUPS[name]


def group_of(metric: str) -> MetricGroup:
    return group(METRICS[metric].group)


__all__ = [
    "GROUPS",
    "GroupResult",
    "METRICS",
    "MetricGroup",
    "MetricSpec",
    "group",
    "group_of",
    "register",
    "unregister",
]
