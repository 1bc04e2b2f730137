"""Runs registered metric groups on one backbone (caching items and unsteered passes) and compares them."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.evaluate import groups as _builtin_groups  # noqa: F401  (registers the built-in groups)
from safesteer.evaluate.registry import METRICS, GroupResult, group
from safesteer.evaluate.stats import bootstrap_ci, bootstrap_p_value, ensemble_bootstrap, paired_bootstrap
from safesteer.steering.strategies import Intervention


def load_eval_data(group_name: str, split: str, cfg: Any, n: int) -> Any:
    """Items for one scoring group from one split (``train`` = validation, ``test`` = report)."""
    return group(group_name).load(split, n, cfg)


class Evaluator:
    """Runs metric groups on one backbone, caching the unsteered passes."""

    def __init__(
        self,
        backbone: Any,
        cfg: Any,
        probes: dict[str, Any] | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.bb = backbone
        self.cfg = cfg
        self.probes = dict(probes or {})
        self.progress = progress or (lambda msg: None)
        self.cache: dict[str, Any] = {}  # state the groups share across passes (e.g. answer tokens)
        self._data: dict[tuple[str, str, int], Any] = {}
        self._base: dict[tuple[str, str, int], GroupResult] = {}

    def data(self, group_name: str, split: str, n: int) -> Any:
        key = (group_name, split, n)
        if key not in self._data:
            self._data[key] = load_eval_data(group_name, split, self.cfg, n)
            if not self._data[key]:
                raise SafesteerError(f"no {group_name} items in the {split} split; check the data sources")
        return self._data[key]

    def size(self, group_name: str) -> int:
        return group(group_name).size(self.cfg)

    def groups_for(self, metrics: Sequence[str]) -> list[str]:
        out: list[str] = []
        for m in metrics:
            g = METRICS[m].group
            if g not in out and group(g).available(self):
                out.append(g)
        return out

    def run_group(self, group_name: str, split: str, n: int, iv: Intervention | None) -> GroupResult:
        base = iv is None or iv.is_identity
        key = (group_name, split, n)
        if base and key in self._base:
            return self._base[key]
        items = self.data(group_name, split, n)
        res = self._score(group_name, items, iv)
        if base:
            self._base[key] = res
        return res

    def _score(self, group_name: str, items: Any, iv: Intervention | None) -> GroupResult:
        return group(group_name).score(self, items, iv)

    # ------------------------------------------------------------------ comparisons
    def compare(
        self, metric: str, base: GroupResult, steered: GroupResult | Sequence[GroupResult], items: Any
    ) -> dict[str, Any]:
        """Value with CI, baseline, paired Δ with CI and p-value, for one metric.

        ``steered`` may be a list (an ensemble such as the random control): the value is the mean
        over members and the CIs come from the two-level bootstrap (members × items). A metric is
        the mean over items unless its group's :meth:`~MetricGroup.statistic` says otherwise.
        """
        cfg = self.cfg
        members = list(steered) if isinstance(steered, (list, tuple)) else [steered]
        a = base.items[metric]
        g = group(METRICS[metric].group)
        custom = g.statistic(metric, items, a)
        if custom is not None:
            stat_a, n = custom
            stats_b = [g.statistic(metric, items, m.items[metric])[0] for m in members]
        else:
            n = len(a)
            stat_a = lambda idx, a=a: float(a[idx].mean())  # noqa: E731
            stats_b = [lambda idx, b=m.items[metric]: float(b[idx].mean()) for m in members]
        all_idx = np.arange(n)
        if len(members) == 1:
            if custom is not None:
                ci = bootstrap_ci(
                    stat=stats_b[0], n=n, n_boot=cfg.n_boot, method=cfg.ci_method, seed=cfg.seed
                )
                pair = paired_bootstrap(
                    stat=lambda idx, w: (stat_a if w == 0 else stats_b[0])(idx),
                    n=n,
                    n_boot=cfg.n_boot,
                    method=cfg.ci_method,
                    seed=cfg.seed,
                )
            else:
                b = members[0].items[metric]
                ci = bootstrap_ci(b, n_boot=cfg.n_boot, method=cfg.ci_method, seed=cfg.seed)
                pair = paired_bootstrap(a, b, n_boot=cfg.n_boot, method=cfg.ci_method, seed=cfg.seed)
            diff, p_value, baseline = pair.diff, pair.p_value, pair.baseline
        else:
            ci, _ = ensemble_bootstrap(stats_b, n, cfg.n_boot, seed=cfg.seed)
            diffs = [lambda idx, sb=sb: sb(idx) - stat_a(idx) for sb in stats_b]
            diff, boots = ensemble_bootstrap(diffs, n, cfg.n_boot, seed=cfg.seed)
            p_value, baseline = bootstrap_p_value(boots), float(stat_a(all_idx))
        se = diff.se
        z = diff.estimate / se if se and np.isfinite(se) and se > 0 else 0.0
        return {
            "metric": metric,
            "value": ci.estimate,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "n": ci.n,
            "baseline": baseline,
            "delta": diff.estimate,
            "delta_low": diff.low,
            "delta_high": diff.high,
            "delta_se": se,
            "p_value": p_value,
            "z": float(z),
            "members": len(members),
        }


__all__ = ["Evaluator", "load_eval_data"]
