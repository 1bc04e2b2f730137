"""``safesteer probe``, ``safesteer map`` and ``safesteer atoms``: probes, cartography and atom selection."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import typer

from safesteer.errors import SafesteerError

DATA_DIR_HELP = "Offline data folder (layout of ../shared/data; default $SAFESTEER_DATA_DIR)."


def _progress(iterable: Iterable, total: int | None, description: str, enabled: bool = True):
    """Iterate with a rich progress bar on stderr (plain iteration when disabled or not a terminal)."""
    if not enabled:
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=not console.is_terminal, disable=not console.is_terminal) as prog:
        task = prog.add_task(description, total=total)
        for item in iterable:
            yield item
            prog.advance(task)


def _say(msg: str) -> None:
    typer.echo(f"[safesteer] {msg}", err=True)


# ============================================================================================ probe
def labelled_rows(store, label: str, max_rows: int | None = None, seed: int = 0, batch_size: int = 8192):
    """(H, y, ids, split column or None) of the store rows the label spec covers (bounded memory)."""
    from safesteer.probes.labels import get_spec

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
        splits.append(b.labels["split"].astype(str).to_numpy()[keep] if "split" in b.labels.columns else np.full(keep.sum(), ""))
    if not Hs:
        raise SafesteerError(f"no row of {store.path} belongs to label '{label}' (it needs: {', '.join(spec.datasets)}); extract those datasets first")
    H, y, ids, sp = np.concatenate(Hs), np.concatenate(ys), np.concatenate(ids), np.concatenate(splits)
    if max_rows is not None and len(y) > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(y), max_rows, replace=False))
        H, y, ids, sp = H[pick], y[pick], ids[pick], sp[pick]
    return H, y, ids, sp


def choose_holdout(ids: np.ndarray, y: np.ndarray, split: np.ndarray, mode: str, test_fraction: float) -> tuple[np.ndarray, str]:
    """Boolean test mask: the datasets' own test split ('dataset'), an id hash ('id'), or 'auto'."""
    from safesteer.store import is_validation_id

    def ok(mask: np.ndarray) -> bool:
        return all(np.sum(y[m] == c) >= 2 for m in (mask, ~mask) for c in (0, 1))

    if mode not in ("auto", "dataset", "id"):
        raise SafesteerError(f"unknown holdout '{mode}'; valid choices: auto, dataset, id")
    if mode in ("auto", "dataset"):
        test = split == "test"
        if ok(test):
            return test, "dataset split (train → fit, test → held-out)"
        if mode == "dataset":
            raise SafesteerError("the rows' dataset splits do not give both classes in train and test; use --holdout id")
    test = is_validation_id(ids, test_fraction)
    if not ok(test):
        raise SafesteerError(f"a {test_fraction:.0%} id-hash hold-out leaves a class with < 2 rows; extract more rows")
    return test, f"id hash ({test_fraction:.0%} held out)"


def _parse_floats(value: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SafesteerError(f"{what} must be comma-separated numbers, got {value!r}") from None
    if not out or any(c <= 0 for c in out):
        raise SafesteerError(f"{what} must be positive numbers")
    return out


def run_probe(acts: Path, label: str, out: Path, *, balanced: bool = False, seed: int = 0, holdout: str = "auto",
              test_fraction: float = 0.2, cs: list[float] | None = None, max_rows: int | None = None) -> dict[str, Any]:
    from safesteer.io import save_npy, write_json
    from safesteer.probes import DEFAULT_CS, train_probe
    from safesteer.probes.labels import get_spec
    from safesteer.store import ActivationStore

    spec = get_spec(label)
    store = ActivationStore(acts)
    H, y, ids, sp = labelled_rows(store, label, max_rows=max_rows, seed=seed)
    test, how = choose_holdout(ids, y, sp, holdout, test_fraction)
    meta = {"label": label, "spec": spec.to_dict(), "acts": str(store.path), "layer": store.layer,
            "model": store.manifest.get("model"), "kind": store.manifest.get("kind"), "holdout": how}
    probe = train_probe(H[~test], y[~test], H[test], y[test], balanced=balanced, seed=seed, Cs=cs or DEFAULT_CS, meta=meta)
    probe.save(out)
    save_npy(out / "direction.npy", probe.direction.astype(np.float32))
    save_npy(out / "diffmean.npy", probe.diffmean.astype(np.float32))
    write_json(out / "metrics.json", {"label": label, **probe.metrics, "holdout": how})
    return probe.metrics


# ============================================================================================== map
def _shard_list(spec: str) -> list[int]:
    out: list[int] = []
    try:
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise SafesteerError(f"--shards takes indices and ranges like 0-3,7; got {spec!r}") from None
    if not out:
        raise SafesteerError("--shards is empty")
    return sorted(set(out))


def _open_latents(path: Path):
    try:
        from safesteer.sae.latents import LatentStore
    except ModuleNotFoundError as exc:
        raise SafesteerError("the SAE latent store (safesteer.sae) is not installed in this build; run 'safesteer encode' first") from exc
    return LatentStore(path)


def load_decoder(path: Path) -> np.ndarray:
    """Unit decoder rows (d_sae × d) from an SAE folder (``safesteer.sae.load_sae``, or a bare ``W_dec`` file)."""
    path = Path(path)
    for name in ("W_dec.npy", "decoder.npy"):
        if (path / name).is_file():
            from safesteer.io import load_npy

            return np.asarray(load_npy(path / name), dtype=np.float32)
    try:
        from safesteer.sae import load_sae
    except ModuleNotFoundError as exc:
        raise SafesteerError(f"cannot read an SAE from {path}: the SAE module is not available and there is no W_dec.npy") from exc
    sae = load_sae(path)
    W = sae.W_dec
    if hasattr(W, "detach"):
        W = W.detach().float().cpu().numpy()
    return np.asarray(W, dtype=np.float32)


def store_label_codes(store, names: list[str] | None, min_per_class: int) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
    """(ids, label names, int8 codes rows × labels, per-label counts) from the store's metadata only.

    Shard by shard (bounded memory: int8 codes for every candidate spec, then labels with fewer than
    ``min_per_class`` positive or negative rows are dropped).
    """
    import pandas as pd

    from safesteer.cartography.stats import encode_labels
    from safesteer.io import load_npy
    from safesteer.probes.labels import SPECS, get_spec

    if not store.shards:
        raise SafesteerError(f"{store.path} holds no rows")
    chosen = list(names) if names is not None else list(SPECS)
    if names is None:  # identity groups present in the data, beyond the built-in list
        import pyarrow.parquet as pq

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
        ids = meta["id"].astype(str).to_numpy() if "id" in meta.columns else load_npy(store.path / s["files"]["ids"]).astype(str)
        all_ids.append(ids)
        all_codes.append(encode_labels(np.stack([sp.y_from_frame(meta) for sp in specs], axis=1)))
    ids = np.concatenate(all_ids)
    codes = np.concatenate(all_codes)
    pos, neg = (codes == 1).sum(axis=0), (codes == 0).sum(axis=0)
    keep = (pos >= min_per_class) & (neg >= min_per_class)
    if names is not None and not keep.all():
        missing = [n for n, k in zip(chosen, keep) if not k]
        raise SafesteerError(f"label(s) {', '.join(missing)} have fewer than {min_per_class} rows per class in {store.path}")
    if not keep.any():
        raise SafesteerError(f"no label spec has ≥ {min_per_class} positive and negative rows in {store.path}; extract labelled datasets")
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


def run_map(latents, acts: Path, out: Path, *, labels: list[str] | None = None, heldout: float = 0.2, top_k: int = 10,
            probe_dirs: list[Path] | None = None, sae: Path | None = None, method: str = "omp", n_atoms_link: int = 16,
            min_per_class: int = 5, show_progress: bool = True, shards: list[int] | None = None) -> dict[str, Any]:
    """One streaming pass over the latents (``shards``: only those latent shards, for a partial map
    to combine later with :func:`run_map_merge`)."""
    import pandas as pd

    from safesteer.cartography.link import decompose
    from safesteer.cartography.stats import atom_table, map_latents
    from safesteer.io import atomic_path, write_json
    from safesteer.probes import load_probe
    from safesteer.store import ActivationStore

    t0 = time.time()
    lat = _open_latents(latents) if isinstance(latents, (str, Path)) else latents
    store = ActivationStore(acts)
    ids, names, codes, counts = store_label_codes(store, labels, min_per_class)
    entries = getattr(lat, "shards", [])
    wanted = set(shards) if shards is not None else None
    if wanted is not None and entries:
        missing = sorted(wanted - {int(e["index"]) for e in entries})
        if missing:
            raise SafesteerError(f"--shards names latent shard(s) {missing} that {latents} does not have "
                                 f"(it has {sorted(int(e['index']) for e in entries)})")
    n_rows = lat.n_rows if wanted is None else sum(int(e["rows"]) for e in entries if int(e["index"]) in wanted)
    _say(f"mapping {lat.n_latents} atoms × {len(names)} labels over {n_rows} rows" + (f" (shards {shards})" if shards is not None else ""))
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
    res = map_latents(shard_iter, lat.n_latents, ids, names, codes, heldout_fraction=heldout, top_k=top_k,
                      logits=logits, probe_names=list(probes),
                      progress=lambda it: _progress(it, n_shards, "mapping shards", show_progress))
    df = atom_table(res)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "atom_map.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out / "top_activations.parquet") as tmp:
        res.top.to_frame().to_parquet(tmp, index=False)
    res.stats.save(out / "stats")
    if res.heldout is not None:
        res.heldout.save(out / "stats_heldout")
    link: dict[str, Any] = {}
    if res.corr is not None:
        with atomic_path(out / "probe_atom_corr.parquet") as tmp:
            res.corr.to_frame(top=500).to_parquet(tmp, index=False)
    if probes and sae is not None:
        W = load_decoder(sae)
        for name, p in probes.items():
            dec = decompose(p.direction, W, method=method, k=n_atoms_link)
            link[name] = dec.to_dict()
            dm = decompose(p.diffmean, W, method=method, k=n_atoms_link) if p.diffmean is not None else None
            if dm is not None:
                link[name + ":diffmean"] = dm.to_dict()
        write_json(out / "link.json", link)
    top = _top_atoms(df, names)
    summary = {
        "format": "safesteer-atom-map", "version": 1,
        "n_atoms": int(lat.n_latents), "n_rows": int(res.n_rows), "n_unlabelled_rows": int(res.n_unlabelled),
        "labels": counts, "heldout_fraction": heldout,
        "stats_rows": "atom_map statistics use the rows outside the held-out fraction; *_heldout columns the rest" if heldout > 0 else "all rows",
        "score": "score = 0.5·r + 0.5·dmu / max_atoms |dmu| (per label)",
        "acts": {"path": str(store.path), "model": store.manifest.get("model"), "layer": store.layer,
                 "kind": store.manifest.get("kind"), "d": store.d},
        "latents": str(latents) if isinstance(latents, (str, Path)) else type(latents).__name__,
        "probes": list(probes), "link": {k: v["cosine"] for k, v in link.items()},
        "top_atoms": top, "seconds": round(time.time() - t0, 2), "shards": sorted(shards) if shards is not None else "all",
        "top_k": top_k,
    }
    write_json(out / "summary.json", summary)
    return summary


def _top_atoms(df, names) -> dict[str, list[dict[str, float]]]:
    top = {}
    for lab in names:
        sub = df[df["label"] == lab].nlargest(5, "score")
        top[lab] = [{"atom": int(a), "score": float(s), "r": float(r)} for a, s, r in zip(sub["atom"], sub["score"], sub["r"])]
    return top


def run_map_merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """Combine partial maps (``safesteer map --shards`` over disjoint latent shards) into the map of
    their union: the streaming statistics and top activations merge exactly; the probe ↔ atom
    decomposition (row-independent) is carried over; row-level probe correlations are not merged."""
    import shutil

    import pandas as pd

    from safesteer.cartography.stats import StreamingStats, TopActivations, atom_table
    from safesteer.io import atomic_path, read_json, write_json

    parts = [Path(p) for p in parts]
    if len(parts) < 2:
        raise SafesteerError("map-merge needs at least two --part folders")
    summaries = []
    for p in parts:
        if not (p / "summary.json").is_file() or not (p / "stats" / "stats.json").is_file():
            raise SafesteerError(f"{p} is not a 'safesteer map' output (no summary.json / stats/); run 'safesteer map --shards' first")
        summaries.append(read_json(p / "summary.json"))
    first = summaries[0]
    for p, s in zip(parts[1:], summaries[1:]):
        for key in ("n_atoms", "labels", "heldout_fraction", "acts"):
            if s.get(key) != first.get(key):
                raise SafesteerError(f"{p} and {parts[0]} differ in {key}; only maps of the same latents, labels and held-out fraction merge")
    seen: dict[int, Path] = {}
    for p, s in zip(parts, summaries):
        if s.get("shards") == "all":
            raise SafesteerError(f"{p} already covers every shard; merge partial maps made with --shards")
        for i in s.get("shards") or []:
            if i in seen:
                raise SafesteerError(f"latent shard {i} is in both {seen[i]} and {p}; the parts must be disjoint")
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
        top.merge(TopActivations.from_frame(pd.read_parquet(p / "top_activations.parquet"), int(first["n_atoms"]), k))
    df = atom_table(stats, heldout)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "atom_map.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out / "top_activations.parquet") as tmp:
        top.to_frame().to_parquet(tmp, index=False)
    stats.save(out / "stats")
    if heldout is not None:
        heldout.save(out / "stats_heldout")
    if (parts[0] / "link.json").is_file():
        shutil.copyfile(parts[0] / "link.json", out / "link.json")
    summary = {**first, "n_rows": int(sum(s["n_rows"] for s in summaries)),
               "n_unlabelled_rows": int(sum(s.get("n_unlabelled_rows", 0) for s in summaries)),
               "top_atoms": _top_atoms(df, stats.label_names), "shards": sorted(seen), "merged_from": [str(p) for p in parts],
               "probe_atom_corr": "not merged (row-level); run 'safesteer map' over all shards for it",
               "seconds": round(sum(float(s.get("seconds", 0.0)) for s in summaries), 2)}
    write_json(out / "summary.json", summary)
    return summary


# ============================================================================================ atoms
def run_atoms(map_dir: Path, out: Path, *, mode: str, sae: Path | None = None, k: int = 20, candidates: int = 30,
              labels: list[str] | None = None, judge: str = "offline", screen: bool = False, model: str | None = None,
              judge_model: str = "smollm2-135m", layer: int | None = None, read_layer: int | None = None,
              alpha_scale: float = 1.0, r_threshold: float = 0.05, data_dir: Path | None = None, dedup: bool = True,
              threshold: float = 0.20, screen_texts: int = 24, readout_rows: int = 60, seed: int = 0, show_progress: bool = True,
              categories: tuple[str, ...] | list[str] | None = None,
              backbone=None, judge_backbone=None, embedder=None, W_dec: np.ndarray | None = None, device: str = "cpu") -> dict[str, Any]:
    import pandas as pd

    from safesteer.cartography import select as S
    from safesteer.io import atomic_path, read_json, write_json

    cats = tuple(categories) if categories else S.MACRO_CATEGORIES

    map_dir = Path(map_dir)
    if not (map_dir / "atom_map.parquet").is_file():
        raise SafesteerError(f"{map_dir} has no atom_map.parquet; run 'safesteer map' first")
    df = pd.read_parquet(map_dir / "atom_map.parquet")
    summary = read_json(map_dir / "summary.json") if (map_dir / "summary.json").is_file() else {}
    out.mkdir(parents=True, exist_ok=True)

    def write_csv(frame, name):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)

    if mode == "topk":
        sel = S.select_topk(df, labels, k=k)
        write_csv(sel, "atoms_topk.csv")
        report = {"mode": mode, "k": k, "labels": sel["label"].nunique(), "rows": len(sel)}
        write_json(out / "selection.json", report)
        return report
    if mode == "all-positive":
        sel = S.select_all_positive(df, labels)
        write_csv(sel, "atoms_all_positive.csv")
        report = {"mode": mode, "labels": sel["label"].nunique(), "rows": len(sel),
                  "per_label": sel.groupby("label").size().astype(int).to_dict()}
        write_json(out / "selection.json", report)
        return report
    if mode != "filtered":
        raise SafesteerError(f"unknown mode '{mode}'; valid choices: all-positive, filtered, topk")

    # ---- filtered: cards → judge → screen → dedup
    from safesteer.cartography.cards import build_cards, lookup_texts
    from safesteer.cartography.judges import CausalScreen, make_judge, train_readouts

    acts_info = summary.get("acts", {})
    model = model or acts_info.get("model") or "smollm2-135m"
    if W_dec is None and sae is not None:
        W_dec = load_decoder(sae)
    if W_dec is None and screen:
        raise SafesteerError("--screen needs --sae (the decoder directions to steer along)")
    need_model = screen or W_dec is not None
    if backbone is None and need_model:
        from safesteer.models import load_backbone

        _say(f"loading {model}")
        backbone = load_backbone(model, device=device)
    if judge == "offline" and judge_backbone is None:
        if backbone is not None and model in ("smollm2-135m", "smollm2", "smollm2-135m-instruct") and judge_model == model:
            judge_backbone = backbone
        else:
            from safesteer.models import load_backbone

            judge_backbone = load_backbone(judge_model, device=device)
    the_judge = make_judge(judge, backbone=judge_backbone) if judge != "openai" else make_judge("openai")
    top_acts = pd.read_parquet(map_dir / "top_activations.parquet") if (map_dir / "top_activations.parquet").is_file() else None
    if top_acts is not None and len(top_acts):  # the atom's strongest observed activation sets its screening step
        df = df.merge(top_acts.groupby("atom")["activation"].max().rename("max_act"), left_on="atom", right_index=True, how="left")
    if W_dec is not None and int(df["atom"].max()) >= W_dec.shape[0]:
        raise SafesteerError(f"the atom map has atoms up to {int(df['atom'].max())} but the SAE has {W_dec.shape[0]}; wrong --sae?")

    all_cards: dict[int, dict] = {}

    def cards_fn(atoms):
        cs = build_cards(atoms, W_dec=W_dec, atom_map=df, top_acts=top_acts, backbone=backbone,
                         text_lookup=lambda ids: lookup_texts(ids, data_dir=data_dir))
        all_cards.update({c["atom"]: c for c in cs})
        return all_cards

    scr = None
    if screen:
        lay = layer if layer is not None else acts_info.get("layer")
        if lay is None:
            raise SafesteerError("cannot tell the SAE's layer; pass --layer")
        rl = read_layer if read_layer is not None else backbone.n_layers - 1
        cand = S.category_candidates(df, candidates, cats)
        _say(f"training read-out probes at layer {rl} for {cand['concept'].nunique()} concepts")
        readouts = train_readouts(backbone, rl, cand["concept"].unique().tolist(), data_dir=data_dir,
                                  max_per_part=readout_rows, n_eval=screen_texts, seed=seed)
        if not readouts:
            raise SafesteerError("no read-out probe could be trained for screening; check --data-dir")
        scr = CausalScreen(backbone, int(lay), rl, readouts, alpha_scale=alpha_scale, r_threshold=r_threshold)
    if dedup and embedder is None:
        from safesteer.cartography.dedup import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    # every screened atom steers the same texts at the same layer: blocks 0..layer run once
    with (backbone.prefix_cache(scr.layer) if scr is not None and hasattr(backbone, "prefix_cache") else contextlib.nullcontext()):
        result = S.select_filtered(df, cards=cards_fn, judge=the_judge, screen=scr, W_dec=W_dec, embedder=embedder if dedup else None,
                                   candidates=candidates, categories=cats, threshold=threshold,
                                   progress=lambda it, n, desc: _progress(it, n, desc, show_progress))
    final = S.final_table(result)
    write_csv(final, "final_steering_atoms.csv")
    write_csv(result, "candidates.csv")
    flagged = result[result["flag"].astype(str).str.startswith("would make the model less safe")]
    write_csv(flagged[S.FINAL_COLUMNS], "flagged_atoms.csv")
    write_json(out / "atom_cards.json", [all_cards[a] for a in sorted(all_cards)])
    report = {"mode": mode, "candidates": int(len(result)), "selected": int(len(final)),
              "verdicts": result["verdict"].value_counts().to_dict(), "judge": judge,
              "screen": None if scr is None else {"layer": scr.layer, "read_layer": scr.read_layer, "alpha_scale": alpha_scale,
                                                  "r_threshold": r_threshold, "readouts": {k: v[0].metrics.get("auroc") for k, v in scr.readouts.items()}},
              "flagged_less_safe": int(len(flagged)), "dedup": bool(dedup), "threshold": threshold,
              "per_category": final.groupby("category").size().astype(int).to_dict() if len(final) else {}}
    write_json(out / "selection.json", report)
    return report


# ========================================================================================= register
def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe_cmd(
        acts: Path = typer.Option(..., "--acts", help="Activation store folder (from 'safesteer extract')."),
        label: str = typer.Option(..., "--label", help="toxicity, harmfulness, toxicity_madlibs, harm_beavertails, emotion:<e>, empathy:<e>, rtp:<attr>, harm:<cat>, identity:<group>."),
        out: Path = typer.Option(..., "--out", help="Output folder (probe.json, probe.safetensors, direction.npy, diffmean.npy, metrics.json)."),
        balanced: bool = typer.Option(False, "--balanced", help="Class-balanced loss."),
        seed: int = typer.Option(0, "--seed"),
        holdout: str = typer.Option("auto", "--holdout", help="auto (datasets' test split if usable, else id hash), dataset or id."),
        test_fraction: float = typer.Option(0.2, "--test-fraction", help="Held-out share for --holdout id."),
        cs: str = typer.Option("1e-4,1e-3,1e-2,0.1,1,10,100", "--cs", help="Inverse regularisation strengths tried by CV."),
        max_rows: Optional[int] = typer.Option(None, "--max-rows", help="Subsample the labelled rows."),
    ) -> None:
        """Train an ℓ2 logistic probe (+ DiffMean) on stored activations; report held-out metrics."""
        m = run_probe(acts, label, out, balanced=balanced, seed=seed, holdout=holdout, test_fraction=test_fraction,
                      cs=_parse_floats(cs, "--cs"), max_rows=max_rows)
        typer.echo(f"probe '{label}': held-out AUROC {m['auroc']:.3f}, accuracy {m['accuracy']:.3f}, F1 {m['f1']:.3f} "
                   f"(C={m['C']:g}, {m['n_train']} train / {m['n_test']} test rows; DiffMean AUROC {m.get('diffmean_auroc', float('nan')):.3f}) -> {out}")

    @app.command("map")
    def map_cmd(
        latents: Path = typer.Option(..., "--latents", help="Sparse latent store (from 'safesteer encode')."),
        acts: Path = typer.Option(..., "--acts", help="The activation store the latents were encoded from (labels, ids)."),
        out: Path = typer.Option(..., "--out", help="Output folder (atom_map.parquet, summary.json, top_activations.parquet, stats/)."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label specs (default: every spec the data supports)."),
        heldout: float = typer.Option(0.2, "--heldout", help="Share of rows kept apart for replication (0 = none)."),
        top_k: int = typer.Option(10, "--top-k", help="Top-activating rows kept per atom for the cards."),
        probe: Optional[list[Path]] = typer.Option(None, "--probe", help="Probe folder(s): logit ↔ atom correlations (+ decomposition with --sae)."),
        sae: Optional[Path] = typer.Option(None, "--sae", help="SAE folder, for decomposing the probe directions over its decoder."),
        method: str = typer.Option("omp", "--method", help="Decomposition: omp, omp-nonneg or nnlasso."),
        min_per_class: int = typer.Option(5, "--min-per-class", help="Skip labels with fewer positive or negative rows."),
        shards: Optional[str] = typer.Option(None, "--shards", help="Only these latent shards (e.g. 0-3,7): a partial map for 'safesteer map-merge'."),
    ) -> None:
        """Stream the latents once: per (atom, label) Δμ, point-biserial r, Cohen's d, firing rates, concept score."""
        names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
        if not 0 <= heldout < 1:
            raise SafesteerError("--heldout must be in [0, 1)")
        s = run_map(latents, acts, out, labels=names, heldout=heldout, top_k=top_k, probe_dirs=probe, sae=sae,
                    method=method, min_per_class=min_per_class, shards=_shard_list(shards) if shards else None)
        typer.echo(f"mapped {s['n_atoms']} atoms × {len(s['labels'])} labels over {s['n_rows']} rows in {s['seconds']:.1f}s -> {out}")

    @app.command("map-merge")
    def map_merge_cmd(
        part: list[Path] = typer.Option(..., "--part", help="A partial map folder ('safesteer map --shards'); repeat for each."),
        out: Path = typer.Option(..., "--out", help="Output folder for the merged map."),
    ) -> None:
        """Merge partial maps over disjoint latent shards into the map of all of them (exact)."""
        s = run_map_merge(list(part), out)
        typer.echo(f"merged {len(part)} maps: {s['n_atoms']} atoms × {len(s['labels'])} labels over {s['n_rows']} rows -> {out}")

    @app.command("atoms")
    def atoms_cmd(
        map_dir: Path = typer.Option(..., "--map", help="Folder written by 'safesteer map'."),
        out: Path = typer.Option(..., "--out"),
        mode: str = typer.Option("filtered", "--mode", help="topk, all-positive or filtered."),
        sae: Optional[Path] = typer.Option(None, "--sae", help="SAE folder (decoder directions: logit lens, screening)."),
        k: int = typer.Option(20, "--k", help="topk: atoms per label."),
        candidates: int = typer.Option(30, "--candidates", help="filtered: candidates per macro-category."),
        categories: str = typer.Option("toxicity,harm,emotion,empathy", "--categories", help="filtered: macro-categories to draw candidates from."),
        labels: Optional[str] = typer.Option(None, "--labels", help="topk/all-positive: comma-separated labels (default all)."),
        judge: str = typer.Option("offline", "--judge", help="offline (embedded instruct model), openai (SAFESTEER_JUDGE_* env) or none."),
        screen: bool = typer.Option(False, "--screen", help="Causal screening: held-out replication + steering moves a concept read-out."),
        model: Optional[str] = typer.Option(None, "--model", help="Backbone of the SAE (default: the map's model)."),
        judge_model: str = typer.Option("smollm2-135m", "--judge-model", help="Offline judge model."),
        layer: Optional[int] = typer.Option(None, "--layer", help="Steering layer (default: the map's layer)."),
        read_layer: Optional[int] = typer.Option(None, "--read-layer", help="Read-out layer for screening (default: last)."),
        alpha_scale: float = typer.Option(1.0, "--alpha-scale", help="Screening step α = scale × the atom's largest observed activation."),
        r_threshold: float = typer.Option(0.05, "--r-threshold", help="Minimum |r| on the held-out split."),
        screen_texts: int = typer.Option(24, "--screen-texts", help="Validation texts per concept for screening."),
        readout_rows: int = typer.Option(60, "--readout-rows", help="Texts per dataset part for the screening read-out probes."),
        dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="De-duplicate with MiniLM embeddings."),
        threshold: float = typer.Option(0.20, "--threshold", help="De-duplication cosine-distance threshold."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="SAFESTEER_DATA_DIR", help=DATA_DIR_HELP),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Select atoms: top-k, all-positive, or filtered (judge → causal screen → de-duplication)."""
        names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
        r = run_atoms(map_dir, out, mode=mode, sae=sae, k=k, candidates=candidates, labels=names, judge=judge, screen=screen,
                      model=model, judge_model=judge_model, layer=layer, read_layer=read_layer, alpha_scale=alpha_scale,
                      r_threshold=r_threshold, data_dir=data_dir, dedup=dedup, threshold=threshold, screen_texts=screen_texts, readout_rows=readout_rows, seed=seed,
                      categories=[c.strip() for c in categories.split(",") if c.strip()])
        if mode == "filtered":
            typer.echo(f"selected {r['selected']} of {r['candidates']} candidate atoms ({r['flagged_less_safe']} flagged as making the model less safe) -> {out / 'final_steering_atoms.csv'}")
        else:
            typer.echo(f"{mode}: {r['rows']} (atom, label) rows over {r['labels']} labels -> {out}")
