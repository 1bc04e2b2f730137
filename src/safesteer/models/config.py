"""The ``[model]`` section: which backbone, which layer, validated here."""

from __future__ import annotations

from dataclasses import dataclass

from safesteer.checks import choice, positive
from safesteer.errors import SafesteerError


@dataclass
class ModelSection:
    name: str = "smollm2-135m"  # an alias (safesteer.models.registry), a hub id or a local folder
    layer: int = 15  # the output of transformer block `layer` (0-based)
    max_length: int = 64
    kind: str = "auto"  # auto | causal | masked

    def validate(self) -> "ModelSection":
        choice("model.kind", self.kind, ("auto", "causal", "masked"))
        if self.layer < 0:
            raise SafesteerError(f"config model.layer must be positive (got {self.layer})")
        positive("model.max_length", self.max_length)
        return self
