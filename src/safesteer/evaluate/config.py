"""The ``[evaluate]`` section: the evaluation suite of the directions stage, validated here."""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.checks import choice, positive
from safesteer.errors import SafesteerError


@dataclass
class EvaluateSection:
    strategies: list[str] = field(
        default_factory=lambda: ["probe_tox", "probe_harm", "sae_harm+probe_harm", "random"]
    )
    alphas: list[float] = field(
        default_factory=lambda: [-0.5, -0.25, 0.25]
    )  # × median token norm; > 0 = away from unsafe
    max_prompts: int = 24
    max_bias: int = 24  # CrowS-Pairs / StereoSet rows; 0 = max_prompts
    calib_prompts: int = 24  # validation items per alpha during calibration
    metrics: list[str] = field(default_factory=list)  # empty = every metric that can run
    fluency_budget: float = 0.10
    bootstrap: int = 1000
    objective: str = (
        "yes_harmful"  # calibration safety metric: yes_harmful | harm_probe | tox_probe | yes_toxic
    )
    alpha_unit: str = "norm"  # norm (× median token norm at the layer) | raw
    random_alpha: str = "max"  # α of the random control: max | each | a number as a string
    lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # SAE clamping grid
    generation: bool = False  # greedy answers + refusal rates (causal LMs; slow)
    max_new_tokens: int = 48
    ci_method: str = "percentile"  # percentile | bca
    batch_size: int = 16
    plots: bool = True

    def validate(self) -> "EvaluateSection":
        from safesteer.evaluate.suite import METRICS  # the metric registry loads torch: keeps config light

        choice("evaluate.alpha_unit", self.alpha_unit, ("norm", "raw"))
        choice("evaluate.ci_method", self.ci_method, ("percentile", "bca"))
        if self.random_alpha not in ("max", "each"):
            try:
                float(self.random_alpha)
            except ValueError:
                raise SafesteerError(
                    f"config evaluate.random_alpha = {self.random_alpha!r} is not valid; use "
                    '"max", "each" or a number'
                ) from None
        for key in ("max_prompts", "calib_prompts", "bootstrap", "batch_size"):
            positive(f"evaluate.{key}", getattr(self, key))
        if self.max_bias < 0:
            raise SafesteerError("config evaluate.max_bias must be >= 0 (0 = same as max_prompts)")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise SafesteerError(
                f"config evaluate.metrics: unknown metric {bad[0]!r}; valid choices: {', '.join(METRICS)}"
            )
        return self
