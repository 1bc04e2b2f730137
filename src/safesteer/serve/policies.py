"""Steering policies for the runtime service, and a store that swaps them atomically.

A :class:`Policy` is what a client selects per request: named directions (from the served
:class:`~safesteer.steering.DirectionSet`), the layer they act on, α (raw activation units, the
package's sign convention: α ≥ 0 steers *away* from unsafe, ``h' = h − α·d``), optional SAE atom
clamps, and an optional *condition* — steer a text only when a probe's probability (or logit) on
the unsteered prompt exceeds a threshold (conditional steering, applied by
:func:`safesteer.steering.condition.conditional`, the evaluation's implementation). Several directions are
combined as the normalised sum of their unit vectors (the package's hybrid rule); an ensemble direction (the
``random`` control) contributes its first vector.

:class:`PolicyStore` keeps ``name → PolicyRecord`` in a dict that is **never mutated**: a write
builds a new dict and replaces the reference under a lock (copy-on-write). A reader takes one
record object at the start of a request and keeps it, so it sees the old policy or the new one,
never a mix. Each write gets a new, store-wide increasing ``version``. With a folder, every
policy is also a JSON file ``<name>.json`` written atomically (temp file + rename) before the swap.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safesteer.errors import SafesteerError
from safesteer.io import read_json, write_json
from safesteer.steering import unit
from safesteer.steering.conversation import GATE_WINDOW

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
FILE_FORMAT = "safesteer-policy"
MAX_DIRECTIONS = 16
MAX_CLAMPS = 8
MAX_ATOMS = 4096


class PolicyStorageError(SafesteerError):
    """The policy folder could not be written (a server-side problem, not a bad policy)."""


def valid_name(name: str) -> bool:
    """Policy names: 1–64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit (safe as a file name)."""
    return isinstance(name, str) and bool(_NAME_RE.fullmatch(name)) and name not in (".", "..")


class ConditionSpec(BaseModel):
    """Steer a text only when the (unsteered) prompt passes ``probe``'s gate.

    Either ``threshold`` (steer when P(probe) > threshold) or ``score_threshold`` (steer when the
    probe's logit ``w·h + b`` > score_threshold, exact for a gate calibrated on logits). The probe
    reads its layer pooled at ``position`` (default: the probe's own, ``mean`` for probe folders,
    the recorded one for gates): ``prompt_end`` reads the chat template's tokens after the user turn,
    ``prompt`` the user turn and those tokens.
    """

    model_config = ConfigDict(extra="forbid")

    probe: str = Field(min_length=1, max_length=128, description="Name of a probe loaded by the server.")
    threshold: Optional[float] = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="Steer when P(probe) > threshold."
    )
    score_threshold: Optional[float] = Field(
        None, allow_inf_nan=False, description="Steer when the probe's logit > score_threshold."
    )
    position: Optional[Literal["mean", "last", "prompt_end", "prompt"]] = Field(
        None, description="Where the probe reads (default: the probe's own)."
    )
    window: int = Field(
        GATE_WINDOW,
        ge=1,
        le=32,
        description="In a chat, the last `window` user turns the probe reads, joined (one turn: the last).",
    )
    segments: bool = Field(
        False,
        description="Also read each sentence, line and after-colon clause of the text alone; steer when "
        "any of them (or the whole) passes the threshold (the behaviour study's segmented gate).",
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> "ConditionSpec":
        if (self.threshold is None) == (self.score_threshold is None):
            raise ValueError(
                "a condition needs exactly one of 'threshold' (probability) or 'score_threshold' (logit)"
            )
        return self


class Clamp(BaseModel):
    """SAE atom clamping (see :class:`safesteer.steering.ClampEdit`) at the policy's layer."""

    model_config = ConfigDict(extra="forbid")

    atoms: list[int] = Field(min_length=1, max_length=MAX_ATOMS, description="SAE atom indices.")
    lam: float = Field(1.0, ge=0.0, le=1e6, allow_inf_nan=False, description="Clamp strength λ.")
    mode: Literal["subtract", "scale", "zero"] = "subtract"
    floor: Optional[float] = Field(
        0.0, allow_inf_nan=False, description="subtract mode: codes never go below this (null: no floor)."
    )

    @field_validator("atoms")
    @classmethod
    def _atoms(cls, v: list[int]) -> list[int]:
        if any(a < 0 for a in v):
            raise ValueError("atom indices must be >= 0")
        return list(dict.fromkeys(v))


class PolicyBody(BaseModel):
    """A policy as sent to ``PUT /v1/policies/{name}`` (the name comes from the path)."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = Field(None, description="Optional; must equal the name in the path when given.")
    description: str = Field("", max_length=1000)
    directions: list[str] = Field(
        default_factory=list,
        max_length=MAX_DIRECTIONS,
        description="Direction names from the served direction set; several are combined as the "
        "normalised sum.",
    )
    layer: Optional[int] = Field(
        None, ge=0, description="Steering layer (0-based block output); default: the directions' layer."
    )
    alpha: float = Field(
        0.0,
        allow_inf_nan=False,
        description="Steering strength in raw activation units; >= 0 steers away from unsafe.",
    )
    alpha_min: Optional[float] = Field(
        None, allow_inf_nan=False, description="Lowest alpha a request may ask for (default: -server limit)."
    )
    alpha_max: Optional[float] = Field(
        None, allow_inf_nan=False, description="Highest alpha a request may ask for (default: +server limit)."
    )
    clamps: list[Clamp] = Field(
        default_factory=list, max_length=MAX_CLAMPS, description="SAE atom clamps (need a server SAE)."
    )
    condition: Optional[ConditionSpec] = None
    positions: Literal["all", "prompt"] = Field(
        "all",
        description="Steer every position, or the prompt's only "
        "(the answer tokens are then generated unsteered, on the steered context).",
    )

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: list[str]) -> list[str]:
        if any(not isinstance(x, str) or not x or len(x) > 128 for x in v):
            raise ValueError("direction names must be non-empty strings of at most 128 characters")
        if len(set(v)) != len(v):
            raise ValueError("direction names must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PolicyBody":
        if not self.directions and not self.clamps:
            raise ValueError("a policy needs at least one direction or one clamp")
        lo = -math.inf if self.alpha_min is None else self.alpha_min
        hi = math.inf if self.alpha_max is None else self.alpha_max
        if lo > hi:
            raise ValueError(f"alpha_min ({lo}) is greater than alpha_max ({hi})")
        if not lo <= self.alpha <= hi:
            raise ValueError(f"alpha {self.alpha} is outside the policy's bounds [{lo}, {hi}]")
        return self


class Policy(PolicyBody):
    """A named, validated steering policy."""

    name: str = Field(
        pattern=NAME_PATTERN, description="1-64 of A-Z a-z 0-9 _ . - (starts with a letter or digit)."
    )

    @classmethod
    def from_body(cls, name: str, body: PolicyBody | Mapping[str, Any]) -> "Policy":
        """The policy ``name`` from a PUT body; a body naming another policy is an error."""
        data = body.model_dump() if isinstance(body, BaseModel) else dict(body)
        if data.get("name") not in (None, name):
            raise SafesteerError(
                f"the body names policy '{data['name']}' but the path names '{name}'; drop the name or "
                "make them equal"
            )
        data["name"] = name
        return cls.model_validate(data)


@dataclass(frozen=True)
class PolicyRecord:
    """One published version of a policy. ``runtime`` is the server's compiled form (tensors …)."""

    policy: Policy
    version: int
    updated_at: float
    runtime: Any = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.policy.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "updated_at": self.updated_at,
            "policy": self.policy.model_dump(exclude={"name"}),
        }

    def to_file(self) -> dict[str, Any]:
        return {"format": FILE_FORMAT, **self.to_dict()}


Compiler = Callable[[Policy], Any]


class PolicyStore:
    """name → :class:`PolicyRecord`, swapped atomically (copy-on-write), optionally backed by a folder.

    ``compiler`` (set by the server with :meth:`bind`) validates a policy against what is loaded
    (directions, probes, SAE, α limits) and returns its runtime form; it raises
    :class:`~safesteer.errors.SafesteerError` to refuse the policy.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        policies: Mapping[str, Policy] | list[Policy] | None = None,
        compiler: Compiler | None = None,
    ):
        self.folder = Path(folder) if folder is not None else None
        self._write_lock = threading.Lock()
        self._records: Mapping[str, PolicyRecord] = {}
        self._version = 0
        self._compiler = compiler
        self.swaps = 0
        """Successful writes (put + delete) since start."""
        loaded: list[tuple[Policy, int, float]] = []
        if self.folder is not None:
            loaded.extend(self._read_folder())
        if policies:
            loaded.extend(
                (p, 0, time.time())
                for p in (policies.values() if isinstance(policies, Mapping) else policies)
            )
        self._version = max([v for _, v, _ in loaded], default=0)
        records: dict[str, PolicyRecord] = {}
        for pol, version, ts in loaded:
            records[pol.name] = PolicyRecord(pol, version or self._next_version(), ts, self._compile(pol))
        self._records = records

    # ------------------------------------------------------------------ folder
    def _path(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{name}.json"

    def _read_folder(self) -> list[tuple[Policy, int, float]]:
        assert self.folder is not None
        if self.folder.exists() and not self.folder.is_dir():
            raise SafesteerError(f"policies folder {self.folder} is a file; pass a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        out = []
        for path in sorted(self.folder.glob("*.json")):
            if path.name.startswith("."):
                continue  # temp files of an interrupted atomic write
            raw = read_json(path)
            if not isinstance(raw, dict):
                raise SafesteerError(f"{path} is not a policy file (expected a JSON object)")
            data = dict(raw.get("policy", raw)) if raw.get("format") == FILE_FORMAT else dict(raw)
            if raw.get("format") == FILE_FORMAT:
                data.setdefault("name", raw.get("name"))
            data.setdefault("name", path.stem)
            if data["name"] != path.stem:
                raise SafesteerError(
                    f"{path} holds policy '{data['name']}'; rename the file to {data['name']}.json"
                )
            try:
                pol = Policy.model_validate(data)
            except ValidationError as exc:
                raise SafesteerError(
                    f"{path} is not a valid policy: {format_validation_error(exc)}"
                ) from None
            ver = raw.get("version") if raw.get("format") == FILE_FORMAT else None
            ts = raw.get("updated_at")
            out.append(
                (
                    pol,
                    ver if isinstance(ver, int) and not isinstance(ver, bool) and ver > 0 else 0,
                    float(ts) if isinstance(ts, (int, float)) else path.stat().st_mtime,
                )
            )
        return out

    # ---------------------------------------------------------------- compile
    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def _compile(self, pol: Policy) -> Any:
        return None if self._compiler is None else self._compiler(pol)

    def bind(self, compiler: Compiler) -> None:
        """Set the compiler and compile every stored policy (a refused one names itself)."""
        with self._write_lock:
            records = {}
            for name, rec in self._records.items():
                try:
                    runtime = compiler(rec.policy)
                except SafesteerError as exc:
                    where = f" ({self._path(name)})" if self.folder is not None else ""
                    raise SafesteerError(f"policy '{name}'{where} cannot be served: {exc.message}") from None
                records[name] = PolicyRecord(rec.policy, rec.version, rec.updated_at, runtime)
            self._compiler = compiler
            self._records = records

    # ------------------------------------------------------------------ reads
    def get(self, name: str) -> PolicyRecord | None:
        """The current record (a snapshot: keep the object for the whole request)."""
        return self._records.get(name)

    def snapshot(self) -> Mapping[str, PolicyRecord]:
        """The whole current mapping (never mutated after publication)."""
        return self._records

    def names(self) -> list[str]:
        return sorted(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[PolicyRecord]:
        return iter(self._records.values())

    @property
    def version(self) -> int:
        """The highest version handed out so far."""
        return self._version

    # ----------------------------------------------------------------- writes
    def put(self, policy: Policy) -> tuple[PolicyRecord, bool]:
        """Validate, persist and publish ``policy``; returns (record, created)."""
        runtime = self._compile(policy)  # outside the lock: may be slow-ish, touches no shared state
        with self._write_lock:
            record = PolicyRecord(policy, self._next_version(), time.time(), runtime)
            if self.folder is not None:
                try:
                    write_json(self._path(policy.name), record.to_file())
                except SafesteerError as exc:
                    raise PolicyStorageError(exc.message) from None
            new = dict(self._records)
            created = policy.name not in new
            new[policy.name] = record
            self._records = new  # the atomic swap: one reference assignment
            self.swaps += 1
        return record, created

    def delete(self, name: str) -> PolicyRecord | None:
        """Remove ``name`` (file first, then the in-memory entry); None when it did not exist."""
        with self._write_lock:
            record = self._records.get(name)
            if record is None:
                return None
            if self.folder is not None:
                try:
                    self._path(name).unlink(missing_ok=True)
                except OSError as exc:
                    raise PolicyStorageError(
                        f"cannot delete {self._path(name)}: {exc.strerror or exc}"
                    ) from exc
            new = dict(self._records)
            del new[name]
            self._version += 1
            self._records = new
            self.swaps += 1
        return record


def format_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """One line from a pydantic error: ``field: message; field: message``."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def policy_direction(names: list[str], directions: list[Any], layer: int | None) -> tuple[int | None, Any]:
    """A policy's steering layer and unit vector: its directions' normalised sum of unit vectors (the
    package's hybrid rule; one direction is used as is). ``layer`` None: the directions' own layer,
    which must then agree."""
    if layer is None:
        layers = {d.layer for d in directions}
        if len(layers) > 1:
            raise SafesteerError(
                f"directions {names} were built for different layers {sorted(layers)}; set the "
                "policy's 'layer'"
            )
        layer = directions[0].layer
    if len(directions) == 1:
        return layer, directions[0].vector
    return layer, unit(np.sum([unit(d.vector) for d in directions], axis=0), "sum of the policy's directions")
