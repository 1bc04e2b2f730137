"""Configuration of a Gated SAE (the model), of its training run, and the pipeline's sections.

:class:`SAEConfig` is what ``cfg.json`` holds (SAELens layout plus a few safesteer fields);
:class:`TrainConfig` is everything that decides how the weights are learned (its defaults are the
paper-scale run of one SAE); :class:`SAESection` is the ``[sae]`` section of a run — a grid of
expansions × l1 and the run settings, whose defaults are the embedded default run — and makes the
trainer's config of each grid point (:meth:`SAESection.train_config`); :class:`EncodeSection` is
``[encode]``. A training run is
identified by :meth:`TrainConfig.fingerprint` -- the fields that change the weights -- so that a
checkpoint written under another configuration is refused on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from safesteer.checks import choice, positive
from safesteer.errors import SafesteerError

VARIANTS = ("paper", "article")
PRECISIONS = ("auto", "fp32", "bf16")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclass
class SAEConfig:
    """Shape and semantics of a saved SAE (the fields of ``cfg.json``).

    ``variant="paper"`` is the Gated SAE of Rajamanoharan et al. (2024); ``variant="article"`` is
    the original article's formulation, which at inference time is the same function with
    ``r_mag`` fixed at 0 (so both load in SAELens as ``architecture="gated"``).
    """

    d_in: int
    d_sae: int
    variant: str = "paper"
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"  # the training scale is folded into the weights on save
    architecture: str = "gated"
    # safesteer extras (ignored by SAELens' dataclass filter)
    scaling_factor: float = 1.0  # the factor c applied to activations during training (x_train = c * x)
    l1_coefficient: float | None = None
    expansion: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SafesteerError(
                f"unknown SAE variant {self.variant!r}; valid choices: {', '.join(VARIANTS)}"
            )
        if int(self.d_in) <= 0 or int(self.d_sae) <= 0:
            raise SafesteerError(f"SAE sizes must be positive (d_in={self.d_in}, d_sae={self.d_sae})")
        self.d_in = int(self.d_in)
        self.d_sae = int(self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_name"] = self.metadata.get("model_name")
        out["hook_name"] = self.metadata.get("hook_name")
        out["meta"] = {
            k: self.metadata.get(k) for k in ("model_name", "hook_name", "hook_layer", "dataset_path")
        }
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        if "d_in" not in d or "d_sae" not in d:
            raise SafesteerError("cfg.json lacks d_in/d_sae; it is not an SAE config")
        arch = d.get("architecture", "gated")
        if arch != "gated":
            raise SafesteerError(f"cfg.json describes a {arch!r} SAE; safesteer loads gated SAEs only")
        if d.get("normalize_activations", "none") not in ("none", None):
            raise SafesteerError(
                f"cfg.json asks for normalize_activations={d['normalize_activations']!r}; "
                "fold the scaling factor into the weights first"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        meta = dict(d.get("metadata") or {})
        for k, v in (d.get("meta") or {}).items():
            meta.setdefault(k, v)
        kwargs["metadata"] = meta
        return cls(**kwargs)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults follow the Gated SAE paper / the study)."""

    expansion: int = 32
    l1: float = 5e-5
    variant: str = "paper"
    lr: float = 3e-4
    beta1: float = 0.0  # the Gated SAE paper and dictionary_learning use Adam(beta1=0, beta2=0.999)
    beta2: float = 0.999
    eps: float = 1e-8
    lr_warmup_steps: int = 1000
    l1_warmup_steps: int = 0
    batch_size: int = 8192
    epochs: int = 5
    patience: int = 2
    seed: int = 0
    b_dec_init: str = "geometric_median"
    init_rows: int = 16384  # rows used for the scaling factor and the b_dec initialisation
    scale_activations: bool = True  # scale to unit mean squared norm (folded back on save)
    precision: str = "auto"  # auto = bf16 matmuls where the hardware has native bf16, else fp32
    sparse_threshold: float | None = None  # gate density below which the sparse step is used; None = auto
    dead_window_rows: int = 1_000_000
    checkpoint_every: int = 0  # also checkpoint every N steps (0 = only at epoch ends)
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total

    # fields that do not change the learned weights of the steps already taken: a checkpoint
    # stays valid when they change (e.g. continue the grid's best run with more epochs)
    _NON_IDENTITY = ("epochs", "patience", "checkpoint_every", "max_steps", "dead_window_rows")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (isinstance(self.expansion, (int, float)) and self.expansion > 0):
            raise SafesteerError(f"expansion must be > 0 (got {self.expansion})")
        if float(self.expansion) != int(self.expansion):
            raise SafesteerError(f"expansion must be a whole number (got {self.expansion})")
        self.expansion = int(self.expansion)
        if not (self.l1 > 0):
            raise SafesteerError(f"the L1 coefficient must be > 0 (got {self.l1})")
        if not (self.lr > 0):
            raise SafesteerError(f"the learning rate must be > 0 (got {self.lr})")
        if self.variant not in VARIANTS:
            raise SafesteerError(
                f"unknown SAE variant {self.variant!r}; valid choices: {', '.join(VARIANTS)}"
            )
        if self.precision not in PRECISIONS:
            raise SafesteerError(
                f"unknown precision {self.precision!r}; valid choices: {', '.join(PRECISIONS)}"
            )
        if self.b_dec_init not in B_DEC_INITS:
            raise SafesteerError(
                f"unknown b_dec init {self.b_dec_init!r}; valid choices: {', '.join(B_DEC_INITS)}"
            )
        if self.batch_size <= 0:
            raise SafesteerError(f"batch size must be > 0 (got {self.batch_size})")
        if self.epochs < 0 or self.patience < 1:
            raise SafesteerError(
                f"epochs must be >= 0 and patience >= 1 (got {self.epochs}, {self.patience})"
            )
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise SafesteerError("Adam betas must lie in [0, 1)")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NON_IDENTITY}

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        payload = {"train": self.identity(), "extra": extra or {}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **kw: Any) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


@dataclass
class SAESection:
    variant: str = "paper"
    expansions: list[int] = field(default_factory=lambda: [4, 8])
    l1: list[float] = field(default_factory=lambda: [3e-2, 1e-2])
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 12
    grid_epochs: int = 4
    patience: int = 3
    grid_patience: int = 2
    lr_warmup: int = 50  # linear LR warm-up steps
    l1_warmup: int = 0  # linear sparsity-coefficient warm-up steps
    shuffle_buffer: int = 4096  # rows shuffled together (0 = store order)
    val_fraction: float = 0.05  # validation split, by row id
    checkpoint_every: int = 20  # also checkpoint every N steps (0 = per epoch only)
    # fp32 (the same weights on every machine) | bf16 | auto (bf16 matmuls only with native bf16 hardware)
    precision: str = "fp32"

    def validate(self) -> "SAESection":
        choice("sae.variant", self.variant, VARIANTS)
        choice("sae.precision", self.precision, ("auto", "bf16", "fp32"))
        if not 0 <= self.val_fraction < 1:
            raise SafesteerError(f"config sae.val_fraction must be in [0, 1) (got {self.val_fraction})")
        for key in ("batch_size", "epochs", "lr"):
            positive(f"sae.{key}", getattr(self, key))
        if not self.expansions or any(e <= 0 for e in self.expansions):
            raise SafesteerError("config sae.expansions must be a non-empty list of positive integers")
        if not self.l1 or any(x <= 0 for x in self.l1):
            raise SafesteerError("config sae.l1 must be a non-empty list of positive numbers")
        return self

    def train_config(
        self, seed: int, *, expansion: int | None = None, l1: float | None = None
    ) -> TrainConfig:
        """The trainer's config of one run of this section's grid (its first point unless given)."""
        return TrainConfig(
            expansion=int(expansion if expansion is not None else self.expansions[0]),
            l1=float(l1 if l1 is not None else self.l1[0]),
            variant=self.variant,
            lr=self.lr,
            lr_warmup_steps=self.lr_warmup,
            l1_warmup_steps=self.l1_warmup,
            batch_size=self.batch_size,
            epochs=self.epochs,
            patience=self.patience,
            seed=seed,
            precision=self.precision,
            checkpoint_every=self.checkpoint_every,
        )


@dataclass
class EncodeSection:
    batch_size: int = 4096

    def validate(self) -> "EncodeSection":
        positive("encode.batch_size", self.batch_size)
        return self
