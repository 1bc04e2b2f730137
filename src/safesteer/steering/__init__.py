"""Steering strategies (unit directions toward unsafe; steering applies h' = h − α·d) and SAE clamping.

>>> ds = DirectionSet.load("runs/directions")
>>> d = ds["probe_harm"]
>>> with backbone.steer(d.layer, d.steer_vector, alpha=4.0):   # α ≥ 0 = away from harm
...     ...
"""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "ClampEdit": "safesteer.steering.clamp",
    "HYBRIDS": "safesteer.steering.strategies",
    "RANDOM_MEMBERS": "safesteer.steering.strategies",
    "RANDOM_SEED": "safesteer.steering.strategies",
    "STRATEGY_NAMES": "safesteer.steering.strategies",
    "Direction": "safesteer.steering.strategies",
    "DirectionSet": "safesteer.steering.strategies",
    "Intervention": "safesteer.steering.strategies",
    "build_directions": "safesteer.steering.strategies",
    "combine": "safesteer.steering.strategies",
    "random_direction": "safesteer.steering.strategies",
    "read_atoms": "safesteer.steering.strategies",
    "sae_direction": "safesteer.steering.strategies",
    "steering_vector": "safesteer.steering.strategies",
    "unit": "safesteer.steering.strategies",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
