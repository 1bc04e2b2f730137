"""The ``[directions]`` section: the steering directions built from probes and atoms, validated here."""

from __future__ import annotations

from dataclasses import dataclass

from safesteer.checks import positive


@dataclass
class DirectionsSection:
    random_members: int = 2  # directions in the random control ensemble
    random_seed: int = 1234  # seed of the first random direction (offset by run.seed; member k adds k)

    def validate(self) -> "DirectionsSection":
        positive("directions.random_members", self.random_members)
        return self
