"""Concept cartography over a latent store: one streaming pass → the atom map (``safesteer map``,
``safesteer map-merge`` and the map stage)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from safesteer import layout
from safesteer.cartography.atom_map import atom_table, encode_labels, map_latents
from safesteer.cartography.config import MapSection
from safesteer.cartography.link import decompose
from safesteer.cartography.stats import StreamingStats
from safesteer.cartography.top import TopActivations
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, load_npy, read_json, write_json
from safesteer.probes import load_probe
from safesteer.probes.labels import SPECS, get_spec
from safesteer.progress import progress, say
from safesteer.store import ActivationStore


def _open_latents(path: Path):
    try:  # torch: imported only when a latent store is read
        from safesteer.sae.latents import LatentStore
    except ModuleNotFoundError as exc:
        raise SafesteerError(
            "the SAE latent store (safesteer.sae) is not installed in this build; run 'safesteer "
            "encode' first"
        ) from exc
    return LatentStore(path)


def load_decoder(path: Path) -> np.ndarray:
    """Unit decoder rows (d_sae × d) from an SAE folder (``safesteer.sae.load_sae``, or a bare ``W_dec``
    file)."""
    path = Path(path)
    for name in ("W_dec.npy", "decoder.npy"):
        if (path / name).is_file():
            return np.asarray(load_npy(path / name), dtype=np.float32)
    try:  # torch: imported only when an SAE folder is read
        from safesteer.sae import load_sae
    except ModuleNotFoundError as exc:
        raise SafesteerError(
            f"cannot read an SAE from {path}: the SAE module is not available and there is no W_dec.npy"
        ) from exc
    sae = load_sae(path)
    W = sae.W_dec
    if hasattr(W, "detach"):
        W = W.detach().float().cpu().numpy()
    return np.asarray(W, dtype=np.float32)


def store_label_codes(
    store, names: list[str] | None, min_per_class: int
) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
    """(ids, label names, int8 codes rows × labels, per-label counts) from the store's metadata only.

    Shard by shard (bounded memory: int8 codes for every candidate spec, then labels with fewer than
    ``min_per_class`` positive or negative rows are dropped).
    """

    if not store.shards:
        raise SafesteerError(f"{store.path} holds no rows")
    chosen = list(names) if names is not None else list(SPECS)
    if names is None:  # identity groups present in the data, beyond the built-in list
        import pyarrow.parquet as pq  # pyarrow.parquet: only for the data's identity groups

        groups: set[str] = set()
        for s in store.shards:
            path = store.path / s["files"]["meta"]
            if "target_group" not in pq.read_schema(path).names:
                continue
            col = pd.read_parquet(path, columns=["target_group"])["target_group"]
            groups |= {str(v) for v in col.dropna().unique() if isinstance(v, str) and v}
        chosen += [f"identity:{g}" for g in sorted(groups) if f"identity:{g}" not in chosen]
    specs = [get_spec(n) for n in chosen]
    all_ids, all_codes = [], []
    for s in store.shards:
        meta = store.shard_meta(s)
        ids = (
            meta["id"].astype(str).to_numpy()
            if "id" in meta.columns
            else load_npy(store.path / s["files"]["ids"]).astype(str)
        )
        all_ids.append(ids)
        all_codes.append(encode_labels(np.stack([sp.y_from_frame(meta) for sp in specs], axis=1)))
    ids = np.concatenate(all_ids)
    codes = np.concatenate(all_codes)
    pos, neg = (codes == 1).sum(axis=0), (codes == 0).sum(axis=0)
    keep = (pos >= min_per_class) & (neg >= min_per_class)
    if names is not None and not keep.all():
        missing = [n for n, k in zip(chosen, keep) if not k]
        raise SafesteerError(
            f"label(s) {', '.join(missing)} have fewer than {min_per_class} rows per class in {store.path}"
        )
    if not keep.any():
        raise SafesteerError(
            f"no label spec has ≥ {min_per_class} positive and negative rows in {store.path}; extract "
            "labelled datasets"
        )
    label_names = [n for n, k in zip(chosen, keep) if k]
    counts = {n: {"pos": int(p), "neg": int(q)} for n, p, q, k in zip(chosen, pos, neg, keep) if k}
    return ids, label_names, np.ascontiguousarray(codes[:, keep]), counts


def probe_logits(store, probes: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, rows × probes logits) over the whole store."""
    ids, rows = [], []
    W = np.stack([p.w for p in probes.values()], axis=1)
    b = np.array([p.b for p in probes.values()])
    for _, H, shard_ids in store.iter_shards():
        ids.append(np.asarray(shard_ids).astype(str))
        rows.append(np.asarray(H, dtype=np.float64) @ W + b)
    return np.concatenate(ids), np.concatenate(rows)


def run_map(
    latents,
    acts: Path,
    out: Path,
    *,
    labels: list[str] | None = None,
    heldout: float = MapSection.heldout,
    top_k: int = MapSection.top_k,
    probe_dirs: list[Path] | None = None,
    sae: Path | None = None,
    method: str = MapSection.method,
    n_atoms_link: int = MapSection.n_atoms_link,
    min_per_class: int = MapSection.min_per_class,
    show_progress: bool = True,
    shards: list[int] | None = None,
    say: Callable[[str], None] = say,
) -> dict[str, Any]:
    """One streaming pass over the latents (``shards``: only those latent shards, for a partial map
    to combine later with :func:`run_map_merge`)."""

    t0 = time.time()
    lat = _open_latents(latents) if isinstance(latents, (str, Path)) else latents
    store = ActivationStore(acts)
    ids, names, codes, counts = store_label_codes(store, labels, min_per_class)
    entries = getattr(lat, "shards", [])
    wanted = set(shards) if shards is not None else None
    if wanted is not None and entries:
        missing = sorted(wanted - {int(e["index"]) for e in entries})
        if missing:
            raise SafesteerError(
                f"--shards names latent shard(s) {missing} that {latents} does not have "
                f"(it has {sorted(int(e['index']) for e in entries)})"
            )
    n_rows = (
        lat.n_rows if wanted is None else sum(int(e["rows"]) for e in entries if int(e["index"]) in wanted)
    )
    say(
        f"mapping {lat.n_latents} atoms × {len(names)} labels over {n_rows} rows"
        + (f" (shards {shards})" if shards is not None else "")
    )
    probes = {}
    for d in probe_dirs or []:
        p = load_probe(d)
        if p.d != store.d:
            raise SafesteerError(f"probe {d} has {p.d} dims; the activations have {store.d}")
        probes[str(p.meta.get("label") or Path(d).name)] = p
    logits = None
    if probes:
        lid, lg = probe_logits(store, probes)
        pos = pd.Index(lid).get_indexer(ids)
        logits = np.where(pos[:, None] >= 0, lg[np.maximum(pos, 0)], np.nan)
    n_shards = (len(wanted) if wanted is not None else len(entries)) or None
    shard_iter = lat.iter_shards()
    if wanted is not None:
        shard_iter = (item for item in shard_iter if int(item[0]) in wanted)
    res = map_latents(
        shard_iter,
        lat.n_latents,
        ids,
        names,
        codes,
        heldout_fraction=heldout,
        top_k=top_k,
        logits=logits,
        probe_names=list(probes),
        progress=lambda it: progress(it, n_shards, "mapping shards", show_progress),
    )
    df = atom_table(res)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / layout.ATOM_MAP) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out / layout.TOP_ACTIVATIONS) as tmp:
        res.top.to_frame().to_parquet(tmp, index=False)
    res.stats.save(out / layout.STATS)
    if res.heldout is not None:
        res.heldout.save(out / layout.STATS_HELDOUT)
    link: dict[str, Any] = {}
    if res.corr is not None:
        with atomic_path(out / layout.PROBE_ATOM_CORR) as tmp:
            res.corr.to_frame(top=500).to_parquet(tmp, index=False)
    if probes and sae is not None:
        W = load_decoder(sae)
        for name, p in probes.items():
            dec = decompose(p.direction, W, method=method, k=n_atoms_link)
            link[name] = dec.to_dict()
            dm = decompose(p.diffmean, W, method=method, k=n_atoms_link) if p.diffmean is not None else None
            if dm is not None:
                link[name + ":diffmean"] = dm.to_dict()
        write_json(out / layout.LINK, link)
    top = _top_atoms(df, names)
    summary = {
        "format": "safesteer-atom-map",
        "version": 1,
        "n_atoms": int(lat.n_latents),
        "n_rows": int(res.n_rows),
        "n_unlabelled_rows": int(res.n_unlabelled),
        "labels": counts,
        "heldout_fraction": heldout,
        "stats_rows": "atom_map statistics use the rows outside the held-out fraction; *_heldout "
        "columns the rest"
        if heldout > 0
        else "all rows",
        "score": "score = 0.5·r + 0.5·dmu / max_atoms |dmu| (per label)",
        "acts": {
            "path": str(store.path),
            "model": store.manifest.get("model"),
            "layer": store.layer,
            "kind": store.manifest.get("kind"),
            "d": store.d,
        },
        "latents": str(latents) if isinstance(latents, (str, Path)) else type(latents).__name__,
        "probes": list(probes),
        "link": {k: v["cosine"] for k, v in link.items()},
        "top_atoms": top,
        "seconds": round(time.time() - t0, 2),
        "shards": sorted(shards) if shards is not None else "all",
        "top_k": top_k,
    }
    write_json(
        out / layout.MAP_SUMMARY, {k: v for k, v in summary.items() if k != "seconds"}
    )  # saved files carry no timings
    return summary


def _top_atoms(df, names) -> dict[str, list[dict[str, float]]]:
    top = {}
    for lab in names:
        sub = df[df["label"] == lab].nlargest(5, "score")
        top[lab] = [
            {"atom": int(a), "score": float(s), "r": float(r)}
            for a, s, r in zip(sub["atom"], sub["score"], sub["r"])
        ]
    return top


def run_map_merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """Combine partial maps (``safesteer map --shards`` over disjoint latent shards) into the map of
    their union: the streaming statistics and top activations merge exactly; the probe ↔ atom
    decomposition (row-independent) is carried over; row-level probe correlations are not merged."""

    parts = [Path(p) for p in parts]
    if len(parts) < 2:
        raise SafesteerError("map-merge needs at least two --part folders")
    summaries = []
    for p in parts:
        if not (p / "summary.json").is_file() or not (p / "stats" / "stats.json").is_file():
            raise SafesteerError(
                f"{p} is not a 'safesteer map' output (no summary.json / stats/); run 'safesteer map "
                "--shards' first"
            )
        summaries.append(read_json(p / "summary.json"))
    first = summaries[0]
    for p, s in zip(parts[1:], summaries[1:]):
        for key in ("n_atoms", "labels", "heldout_fraction", "acts"):
            if s.get(key) != first.get(key):
                raise SafesteerError(
                    f"{p} and {parts[0]} differ in {key}; only maps of the same latents, labels and "
                    "held-out fraction merge"
                )
    seen: dict[int, Path] = {}
    for p, s in zip(parts, summaries):
        if s.get("shards") == "all":
            raise SafesteerError(f"{p} already covers every shard; merge partial maps made with --shards")
        for i in s.get("shards") or []:
            if i in seen:
                raise SafesteerError(
                    f"latent shard {i} is in both {seen[i]} and {p}; the parts must be disjoint"
                )
            seen[i] = p
    stats = StreamingStats.load(parts[0] / "stats")
    for p in parts[1:]:
        stats.merge(StreamingStats.load(p / "stats"))
    heldout = None
    if all((p / "stats_heldout" / "stats.json").is_file() for p in parts):
        heldout = StreamingStats.load(parts[0] / "stats_heldout")
        for p in parts[1:]:
            heldout.merge(StreamingStats.load(p / "stats_heldout"))
    k = int(first.get("top_k") or 10)
    top = TopActivations(int(first["n_atoms"]), k)
    for p in parts:
        top.merge(
            TopActivations.from_frame(
                pd.read_parquet(p / "top_activations.parquet"), int(first["n_atoms"]), k
            )
        )
    df = atom_table(stats, heldout)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / layout.ATOM_MAP) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out / layout.TOP_ACTIVATIONS) as tmp:
        top.to_frame().to_parquet(tmp, index=False)
    stats.save(out / layout.STATS)
    if heldout is not None:
        heldout.save(out / layout.STATS_HELDOUT)
    if (parts[0] / "link.json").is_file():
        shutil.copyfile(parts[0] / "link.json", out / layout.LINK)
    summary = {
        **first,
        "n_rows": int(sum(s["n_rows"] for s in summaries)),
        "n_unlabelled_rows": int(sum(s.get("n_unlabelled_rows", 0) for s in summaries)),
        "top_atoms": _top_atoms(df, stats.label_names),
        "shards": sorted(seen),
        "merged_from": [str(p) for p in parts],
        "probe_atom_corr": "not merged (row-level); run 'safesteer map' over all shards for it",
    }
    write_json(out / layout.MAP_SUMMARY, summary)
    return summary
