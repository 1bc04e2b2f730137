"""The stage table: every knob of every config section is in exactly the keys of the stages
downstream of the stages that read it; outputs round-trip through DONE.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from safesteer.config import Config
from safesteer.pipeline.runner import STAGES, stage_keys
from safesteer.pipeline.table import BY_NAME, TABLE, downstream, dump_outputs, load_outputs

# strings that must stay valid choices when a knob is changed
OTHER = {
    "variant": "article",
    "judge": "none",
    "precision": "bf16",
    "kind": "masked",
    "source": "local",
    "dtype": "float16",
    "holdout": "id",
    "method": "nnlasso",
    "alpha_unit": "raw",
    "random_alpha": "each",
    "ci_method": "bca",
    "objective": "harm_probe",
    "device": "cpu",
}


def _changed(value, name):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.01
    if isinstance(value, str):
        return OTHER.get(name, value + "-x") if value != OTHER.get(name) else value + "-x"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value + (value or ["x"])[:1] + ["y"]
    raise TypeError(name)


def _knobs():
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), sec.name)):
            yield sec.name, f.name


def test_table_is_in_dependency_order_and_names_every_stage():
    seen: set[str] = set()
    for spec in TABLE:
        assert set(spec.inputs) <= seen, spec.name
        seen.add(spec.name)
    assert STAGES == tuple(s.name for s in TABLE) + ("report",)
    sections = {f.name for f in dataclasses.fields(Config)}
    read = {s for spec in TABLE for s in spec.section}
    # every section belongs to a stage; [run] reaches all through ctx.seed; [serve] is `safesteer serve`'s
    assert read == sections - {"run", "serve"}


@pytest.mark.parametrize("section,knob", sorted(set(_knobs())))
def test_changing_a_knob_changes_exactly_the_downstream_keys(section, knob):
    base = Config()
    before = stage_keys(base)
    cfg = Config()
    part = getattr(cfg, section)
    setattr(part, knob, _changed(getattr(part, knob), knob))
    after = stage_keys(cfg)
    changed = {n for n in before if before[n] != after[n]}
    if section == "run":
        expected = set(before) if knob == "seed" else set()  # the name and the device do not change results
    else:
        expected = downstream({s.name for s in TABLE if section in s.section})
    assert changed == expected, (section, knob)


def test_downstream_closure_matches_the_study_pipeline():
    assert downstream({"probes"}) == {"probes", "map", "atoms", "directions", "evaluate", "behaviour"}
    assert downstream({"sae"}) == {"sae", "encode", "map", "atoms", "directions", "evaluate", "behaviour"}
    assert downstream({"evaluate"}) == {"evaluate"}
    assert downstream({"behaviour"}) == {"behaviour"}
    assert downstream({"extract"}) == set(BY_NAME)


@dataclass(frozen=True)
class _Out:
    folder: Path
    files: dict[str, Path]
    n: int
    names: tuple[str, ...]


def test_outputs_round_trip_relative_to_the_run_folder(tmp_path):
    out = _Out(tmp_path / "stages" / "x-1", {"a": tmp_path / "stages" / "x-1" / "a.csv"}, 3, ("p", "q"))
    data = dump_outputs(out, tmp_path)
    assert data["folder"] == "stages/x-1" and data["files"] == {"a": "stages/x-1/a.csv"}
    assert load_outputs(_Out, data, tmp_path) == out
    moved = tmp_path / "elsewhere"
    assert load_outputs(_Out, data, moved).folder == moved / "stages" / "x-1"
