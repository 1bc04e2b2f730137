"""Assemble the run report from the stage outputs (numbers are read from the files, never retyped)."""

from __future__ import annotations

import html
import time
from pathlib import Path

import pandas as pd

from safesteer import layout
from safesteer.evaluate.stats import format_ci
from safesteer.evaluate.suite import METRICS
from safesteer.io import read_json, write_json
from safesteer.pipeline.behaviour_report import sections as behaviour_sections
from safesteer.pipeline.report import Section, hardware, render, versions


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _grid_sections(sae_dir: Path) -> Section:
    sec = Section("Gated SAE: grid search and convergence")
    grid = sae_dir / layout.GRID_RESULTS
    if grid.is_file():
        g = read_json(grid)
        rows = pd.DataFrame(g["rows"])
        cols = [
            c
            for c in (
                "name",
                "expansion",
                "l1",
                "best_val_loss",
                "best_epoch",
                "l0",
                "fvu",
                "gamma",
                "dead_fraction",
                "epochs_run",
                "stopped",
            )
            if c in rows.columns
        ]
        sec.text(
            "Grid over expansion × λ, sorted by best validation loss (the study's Table 1). Best: "
            f"{g.get('best')}."
        )
        sec.table(rows[cols], floatfmt="{:.5g}")
        best_folder = Path(g["rows"][0]["folder"]) if g.get("rows") else None
        if best_folder is not None and (best_folder / "metrics.json").is_file():
            hist = read_json(best_folder / "metrics.json").get("history", [])
            conv = pd.DataFrame(
                [
                    {
                        "epoch": h["epoch"],
                        **{k: (h.get("val") or {}).get(k) for k in ("loss", "mse", "fvu", "l0", "gamma")},
                        "train_loss": (h.get("train") or {}).get("loss"),
                        "dead_fraction": h.get("dead_fraction"),
                    }
                    for h in hist
                ]
            )
            sec.text(
                "Convergence of the selected configuration (validation metrics per epoch; the study's "
                "Table 2). γ < 1 means shrinkage."
            )
            sec.table(conv, floatfmt="{:.5g}")
    return sec


def _cards_section(atoms_dir: Path) -> Section:
    sec = Section("Selected atoms and their cards")
    final = _read_csv(atoms_dir / layout.FILTERED_DIR / layout.FILTERED_CSV)
    cand = _read_csv(atoms_dir / layout.FILTERED_DIR / layout.CANDIDATES_CSV)
    if cand is not None:
        cols = [
            c
            for c in (
                "atom",
                "category",
                "label",
                "verdict",
                "r",
                "r_heldout",
                "replicates",
                "effect",
                "screen_pass",
                "flag",
                "selected",
            )
            if c in cand.columns
        ]
        n_flag = (
            int(cand["flag"].fillna("").astype(str).str.len().gt(0).sum()) if "flag" in cand.columns else 0
        )
        sec.text(
            f"{len(cand)} candidates judged by the offline judge and causally screened; "
            f"{0 if final is None else len(final)} kept; {n_flag} flagged."
        )
        sec.table(cand[cols].head(60), floatfmt="{:.3g}")
    cards_path = atoms_dir / layout.FILTERED_DIR / layout.ATOM_CARDS
    if cards_path.is_file() and final is not None and len(final):
        cards = {c["atom"]: c for c in read_json(cards_path)}
        html_parts = []
        for _, row in final.head(12).iterrows():
            c = cards.get(int(row["atom"]), {})
            toks = c.get("logit_lens", {})
            pos = (
                ", ".join(toks.get("positive", toks.get("top", []))[:10])
                if isinstance(toks, dict)
                else ", ".join(map(str, toks))[:200]
            )
            texts = "".join(
                f"<li>{_esc(t.get('text', '') if isinstance(t, dict) else t)[:220]}</li>"
                for t in (c.get("top_texts") or [])[:4]
            )
            html_parts.append(
                f"<div class='card'><b>atom {int(row['atom'])}</b> · {_esc(str(row.get('category', '')))} · "
                f"{_esc(str(row.get('label', '')))} · verdict "
                f"<b>{_esc(str(row.get('verdict', '')))}</b> · r={row.get('r', float('nan')):.3f}"
                f"<br><span class='note'>{_esc(str(row.get('reason', ''))[:300])}</span>"
                f"<br>logit lens: <code>{_esc(pos)}</code><ul>{texts}</ul></div>"
            )
        sec.html("".join(html_parts))
    return sec


def _esc(s: str) -> str:
    return html.escape(s)


def headline_tables(ev: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(metric × strategy table of unsteered value and Δ [95% CI], per-strategy α table) from the evaluate
    outputs."""
    res = _read_csv(ev / layout.RESULTS_CSV)
    if res is None or not len(res):
        return None, None

    strategies = [s for s in dict.fromkeys(res["strategy"]) if s != "unsteered"]
    rows = []
    for metric in dict.fromkeys(res["metric"]):
        sub = res[res["metric"] == metric].set_index("strategy")
        spec = METRICS.get(metric)
        row = {"metric": spec.label if spec else metric, "better": spec.better if spec else ""}
        if "unsteered" in sub.index:
            u = sub.loc["unsteered"]
            row["unsteered [95% CI]"] = format_ci(u["value"], u["ci_low"], u["ci_high"])
        for s in strategies:
            if s in sub.index:
                r = sub.loc[s]
                mark = " *" if (r["delta_low"] > 0 or r["delta_high"] < 0) else ""
                row[f"{s} Δ"] = format_ci(r["delta"], r["delta_low"], r["delta_high"], signed=True) + mark
        rows.append(row)
    cal = read_json(ev / "calibration.json") if (ev / "calibration.json").is_file() else {}
    alphas = res[res["strategy"] != "unsteered"].drop_duplicates("strategy")
    arows = [
        {
            "strategy": r["strategy"],
            "alpha (× median token norm)": r["alpha"],
            "alpha (raw)": r["alpha_raw"],
            "members": int(r["members"]),
            "how α was chosen": (cal.get(r["strategy"]) or {}).get("reason", ""),
        }
        for _, r in alphas.iterrows()
    ]
    return pd.DataFrame(rows), pd.DataFrame(arows)


def stage_timings(pipe) -> dict[str, float]:
    """Seconds each stage took when it ran (read from its DONE.json, so cached stages keep theirs)."""
    return {name: float(st.info().get("seconds", 0.0)) for name, st in pipe.st.items() if st.done}


def build_report(pipe) -> Path:
    cfg, st = pipe.cfg, pipe.st
    sections: list[Section] = []
    if "behaviour" in st and st["behaviour"].done:  # the verdict a reader gets in ten seconds comes first
        sections += behaviour_sections(st["behaviour"].dir, pipe.out)
    ev = st["evaluate"].dir
    head = Section("Study metrics: steering strategies (test split, 95% bootstrap CIs, Δ vs unsteered)")
    metric_table, alpha_table = headline_tables(ev)
    if metric_table is not None:
        head.text(
            "Δ = steered − unsteered, paired on the same test items, with a 95% bootstrap CI; * marks "
            "a CI that excludes 0. "
            "'better' says which way is safer or better (fifty = 50 is unbiased). α was chosen per "
            "strategy on a "
            "disjoint validation split, as the largest safety gain within the fluency budget; α = 0 "
            "means no value of the grid helped, and the strategy is reported unsteered."
        )
        head.table(metric_table)
        head.table(
            alpha_table,
            caption="Chosen α per strategy (α > 0 steers away from the unsafe direction)",
            floatfmt="{:.4g}",
        )
    table = _read_csv(ev / "table.csv")
    if table is not None:
        head.table(
            table,
            caption="All values (value [95% CI]) and Δ with p-values, as in table.csv",
            floatfmt="{:.4g}",
        )
    sections.append(head)
    figs = Section("Figures")
    for name, cap in (
        ("safety.png", "Mean toxicity / harm per strategy; dashed line = unsteered (study Fig. 3)"),
        ("bias.png", "CrowS-Pairs and StereoSet per strategy (study Fig. 4)"),
        ("choice_deltas.png", "ΔP(Yes) / ΔP(No) per prompt type (study Fig. 5)"),
        ("alpha_sweep.png", "α sweep on the validation split, per strategy"),
        ("entanglement.png", "Entanglement matrix: effect (z) of each strategy on every metric"),
    ):
        figs.image(ev / "plots" / name, cap)
    sections.append(figs)
    ent = _read_csv(ev / "entanglement.csv")
    if ent is not None:
        sections.append(
            Section("Entanglement matrix")
            .text("Standardised effect of each strategy on every metric.")
            .table(ent, floatfmt="{:.3g}")
        )
    pm = st["probes"].dir / layout.PROBE_METRICS
    if pm.is_file():
        m = read_json(pm)
        df = pd.DataFrame(
            [
                {"probe": k, **{kk: v for kk, v in vals.items() if not isinstance(v, (dict, list))}}
                for k, vals in m.items()
            ]
        )
        sections.append(
            Section("Probes (held-out metrics)")
            .text(
                "ℓ2 logistic regression on pooled activations; C by cross-validation; metrics on "
                "held-out rows."
            )
            .table(df, floatfmt="{:.4g}")
        )
    sections.append(_grid_sections(st["sae"].dir))
    msum = st["map"].dir / layout.MAP_SUMMARY
    if msum.is_file():
        s = read_json(msum)
        sec = Section("Concept cartography")
        sec.text(
            f"{s['n_atoms']} atoms × {len(s['labels'])} labels over {s['n_rows']} rows in one "
            f"streaming pass. {s.get('score', '')}"
        )
        link = s.get("link") or {}
        if link:
            sec.table(
                pd.DataFrame(
                    [{"probe": k, "reconstruction cosine (OMP, 16 atoms)": v} for k, v in link.items()]
                ),
                floatfmt="{:.3f}",
            )
        top = [
            {"label": lab, "atom": a["atom"], "score": a["score"], "r": a["r"]}
            for lab, atoms in (s.get("top_atoms") or {}).items()
            if lab in ("toxicity", "harmfulness")
            for a in atoms
        ]
        if top:
            sec.table(pd.DataFrame(top), floatfmt="{:.3g}")
        sections.append(sec)
    sections.append(_cards_section(st["atoms"].dir))
    seconds = stage_timings(pipe)
    repro = {
        "config": str(pipe.out / "config.toml"),
        "model": cfg.model.name,
        "layer": cfg.model.layer,
        "seed": cfg.run.seed,
        "hardware": hardware(),
        **{f"version {k}": v for k, v in versions().items()},
        "stage timings (s)": ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        + f"; this invocation {pipe.timings.get('total', 0.0):.0f}",
        "stage status": ", ".join(f"{k}: {v}" for k, v in pipe.status.items()),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    html_path, _ = render(f"safesteer run: {cfg.run.name}", sections, repro, pipe.out)
    write_json(
        pipe.out / layout.RUN_SUMMARY,
        {
            "timings": pipe.timings,
            "stage_seconds": seconds,
            "status": pipe.status,
            "stages": {k: str(v.dir) for k, v in st.items()},
        },
    )
    return html_path
