"""Steering strategies (unit directions toward unsafe; steering applies h' = h − α·d) and SAE clamping.

>>> ds = DirectionSet.load("runs/directions")
>>> d = ds["probe_harm"]
>>> with backbone.steer(d.layer, d.steer_vector, alpha=4.0):   # α ≥ 0 = away from harm
...     ...
"""

from safesteer.steering.clamp import ClampEdit
from safesteer.steering.strategies import (
    HYBRIDS,
    RANDOM_MEMBERS,
    RANDOM_SEED,
    STRATEGY_NAMES,
    Direction,
    DirectionSet,
    Intervention,
    build_directions,
    combine,
    random_direction,
    read_atoms,
    sae_direction,
    steering_vector,
    unit,
)

__all__ = [
    "ClampEdit",
    "Direction",
    "DirectionSet",
    "Intervention",
    "HYBRIDS",
    "RANDOM_MEMBERS",
    "RANDOM_SEED",
    "STRATEGY_NAMES",
    "build_directions",
    "combine",
    "random_direction",
    "read_atoms",
    "sae_direction",
    "steering_vector",
    "unit",
]
