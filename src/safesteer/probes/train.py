"""Train a concept probe on an activation store (the probe command and the probes stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.io import save_npy, write_json
from safesteer.probes import DEFAULT_CS, train_probe
from safesteer.probes.config import ProbeSection
from safesteer.probes.labels import get_spec
from safesteer.store import ActivationStore, is_validation_id


def labelled_rows(store, label: str, max_rows: int | None = None, seed: int = 0, batch_size: int = 8192):
    """(H, y, ids, split column or None) of the store rows the label spec covers (bounded memory)."""
    spec = get_spec(label)
    Hs, ys, ids, splits = [], [], [], []
    for b in store.iter_batches(batch_size, split="all", with_labels=True):
        y = spec.y_from_frame(b.labels)
        keep = ~np.isnan(y)
        if not keep.any():
            continue
        Hs.append(b.H[keep])
        ys.append(y[keep].astype(np.int64))
        ids.append(b.ids[keep])
        splits.append(
            b.labels["split"].astype(str).to_numpy()[keep]
            if "split" in b.labels.columns
            else np.full(keep.sum(), "")
        )
    if not Hs:
        raise SafesteerError(
            f"no row of {store.path} belongs to label '{label}' (it needs: "
            f"{', '.join(spec.datasets)}); extract those datasets first"
        )
    H, y, ids, sp = np.concatenate(Hs), np.concatenate(ys), np.concatenate(ids), np.concatenate(splits)
    if max_rows is not None and len(y) > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(y), max_rows, replace=False))
        H, y, ids, sp = H[pick], y[pick], ids[pick], sp[pick]
    return H, y, ids, sp


def choose_holdout(
    ids: np.ndarray, y: np.ndarray, split: np.ndarray, mode: str, test_fraction: float
) -> tuple[np.ndarray, str]:
    """Boolean test mask: the datasets' own test split ('dataset'), an id hash ('id'), or 'auto'."""

    def ok(mask: np.ndarray) -> bool:
        return all(np.sum(y[m] == c) >= 2 for m in (mask, ~mask) for c in (0, 1))

    if mode not in ("auto", "dataset", "id"):
        raise SafesteerError(f"unknown holdout '{mode}'; valid choices: auto, dataset, id")
    if mode in ("auto", "dataset"):
        test = split == "test"
        if ok(test):
            return test, "dataset split (train → fit, test → held-out)"
        if mode == "dataset":
            raise SafesteerError(
                "the rows' dataset splits do not give both classes in train and test; use --holdout id"
            )
    test = is_validation_id(ids, test_fraction)
    if not ok(test):
        raise SafesteerError(
            f"a {test_fraction:.0%} id-hash hold-out leaves a class with < 2 rows; extract more rows"
        )
    return test, f"id hash ({test_fraction:.0%} held out)"


def run_probe(
    acts: Path,
    label: str,
    out: Path,
    *,
    balanced: bool = False,
    seed: int = 0,
    holdout: str = ProbeSection.holdout,
    test_fraction: float = ProbeSection.test_fraction,
    cs: list[float] | None = None,
    max_rows: int | None = None,
) -> dict[str, Any]:
    spec = get_spec(label)
    store = ActivationStore(acts)
    H, y, ids, sp = labelled_rows(store, label, max_rows=max_rows, seed=seed)
    test, how = choose_holdout(ids, y, sp, holdout, test_fraction)
    meta = {
        "label": label,
        "spec": spec.to_dict(),
        "acts": str(store.path),
        "layer": store.layer,
        "model": store.manifest.get("model"),
        "kind": store.manifest.get("kind"),
        "holdout": how,
    }
    probe = train_probe(
        H[~test], y[~test], H[test], y[test], balanced=balanced, seed=seed, Cs=cs or DEFAULT_CS, meta=meta
    )
    probe.save(out)
    save_npy(out / "direction.npy", probe.direction.astype(np.float32))
    save_npy(out / "diffmean.npy", probe.diffmean.astype(np.float32))
    write_json(out / "metrics.json", {"label": label, **probe.metrics, "holdout": how})
    return probe.metrics
