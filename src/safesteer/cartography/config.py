"""The ``[map]`` and ``[atoms]`` sections: concept cartography and atom selection, validated here."""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.checks import choice, positive
from safesteer.errors import SafesteerError


@dataclass
class MapSection:
    heldout: float = 0.2  # share of rows kept apart for replication (0 = none)
    top_k: int = 10  # top-activating rows kept per atom for the cards
    method: str = "omp"  # probe decomposition: omp | omp-nonneg | nnlasso
    n_atoms_link: int = 16  # atoms per probe decomposition
    min_per_class: int = 5  # skip labels with fewer positive or negative rows

    def validate(self) -> "MapSection":
        choice("map.method", self.method, ("omp", "omp-nonneg", "nnlasso"))
        if not 0 <= self.heldout < 1:
            raise SafesteerError(f"config map.heldout must be in [0, 1) (got {self.heldout})")
        positive("map.top_k", self.top_k)
        return self


@dataclass
class AtomSection:
    k: int = 20
    candidates: int = 5
    judge: str = "offline"  # offline | openai | none
    screen: bool = True
    dedup: bool = True  # drop near-duplicate atoms by MiniLM cosine of their top texts
    threshold: float = 0.20  # de-duplication cosine-distance threshold
    categories: list[str] = field(
        default_factory=lambda: ["toxicity", "harm"]
    )  # macro-categories to draw candidates from
    judge_model: str = "smollm2-135m"  # offline judge model
    alpha_scale: float = 1.0  # screening step α = scale × the atom's largest observed activation
    r_threshold: float = 0.05  # minimum |r| on the held-out split
    screen_texts: int = 12  # validation texts per concept for screening
    readout_rows: int = 30  # texts per dataset part for the screening read-out probes

    def validate(self) -> "AtomSection":
        choice("atoms.judge", self.judge, ("offline", "openai", "none"))
        for key in ("k", "candidates", "screen_texts", "readout_rows"):
            positive(f"atoms.{key}", getattr(self, key))
        return self
