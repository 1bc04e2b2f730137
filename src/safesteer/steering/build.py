"""Build a direction set from files: probe folders, an SAE folder and atom-selection CSVs
(``safesteer directions`` and the directions stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path
from safesteer.probes import load_probe
from safesteer.sae import load_sae
from safesteer.steering import build_directions

CONCEPTS = {"tox": "toxicity", "harm": "harmfulness"}
"""Direction-set concept key → probe label."""
FILTERED_CATEGORY = {"tox": "toxicity", "harm": "harm"}
"""Direction-set concept key → macro-category of the filtered selection."""
SELECTIONS = ("top20", "all", "filtered")


def directions_from_files(
    layer: int,
    *,
    probe_dirs: Mapping[str, Path] | None = None,
    sae: Path | None = None,
    atoms: Mapping[str, list[int]] | None = None,
    d_model: int | None = None,
    seed: int,
    random_members: int,
):
    """The direction set of the given ingredients. ``probe_dirs``: concept (``tox``/``harm``) → probe folder;
    ``atoms``: ``tox_top20`` … → atom indices (needs ``sae``)."""
    probes, sources = {}, {}
    if probe_dirs:
        for key, path in probe_dirs.items():
            probes[key] = load_probe(path)
            sources[f"probe_{key}"] = str(path)
    sae_obj = None
    if sae is not None:
        sae_obj = load_sae(sae)
        sources["sae"] = str(sae)
    if atoms and sae_obj is None:
        raise SafesteerError("--atoms needs --sae (the decoder rows come from the SAE)")
    return build_directions(
        layer,
        probes,
        sae_obj,
        dict(atoms or {}),
        d_model=d_model,
        seed=seed,
        sources=sources,
        random_members=random_members,
    )


def atom_selection_rows(selection_csv: Path, key: str, selection: str):
    """The rows of one selection CSV that belong to concept ``key`` (None when the file is missing)."""
    if not Path(selection_csv).is_file():
        return None
    df = pd.read_csv(selection_csv)
    if selection == "filtered":
        keep = df[df["category"] == FILTERED_CATEGORY[key]] if "category" in df.columns else df.iloc[:0]
        if "selected" in keep.columns:
            keep = keep[keep["selected"].astype(bool)]
        return keep
    return df[df["label"] == CONCEPTS[key]] if "label" in df.columns else df


def split_atom_selections(selection_csvs: Mapping[str, Path], out_dir: Path) -> dict[str, Path]:
    """Per concept and selection, the atoms as their own CSV in ``out_dir``: ``tox_top20`` → path, …
    (``selection_csvs``: ``top20``/``all``/``filtered`` → CSV of the atoms stage)."""
    out: dict[str, Path] = {}
    for key in CONCEPTS:
        for sel in SELECTIONS:
            keep = atom_selection_rows(selection_csvs[sel], key, sel)
            if keep is None or not len(keep):
                continue
            path = out_dir / f"atoms_{key}_{sel}.csv"
            with atomic_path(path) as tmp:
                keep.to_csv(tmp, index=False)
            out[f"{key}_{sel}"] = path
    return out
