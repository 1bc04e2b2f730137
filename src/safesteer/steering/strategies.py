"""Named steering strategies: unit directions built from probes, SAE atoms, DiffMean and controls.

Sign convention (one for the whole package)
-------------------------------------------
Every stored direction ``d`` is a **unit vector pointing toward the unsafe class** (toxic /
harmful), exactly like :attr:`safesteer.probes.Probe.direction`. Steering adds

    h' = h − α · d        (α ≥ 0 steers *away* from unsafe; α < 0 pushes toward it)

to the output of block ``layer`` at every position. :func:`steering_vector` returns ``−d`` so
that ``backbone.steer(layer, steering_vector(d), alpha=α)`` applies exactly this edit.

Strategies (names of the original study)
----------------------------------------
``probe_tox``, ``probe_harm``            probe weight directions w/‖w‖ (raw activation space)
``probe_tox+harm``                       normalised sum of the two unit probe directions
``sae_{tox,harm}_{top20,all,filtered}``  mean of the unit decoder rows of the selected atoms, renormalised
``sae_tox+probe_tox``, ``sae_harm+probe_harm``, ``sae_tox+probe_harm``, ``sae_tox+sae_harm``
                                         hybrids: normalised sum of two unit directions
``diffmean_tox``, ``diffmean_harm``      μ(unsafe) − μ(safe), normalised
``random``                               control: K unit Gaussian directions from fixed seeds (same norm as
                                         all others); the suite averages their effects and its CI accounts for
                                         which directions were drawn (a single random direction has its own,
                                         consistent, first-order effect — one draw is not a null)

A :class:`DirectionSet` is saved as ``directions.safetensors`` (one float32 tensor per name) +
``directions.json`` (name → kind, layer, sources, atoms, meta) — never pickled.
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, write_json

FORMAT = "safesteer-directions"
FORMAT_VERSION = 1
RANDOM_SEED = 1234
"""Seed of the first ``random`` control direction (member k uses RANDOM_SEED + k)."""
RANDOM_MEMBERS = 4
"""Directions in the ``random`` control ensemble."""

SAE_SELECTIONS = ("top20", "all", "filtered")
HYBRIDS: dict[str, tuple[str, str]] = {
    "sae_tox+probe_tox": ("sae_tox_top20", "probe_tox"),
    "sae_harm+probe_harm": ("sae_harm_top20", "probe_harm"),
    "sae_tox+probe_harm": ("sae_tox_top20", "probe_harm"),
    "sae_tox+sae_harm": ("sae_tox_top20", "sae_harm_top20"),
}
"""Hybrid name → the two strategies summed (the SAE side uses the top-20 selection)."""

STRATEGY_NAMES: tuple[str, ...] = (
    "probe_tox",
    "probe_harm",
    "probe_tox+harm",
    *(f"sae_{c}_{s}" for c in ("tox", "harm") for s in SAE_SELECTIONS),
    *HYBRIDS,
    "diffmean_tox",
    "diffmean_harm",
    "random",
)
"""Every strategy name :func:`build_directions` knows, in report order."""


def unit(v: np.ndarray | Sequence[float], what: str = "direction") -> np.ndarray:
    """``v / ‖v‖`` as float64; a zero or non-finite vector is an error."""
    arr = np.asarray(v, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(arr))
    if not np.isfinite(norm) or norm == 0.0:
        raise SafesteerError(f"{what} has zero or non-finite norm; cannot normalise it")
    return arr / norm


def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hybrid: the normalised sum of two *unit* directions (each normalised first)."""
    ua, ub = unit(a), unit(b)
    if ua.shape != ub.shape:
        raise SafesteerError(f"cannot combine directions of sizes {ua.shape[0]} and {ub.shape[0]}")
    return unit(ua + ub, "sum of the two directions (they are opposite)")


def sae_direction(W_dec: np.ndarray, atoms: Sequence[int]) -> np.ndarray:
    """Mean of the unit decoder rows (``W_dec``: d_sae × d_in) of ``atoms``, renormalised."""
    W = _as_numpy(W_dec)
    if W.ndim != 2:
        raise SafesteerError(f"W_dec must be a 2-D (d_sae × d_in) matrix, got shape {W.shape}")
    idx = np.asarray(list(atoms), dtype=np.int64)
    if idx.size == 0:
        raise SafesteerError("no atoms selected; an SAE direction needs at least one atom")
    if idx.min() < 0 or idx.max() >= W.shape[0]:
        raise SafesteerError(f"atom index out of range 0..{W.shape[0] - 1} for this SAE")
    rows = W[idx].astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise SafesteerError("a selected atom has an all-zero decoder row")
    return unit((rows / norms).mean(axis=0), "mean of the selected decoder rows")


def random_direction(d: int, seed: int = RANDOM_SEED) -> np.ndarray:
    """Unit Gaussian direction in R^d, reproducible for ``seed``."""
    return unit(np.random.default_rng(seed).standard_normal(int(d)))


def steering_vector(direction: np.ndarray) -> np.ndarray:
    """The vector to pass to ``Backbone.steer`` so that α ≥ 0 steers away from unsafe (``−direction``)."""
    return -np.asarray(direction, dtype=np.float32)


def read_atoms(path: str | Path) -> list[int]:
    """Atom indices from a CSV with an ``atom`` column (order kept, duplicates dropped)."""
    p = Path(path)
    if not p.is_file():
        raise SafesteerError(f"missing atom selection {p}; run `safesteer atoms` first")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "atom" not in reader.fieldnames:
            raise SafesteerError(f"{p} has no 'atom' column; expected a CSV written by `safesteer atoms`")
        out: list[int] = []
        for row in reader:
            try:
                a = int(float(row["atom"]))
            except (TypeError, ValueError):
                raise SafesteerError(f"{p}: atom value {row['atom']!r} is not an integer") from None
            if a not in out:
                out.append(a)
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


@dataclass
class Direction:
    """One named unit direction (toward unsafe) at a layer, with where it came from."""

    name: str
    vector: np.ndarray
    kind: str  # probe | sae | hybrid | diffmean | random | custom
    layer: int
    sources: list[str] = field(default_factory=list)
    atoms: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    members: list[np.ndarray] = field(default_factory=list)
    """Further unit directions of an ensemble (the random control); ``vector`` is the first member."""

    def __post_init__(self) -> None:
        self.vector = unit(self.vector, f"direction '{self.name}'").astype(np.float32)
        self.members = [unit(m, f"member of '{self.name}'").astype(np.float32) for m in self.members]
        self.layer = int(self.layer)

    @property
    def steer_vector(self) -> np.ndarray:
        return steering_vector(self.vector)

    @property
    def vectors(self) -> list[np.ndarray]:
        """All unit directions: ``[vector, *members]``."""
        return [self.vector, *self.members]


class DirectionSet:
    """An ordered mapping name → :class:`Direction`, saved without pickle."""

    def __init__(self, directions: Iterable[Direction] = ()):
        self._d: dict[str, Direction] = {}
        for d in directions:
            self.add(d)

    # mapping protocol
    def add(self, d: Direction) -> None:
        if self._d:
            first = next(iter(self._d.values()))
            if d.vector.shape != first.vector.shape:
                raise SafesteerError(
                    f"direction '{d.name}' has size {d.vector.shape[0]}, the set has {first.vector.shape[0]}"
                )
        self._d[d.name] = d

    def __getitem__(self, name: str) -> Direction:
        if name not in self._d:
            raise SafesteerError(
                f"unknown strategy '{name}'; this direction set has: {', '.join(self._d) or 'nothing'}"
            )
        return self._d[name]

    def __contains__(self, name: object) -> bool:
        return name in self._d

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def names(self) -> list[str]:
        return list(self._d)

    def items(self):
        return self._d.items()

    @property
    def d_model(self) -> int | None:
        return None if not self._d else int(next(iter(self._d.values())).vector.shape[0])

    def select(self, names: Sequence[str] | None) -> "DirectionSet":
        """A sub-set in the given order (all when ``names`` is None/empty)."""
        if not names:
            return self
        return DirectionSet(self[n] for n in names)

    # I/O
    def save(self, out_dir: str | Path) -> Path:
        """Write ``directions.safetensors`` + ``directions.json`` into ``out_dir`` (atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, d in self._d.items():
            tensors[name] = np.ascontiguousarray(d.vector, dtype=np.float32)
            for k, m in enumerate(d.members, start=1):
                tensors[f"{name}#{k}"] = np.ascontiguousarray(m, dtype=np.float32)
        with atomic_path(out / "directions.safetensors") as tmp:
            save_file(tensors, str(tmp))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "d_model": self.d_model,
            "sign": "each vector is a unit direction toward unsafe; steering applies h' = h - alpha * "
            "v (alpha >= 0 = away)",
            "directions": {
                name: {
                    "kind": d.kind,
                    "layer": d.layer,
                    "sources": d.sources,
                    "atoms": [int(a) for a in d.atoms],
                    "meta": d.meta,
                    "members": len(d.members),
                }
                for name, d in self._d.items()
            },
        }
        write_json(out / "directions.json", meta)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "DirectionSet":
        """Load a folder written by :meth:`save` (or the ``directions.json`` inside it)."""
        p = Path(path)
        folder = p.parent if p.name == "directions.json" else p
        meta = read_json(folder / "directions.json")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SafesteerError(f"{folder / 'directions.json'} is not a safesteer direction set")
        st = folder / "directions.safetensors"
        if not st.is_file():
            raise SafesteerError(f"missing file {st}; rebuild the direction set")
        tensors = load_file(str(st))
        out = cls()
        for name, info in meta["directions"].items():
            if name not in tensors:
                raise SafesteerError(f"{st} lacks the vector of '{name}'; rebuild the direction set")
            members = []
            for k in range(1, int(info.get("members", 0)) + 1):
                if f"{name}#{k}" not in tensors:
                    raise SafesteerError(f"{st} lacks member {k} of '{name}'; rebuild the direction set")
                members.append(tensors[f"{name}#{k}"])
            out.add(
                Direction(
                    name,
                    tensors[name],
                    info.get("kind", "custom"),
                    int(info["layer"]),
                    list(info.get("sources", [])),
                    [int(a) for a in info.get("atoms", [])],
                    dict(info.get("meta", {})),
                    members,
                )
            )
        return out


def build_directions(
    layer: int,
    probes: Mapping[str, Any] | None = None,
    sae: Any | None = None,
    atoms: Mapping[str, Sequence[int]] | None = None,
    diffmeans: Mapping[str, np.ndarray] | None = None,
    d_model: int | None = None,
    seed: int = RANDOM_SEED,
    sources: Mapping[str, str] | None = None,
    random_members: int = RANDOM_MEMBERS,
) -> DirectionSet:
    """Every strategy that the given ingredients allow, under the study's names.

    ``probes``: concept (``tox``/``harm``) → probe (``.direction``; ``.diffmean`` is used for the
    DiffMean baseline when ``diffmeans`` lacks the concept). ``sae``: anything with ``W_dec``
    (d_sae × d_in). ``atoms``: ``"tox_top20"``, ``"harm_all"`` … → atom indices. ``sources``
    (optional) names the files each ingredient came from, for the metadata.
    Strategies whose ingredients are missing are skipped; ``random`` is always built, as an
    ensemble of ``random_members`` directions (seeds ``seed``, ``seed + 1``, …).
    """
    probes = dict(probes or {})
    atoms = dict(atoms or {})
    diffmeans = dict(diffmeans or {})
    src = dict(sources or {})
    out = DirectionSet()

    def add(
        name: str, vec: np.ndarray, kind: str, srcs: list[str], ats: Sequence[int] = (), **meta: Any
    ) -> None:
        out.add(Direction(name, vec, kind, layer, srcs, [int(a) for a in ats], dict(meta)))

    for concept in ("tox", "harm"):
        if concept in probes:
            add(
                f"probe_{concept}",
                probes[concept].direction,
                "probe",
                [src.get(f"probe_{concept}", f"probe:{concept}")],
            )
        dm = diffmeans.get(concept)
        if dm is None and concept in probes and getattr(probes[concept], "diffmean", None) is not None:
            dm = probes[concept].diffmean
        if dm is not None:
            add(f"diffmean_{concept}", dm, "diffmean", [src.get(f"probe_{concept}", f"probe:{concept}")])
    if "probe_tox" in out and "probe_harm" in out:
        add(
            "probe_tox+harm",
            combine(out["probe_tox"].vector, out["probe_harm"].vector),
            "hybrid",
            ["probe_tox", "probe_harm"],
        )

    if sae is not None:
        W = _as_numpy(sae.W_dec if hasattr(sae, "W_dec") else sae)
        for concept in ("tox", "harm"):
            for sel in SAE_SELECTIONS:
                key = f"{concept}_{sel}"
                if key in atoms and len(atoms[key]):
                    add(
                        f"sae_{key}",
                        sae_direction(W, atoms[key]),
                        "sae",
                        [src.get("sae", "sae"), src.get(key, f"atoms:{key}")],
                        atoms[key],
                        n_atoms=len(atoms[key]),
                    )
    for name, (a, b) in HYBRIDS.items():
        if a in out and b in out:
            add(name, combine(out[a].vector, out[b].vector), "hybrid", [a, b])

    d = d_model or out.d_model
    if d is None:
        raise SafesteerError("cannot build directions: give probes, an SAE or d_model")
    if random_members < 1:
        raise SafesteerError("the random control needs at least one direction")
    seeds = [seed + k for k in range(random_members)]
    out.add(
        Direction(
            "random",
            random_direction(d, seeds[0]),
            "random",
            layer,
            [f"seed:{s}" for s in seeds],
            [],
            {"seeds": seeds},
            [random_direction(d, s) for s in seeds[1:]],
        )
    )

    order = {n: i for i, n in enumerate(STRATEGY_NAMES)}
    return DirectionSet(sorted(out._d.values(), key=lambda x: order.get(x.name, len(order))))


class Intervention:
    """What to do to the backbone while a metric runs: nothing, h − α·d at a layer, or an SAE edit.

    ``alpha`` is in raw activation units here; :meth:`from_direction` takes ``scale`` (e.g. the
    layer's median token norm) so that a grid can be given in relative units.
    """

    def __init__(
        self,
        name: str = "unsteered",
        layer: int | None = None,
        vector: np.ndarray | None = None,
        alpha: float = 0.0,
        edit: Any = None,
        where: str = "all",
    ):
        from safesteer.models.hooks import check_where  # here: this module does not import torch

        self.name = name
        self.where = check_where(where)
        """Which positions are steered: ``all``, or ``prompt`` (the prompt's; answer tokens run unsteered)."""
        self.layer = layer
        self.vector = None if vector is None else np.asarray(vector, dtype=np.float32)
        self.alpha = float(alpha)
        self.edit = edit
        if (vector is not None or edit is not None) and layer is None:
            raise SafesteerError("an intervention with a vector or an edit needs a layer")

    @classmethod
    def none(cls) -> "Intervention":
        return cls()

    @classmethod
    def from_direction(
        cls,
        d: Direction,
        alpha: float,
        scale: float = 1.0,
        layer: int | None = None,
        member: int = 0,
        where: str = "all",
    ) -> "Intervention":
        """Steer away from ``d`` (its ``member``-th vector) by ``alpha * scale`` (raw units) at ``layer``
        (default: the direction's), at the positions ``where`` names."""
        vec = steering_vector(d.vectors[member])
        name = d.name if member == 0 else f"{d.name}#{member}"
        return cls(name, d.layer if layer is None else layer, vec, float(alpha) * float(scale), where=where)

    @classmethod
    def ensemble(
        cls, d: Direction, alpha: float, scale: float = 1.0, layer: int | None = None
    ) -> list["Intervention"]:
        """One intervention per vector of ``d`` (a single one for ordinary directions)."""
        return [cls.from_direction(d, alpha, scale, layer, k) for k in range(len(d.vectors))]

    @property
    def is_identity(self) -> bool:
        return self.vector is None and self.edit is None

    def apply(self, backbone):
        """Context manager installing the intervention on ``backbone`` (a no-op for the baseline)."""
        if self.is_identity:
            return contextlib.nullcontext()
        if self.edit is not None:
            return backbone.steer(self.layer, edit=self.edit, where=self.where)
        return backbone.steer(self.layer, self.vector, alpha=self.alpha, where=self.where)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "alpha_raw": self.alpha,
            "where": self.where,
            "kind": "none" if self.is_identity else ("edit" if self.edit is not None else "vector"),
        }
