"""The stage table: every pipeline stage declared once.

A stage is ``StageSpec(name, section, inputs, run, outputs)``:

* ``section``: the names of the :class:`~safesteer.config.Config` sections it reads (its cache key
  is ``asdict`` of those sections + the run seed + the keys of its inputs);
* ``inputs``: the stages whose typed outputs it reads;
* ``run(section, inputs, out_dir, ctx) -> outputs``: a function of its domain package; ``section``
  is the section dataclass (a tuple of them when it names several), ``inputs`` maps each input
  stage's name to its outputs, ``out_dir`` is the stage's own folder, ``ctx`` a :class:`Context`;
* ``outputs``: the frozen dataclass ``run`` returns (paths + small metadata). The runner saves it
  in the stage's ``DONE.json`` and reads it back on a cache hit.

Adding a stage = one output dataclass + one run function in its domain package, one config
section, one line here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from safesteer.config import Config
from safesteer.pipeline.stages.atoms import AtomsOutputs, run_atoms_stage
from safesteer.pipeline.stages.behaviour import BehaviourOutputs, run_behaviour_stage
from safesteer.pipeline.stages.directions import DirectionsOutputs, run_directions_stage
from safesteer.pipeline.stages.evaluate import EvaluateOutputs, run_evaluate_stage
from safesteer.pipeline.stages.extract import ExtractOutputs, run_extract_stage
from safesteer.pipeline.stages.map import MapOutputs, run_map_stage
from safesteer.pipeline.stages.probes import ProbesOutputs, run_probes_stage
from safesteer.pipeline.stages.sae import EncodeOutputs, SAEOutputs, run_encode_stage, run_sae_stage


@dataclass(frozen=True)
class Context:
    """What every stage may read besides its section and inputs (read-only)."""

    config: Config
    seed: int
    device: str  # resolved: "cpu", "cuda", "cuda:N"
    data_dir: Path | None  # the offline data folder, if any
    say: Callable[[str], None]
    show_progress: bool = False
    dist: Any = None  # a safesteer.distributed.Dist when run.distributed under torchrun; None: one process

    @property
    def distributed(self) -> bool:
        return self.dist is not None and self.dist.enabled


@dataclass(frozen=True)
class StageSpec:
    name: str
    section: tuple[str, ...]
    inputs: tuple[str, ...]
    run: Callable[[Any, Mapping[str, Any], Path, Context], Any]
    outputs: type
    ranks: bool = False  # every rank runs it under torchrun (else rank 0 alone, the others wait)

    def section_of(self, cfg: Config) -> Any:
        """The section dataclass (or tuple of them) that ``run`` receives."""
        parts = tuple(getattr(cfg, s) for s in self.section)
        return parts[0] if len(parts) == 1 else parts

    def params(self, cfg: Config, seed: int, has_data_dir: bool) -> dict[str, Any]:
        """The settings part of the cache key: the whole section(s), the seed, and whether an offline data
        folder is in use."""
        return {
            "sections": {s: dataclasses.asdict(getattr(cfg, s)) for s in self.section},
            "seed": seed,
            "data_dir": has_data_dir,
        }


TABLE: tuple[StageSpec, ...] = (
    StageSpec("extract", ("model", "data", "extract"), (), run_extract_stage, ExtractOutputs, ranks=True),
    StageSpec("sae", ("sae",), ("extract",), run_sae_stage, SAEOutputs, ranks=True),
    StageSpec("encode", ("encode",), ("extract", "sae"), run_encode_stage, EncodeOutputs, ranks=True),
    StageSpec("probes", ("probes",), ("extract",), run_probes_stage, ProbesOutputs),
    StageSpec("map", ("map",), ("extract", "sae", "encode", "probes"), run_map_stage, MapOutputs),
    StageSpec("atoms", ("atoms",), ("sae", "map"), run_atoms_stage, AtomsOutputs),
    StageSpec(
        "directions", ("directions",), ("sae", "probes", "atoms"), run_directions_stage, DirectionsOutputs
    ),
    StageSpec("evaluate", ("evaluate",), ("probes", "directions"), run_evaluate_stage, EvaluateOutputs),
    StageSpec("behaviour", ("behaviour",), ("directions",), run_behaviour_stage, BehaviourOutputs),
)
BY_NAME: dict[str, StageSpec] = {s.name: s for s in TABLE}


def downstream(names: set[str]) -> set[str]:
    """The given stages and every stage that reads them, directly or not."""
    out = set(names)
    for spec in TABLE:  # the table is in dependency order
        if out & set(spec.inputs):
            out.add(spec.name)
    return out


# ----------------------------------------------------------------------- outputs <-> DONE.json
def dump_outputs(outputs: Any, root: Path) -> dict[str, Any]:
    """JSON of a stage's outputs; paths relative to the run folder (the folder may move)."""
    return {f.name: _enc(getattr(outputs, f.name), root) for f in dataclasses.fields(outputs)}


def load_outputs(cls: type, data: Mapping[str, Any], root: Path) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _dec(data[f.name], hints[f.name], root) for f in dataclasses.fields(cls)})


def _enc(value: Any, root: Path) -> Any:
    if isinstance(value, Path):
        return value.relative_to(root).as_posix()
    if isinstance(value, dict):
        return {k: _enc(v, root) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_enc(v, root) for v in value]
    return value


def _dec(value: Any, hint: Any, root: Path) -> Any:
    if hint is Path:
        return root / value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is dict:
        return {k: _dec(v, args[1], root) for k, v in value.items()}
    if origin is tuple:
        return tuple(_dec(v, args[0], root) for v in value)
    if origin is typing.Union and value is not None:
        return _dec(value, next(a for a in args if a is not type(None)), root)
    return value
