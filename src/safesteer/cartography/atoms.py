"""Atom selection from an atom map (``safesteer atoms`` and the atoms stage).

Three modes: ``topk`` (k best atoms per label), ``all-positive`` (every atom with a positive
score) and ``filtered`` (cards → judge → causal screen → de-duplication), each a small function;
the judge, the screen and the embedder have their own builders.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from safesteer import layout
from safesteer.cartography import select as S
from safesteer.cartography.config import AtomSection
from safesteer.cartography.dedup import MiniLMEmbedder
from safesteer.cartography.judges import make_judge
from safesteer.cartography.map import load_decoder
from safesteer.cartography.screen import CausalScreen, train_readouts
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, write_json
from safesteer.progress import progress, say

_A = AtomSection()


def _write_csv(frame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_map(map_dir: Path):
    """(atom map frame, summary dict) of a ``safesteer map`` folder."""
    map_dir = Path(map_dir)
    if not (map_dir / layout.ATOM_MAP).is_file():
        raise SafesteerError(f"{map_dir} has no {layout.ATOM_MAP}; run 'safesteer map' first")
    summary = read_json(map_dir / layout.MAP_SUMMARY) if (map_dir / layout.MAP_SUMMARY).is_file() else {}
    return pd.read_parquet(map_dir / layout.ATOM_MAP), summary


def select_topk_mode(df, out: Path, labels: list[str] | None, k: int) -> dict[str, Any]:
    sel = S.select_topk(df, labels, k=k)
    _write_csv(sel, out / layout.TOPK_CSV)
    report = {"mode": "topk", "k": k, "labels": sel["label"].nunique(), "rows": len(sel)}
    write_json(out / layout.SELECTION, report)
    return report


def select_all_positive_mode(df, out: Path, labels: list[str] | None) -> dict[str, Any]:
    sel = S.select_all_positive(df, labels)
    _write_csv(sel, out / layout.ALL_POSITIVE_CSV)
    report = {
        "mode": "all-positive",
        "labels": sel["label"].nunique(),
        "rows": len(sel),
        "per_label": sel.groupby("label").size().astype(int).to_dict(),
    }
    write_json(out / layout.SELECTION, report)
    return report


def build_judge(
    judge: str,
    *,
    backbone=None,
    model: str | None = None,
    judge_model: str = _A.judge_model,
    judge_backbone=None,
    device: str = "cpu",
):
    """The concept judge: ``offline`` (an instruct LM, shared with the steered backbone when it is the
    same model), ``openai`` (SAFESTEER_JUDGE_* env) or ``none``."""
    if judge == "openai":
        return make_judge("openai")
    if judge == "offline" and judge_backbone is None:
        if backbone is not None and judge_model == model:  # the run's own model judges: reuse it
            judge_backbone = backbone
        else:
            from safesteer.models import load_backbone  # torch: only when the judge model is loaded

            judge_backbone = load_backbone(judge_model, device=device)
    return make_judge(judge, backbone=judge_backbone)


def build_screen(
    backbone,
    df,
    *,
    layer: int | None,
    read_layer: int | None,
    candidates: int,
    categories: tuple[str, ...],
    data_dir: Path | None,
    readout_rows: int,
    screen_texts: int,
    seed: int,
    alpha_scale: float,
    r_threshold: float,
    say: Callable[[str], None] = say,
):
    """The causal screen: read-out probes at ``read_layer`` for the candidates' concepts, steering at
    ``layer``."""
    if layer is None:
        raise SafesteerError("cannot tell the SAE's layer; pass --layer")
    rl = read_layer if read_layer is not None else backbone.n_layers - 1
    cand = S.category_candidates(df, candidates, categories)
    say(f"training read-out probes at layer {rl} for {cand['concept'].nunique()} concepts")
    readouts = train_readouts(
        backbone,
        rl,
        cand["concept"].unique().tolist(),
        data_dir=data_dir,
        max_per_part=readout_rows,
        n_eval=screen_texts,
        seed=seed,
    )
    if not readouts:
        raise SafesteerError("no read-out probe could be trained for screening; check --data-dir")
    return CausalScreen(backbone, int(layer), rl, readouts, alpha_scale=alpha_scale, r_threshold=r_threshold)


def build_embedder():
    """The sentence embedder of the de-duplication step (MiniLM)."""
    return MiniLMEmbedder()


def _with_max_activation(df, top_acts):
    """The atom's strongest observed activation (it sets the screening step)."""
    if top_acts is None or not len(top_acts):
        return df
    return df.merge(
        top_acts.groupby("atom")["activation"].max().rename("max_act"),
        left_on="atom",
        right_index=True,
        how="left",
    )


def select_filtered_mode(
    df,
    summary: dict,
    map_dir: Path,
    out: Path,
    *,
    sae: Path | None = None,
    candidates: int,
    judge: str,
    screen: bool,
    model: str | None,
    judge_model: str,
    layer: int | None,
    read_layer: int | None,
    alpha_scale: float,
    r_threshold: float,
    data_dir: Path | None,
    dedup: bool,
    threshold: float,
    screen_texts: int,
    readout_rows: int,
    seed: int,
    show_progress: bool,
    categories: tuple[str, ...],
    backbone=None,
    judge_backbone=None,
    embedder=None,
    W_dec: np.ndarray | None = None,
    device: str = "cpu",
    say: Callable[[str], None] = say,
) -> dict[str, Any]:
    from safesteer.cartography.cards import build_cards, lookup_texts  # torch: only for the filtered mode

    acts_info = summary.get("acts", {})
    model = model or acts_info.get("model") or "smollm2-135m"
    if W_dec is None and sae is not None:
        W_dec = load_decoder(sae)
    if W_dec is None and screen:
        raise SafesteerError("--screen needs --sae (the decoder directions to steer along)")
    if backbone is None and (screen or W_dec is not None):
        from safesteer.models import load_backbone  # torch

        say(f"loading {model}")
        backbone = load_backbone(model, device=device)
    the_judge = build_judge(
        judge,
        backbone=backbone,
        model=model,
        judge_model=judge_model,
        judge_backbone=judge_backbone,
        device=device,
    )
    top_path = map_dir / layout.TOP_ACTIVATIONS
    top_acts = pd.read_parquet(top_path) if top_path.is_file() else None
    df = _with_max_activation(df, top_acts)
    if W_dec is not None and int(df["atom"].max()) >= W_dec.shape[0]:
        raise SafesteerError(
            f"the atom map has atoms up to {int(df['atom'].max())} but the SAE has {W_dec.shape[0]}; "
            "wrong --sae?"
        )

    all_cards: dict[int, dict] = {}

    def cards_fn(atoms):
        cs = build_cards(
            atoms,
            W_dec=W_dec,
            atom_map=df,
            top_acts=top_acts,
            backbone=backbone,
            text_lookup=lambda ids: lookup_texts(ids, data_dir=data_dir),
        )
        all_cards.update({c["atom"]: c for c in cs})
        return all_cards

    scr = None
    if screen:
        scr = build_screen(
            backbone,
            df,
            layer=layer if layer is not None else acts_info.get("layer"),
            read_layer=read_layer,
            candidates=candidates,
            categories=categories,
            data_dir=data_dir,
            readout_rows=readout_rows,
            screen_texts=screen_texts,
            seed=seed,
            alpha_scale=alpha_scale,
            r_threshold=r_threshold,
            say=say,
        )
    if dedup and embedder is None:
        embedder = build_embedder()
    # every screened atom steers the same texts at the same layer: blocks 0..layer run once
    with (
        backbone.prefix_cache(scr.layer)
        if scr is not None and hasattr(backbone, "prefix_cache")
        else contextlib.nullcontext()
    ):
        result = S.select_filtered(
            df,
            cards=cards_fn,
            judge=the_judge,
            screen=scr,
            W_dec=W_dec,
            embedder=embedder if dedup else None,
            candidates=candidates,
            categories=categories,
            threshold=threshold,
            progress=lambda it, n, desc: progress(it, n, desc, show_progress),
        )
    final = S.final_table(result)
    _write_csv(final, out / layout.FILTERED_CSV)
    _write_csv(result, out / layout.CANDIDATES_CSV)
    flagged = result[result["flag"].astype(str).str.startswith("would make the model less safe")]
    _write_csv(flagged[S.FINAL_COLUMNS], out / layout.FLAGGED_CSV)
    write_json(out / layout.ATOM_CARDS, [all_cards[a] for a in sorted(all_cards)])
    report = {
        "mode": "filtered",
        "candidates": int(len(result)),
        "selected": int(len(final)),
        "verdicts": result["verdict"].value_counts().to_dict(),
        "judge": judge,
        "screen": None
        if scr is None
        else {
            "layer": scr.layer,
            "read_layer": scr.read_layer,
            "alpha_scale": alpha_scale,
            "r_threshold": r_threshold,
            "readouts": {k: v[0].metrics.get("auroc") for k, v in scr.readouts.items()},
        },
        "flagged_less_safe": int(len(flagged)),
        "dedup": bool(dedup),
        "threshold": threshold,
        "per_category": final.groupby("category").size().astype(int).to_dict() if len(final) else {},
    }
    write_json(out / layout.SELECTION, report)
    return report


def run_atoms(
    map_dir: Path,
    out: Path,
    *,
    mode: str,
    sae: Path | None = None,
    k: int = _A.k,
    candidates: int = _A.candidates,
    labels: list[str] | None = None,
    judge: str = _A.judge,
    screen: bool = False,
    model: str | None = None,
    judge_model: str = _A.judge_model,
    layer: int | None = None,
    read_layer: int | None = None,
    alpha_scale: float = _A.alpha_scale,
    r_threshold: float = _A.r_threshold,
    data_dir: Path | None = None,
    dedup: bool = _A.dedup,
    threshold: float = _A.threshold,
    screen_texts: int = _A.screen_texts,
    readout_rows: int = _A.readout_rows,
    seed: int = 0,
    show_progress: bool = True,
    categories: tuple[str, ...] | list[str] | None = None,
    backbone=None,
    judge_backbone=None,
    embedder=None,
    W_dec: np.ndarray | None = None,
    device: str = "cpu",
    say: Callable[[str], None] = say,
) -> dict[str, Any]:
    """One selection mode over the map in ``map_dir``; writes its CSV(s) and selection.json to ``out``."""
    map_dir = Path(map_dir)
    df, summary = read_map(map_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "topk":
        return select_topk_mode(df, out, labels, k)
    if mode == "all-positive":
        return select_all_positive_mode(df, out, labels)
    if mode != "filtered":
        raise SafesteerError(f"unknown mode '{mode}'; valid choices: all-positive, filtered, topk")
    return select_filtered_mode(
        df,
        summary,
        map_dir,
        out,
        sae=sae,
        candidates=candidates,
        judge=judge,
        screen=screen,
        model=model,
        judge_model=judge_model,
        layer=layer,
        read_layer=read_layer,
        alpha_scale=alpha_scale,
        r_threshold=r_threshold,
        data_dir=data_dir,
        dedup=dedup,
        threshold=threshold,
        screen_texts=screen_texts,
        readout_rows=readout_rows,
        seed=seed,
        show_progress=show_progress,
        categories=tuple(categories) if categories else S.MACRO_CATEGORIES,
        backbone=backbone,
        judge_backbone=judge_backbone,
        embedder=embedder,
        W_dec=W_dec,
        device=device,
        say=say,
    )


# ---------------------------------------------------------------------------------------- stage
