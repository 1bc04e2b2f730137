"""The ``[probes]`` section: what the probes stage and ``safesteer probes`` train, validated here."""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.checks import choice
from safesteer.errors import SafesteerError


@dataclass
class ProbeSection:
    labels: list[str] = field(default_factory=lambda: ["toxicity", "harmfulness"])
    max_rows: int = 200_000
    balanced: bool = True
    cs: list[float] = field(
        default_factory=list
    )  # inverse ℓ2 strengths; one value = fixed C, several = CV, empty = default grid
    holdout: str = "auto"  # auto (datasets' test split if usable, else id hash) | dataset | id
    test_fraction: float = 0.2  # held-out share for holdout = "id"

    def validate(self) -> "ProbeSection":
        choice("probes.holdout", self.holdout, ("auto", "dataset", "id"))
        if any(c <= 0 for c in self.cs):
            raise SafesteerError(
                "config probes.cs must hold positive numbers (inverse regularisation strengths)"
            )
        return self
