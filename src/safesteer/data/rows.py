"""Rows of several datasets for one extraction, and the check that this machine can serve them."""

from __future__ import annotations

import os
from pathlib import Path

from safesteer import net  # net.hub_reachable looked up per call: tests patch it
from safesteer.data import available_sources, load
from safesteer.errors import SafesteerError


def dataset_rows(
    names: list[str], split: str, max_rows: int | None, seed: int, source: str, data_dir: Path | None
):
    """(dataset, Record) pairs of several datasets, each sampled to ``max_rows``, in a fixed order."""
    for name in names:
        for rec in load(name, split=split, source=source, data_dir=data_dir, max_rows=max_rows, seed=seed):
            yield name, rec


def run_data_dir(configured: str) -> Path | None:
    """The offline data folder of a run: the config's ``data.data_dir``, else $SAFESTEER_DATA_DIR (if it
    exists)."""
    value = configured or os.environ.get("SAFESTEER_DATA_DIR", "")
    return Path(value) if value and Path(value).is_dir() else None


def check_sources(names: list[str], source: str, data_dir: Path | None) -> None:
    """Fail in one line, before any work, when a dataset has no source that can serve it here."""
    wanted = {"local", "pypi"} if source == "auto" else {source}
    offline = [
        n for n in names if not set(available_sources(n, str(data_dir) if data_dir else None)) & wanted
    ]
    if offline and (source != "auto" or not net.hub_reachable()):
        raise SafesteerError(
            f"no {source if source != 'auto' else 'offline'} source can serve {', '.join(offline)} here"
            + (" and the Hugging Face hub is not reachable" if source == "auto" else "")
            + "; set SAFESTEER_DATA_DIR (or [data] data_dir) to a data folder such as ../shared/data, "
            "or drop them from data.sae_datasets"
        )
