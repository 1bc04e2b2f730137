"""What every step of the behaviour study reads (:class:`Run`), and the row pickers they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from safesteer.behaviour.checkpoint import StepStore
from safesteer.behaviour.prompts import Prompts
from safesteer.steering.strategies import DirectionSet, Intervention


class StaleStep(Exception):
    """Raised by a step's ``load`` when what its record names on disk no longer matches: run it again."""


@dataclass
class Run:
    """What every step reads: the settings, the model, the judge, the output folder and the store."""

    cfg: Any  # the StudyConfig ([behaviour])
    bb: Any  # the causal LM's Backbone
    judge: Callable[[list[str], list[str]], np.ndarray]
    out: Path
    store: StepStore
    base_key: str  # the settings, model and extra directions every step depends on
    say: Callable[[str], None]
    layer: int  # the steering layer
    seed: int
    data_dir: str | None  # the offline data folder, if any
    extra_directions: Any = None

    def cached(self, name: str, key: str, compute: Callable[[], Any], save: Callable, load: Callable) -> Any:
        """``load`` the stored output of ``name`` under ``key``, else ``compute`` and ``save`` it."""
        got = self.store.load(name, key)
        if got is not None:
            try:
                value = load(*got)
            except StaleStep as why:
                self.say(f"{name}: the kept output is stale ({why}); running the step again")
            else:
                self.say(f"{name}: reusing the output kept in {self.store.root.name}/ (key {key})")
                return value
        value = compute()
        self.store.save(name, key, *save(value))
        return value

    def intervention(self, dirs: DirectionSet, scale: float, name: str, alpha: float) -> Intervention:
        return Intervention.from_direction(dirs[name], alpha, scale, where=self.cfg.steer_positions)


def per_group(
    prompts: Prompts, split: str, harmful: int, n: int, keep: Callable[[str], bool] | None = None
) -> list[int]:
    """Up to ``n`` row indices of ``split`` / class, spread evenly over the datasets (hash order);
    ``keep``: only the datasets (groups) it accepts."""
    groups = [
        g
        for g in dict.fromkeys(prompts.group)
        if (prompts.mask(group=g) & (prompts.harmful == harmful)).any() and (keep is None or keep(g))
    ]
    pools = {g: list(np.flatnonzero(prompts.mask(split, g, harmful))) for g in groups}
    out: list[int] = []
    k = 0
    while len(out) < n and any(k < len(p) for p in pools.values()):
        for g in groups:
            if k < len(pools[g]) and len(out) < n:
                out.append(int(pools[g][k]))
        k += 1
    return out
