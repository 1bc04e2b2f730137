"""One validated configuration object shared by every pipeline stage (TOML on disk).

Each section is the dataclass of the package it configures, defined and validated there
(``[model]``: :mod:`safesteer.models.config`, ``[data]``: :mod:`safesteer.data.config`,
``[extract]``: :mod:`safesteer.extract.config`, ``[sae]`` / ``[encode]``: :mod:`safesteer.sae.config`,
``[probes]``: :mod:`safesteer.probes.config`, ``[map]`` / ``[atoms]``:
:mod:`safesteer.cartography.config`, ``[directions]``: :mod:`safesteer.steering.config`,
``[evaluate]``: :mod:`safesteer.evaluate.config`, ``[behaviour]``: the behaviour study's own
:class:`~safesteer.behaviour.config.StudyConfig`); ``[run]`` is here. :class:`Config` gathers them,
reads and writes the TOML, and rejects unknown keys and badly typed values with one line naming the
key and the fix. The dataclass defaults *are* the embedded default run (``configs/default.toml``
spells them out; a test keeps the two equal); the CLIs read their defaults from the same classes.
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
from safesteer.data.config import DataSection
from safesteer.devices import check_device_name
from safesteer.errors import SafesteerError
from safesteer.evaluate.config import EvaluateSection
from safesteer.extract.config import ExtractSection
from safesteer.models.config import ModelSection
from safesteer.probes.config import ProbeSection
from safesteer.sae.config import EncodeSection, SAESection
from safesteer.steering.config import DirectionsSection


@dataclass
class RunSection:
    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    distributed: bool = False  # under torchrun: extract, sae and encode split across ranks (same results)


SERVE_ENGINES = ("hf", "vllm")


@dataclass
class ServeSection:
    """``[serve]``: how ``safesteer serve --run`` serves this run (CLI options override it)."""

    engine: str = "hf"  # hf: the Hugging Face model, one worker thread | vllm: vLLM's engine (the vllm extra)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int = 2048  # tokens per request (prompt + answer); longer: 422 context_length_exceeded
    max_num_seqs: int = 64  # vllm: requests batched together
    kv_cache_gb: float = 1.0  # vllm: KV cache size (RAM on the CPU backend)

    def validate(self) -> None:
        if self.engine not in SERVE_ENGINES:
            raise SafesteerError(
                f"config serve.engine = {self.engine!r} unknown; valid choices: {', '.join(SERVE_ENGINES)}"
            )
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise SafesteerError(f"config serve.{name} must be at least 1, got {getattr(self, name)}")
        if not self.kv_cache_gb > 0:
            raise SafesteerError(f"config serve.kv_cache_gb must be > 0, got {self.kv_cache_gb}")


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
    serve: ServeSection = field(default_factory=ServeSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Every section validates itself, next to its definition; the run's device here."""
        check_device_name(self.run.device, "config run.device =")
        for name in SECTIONS[1:]:
            getattr(self, name).validate()
        return self


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
"""The sections of a run's TOML, in order (``run`` first)."""


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
