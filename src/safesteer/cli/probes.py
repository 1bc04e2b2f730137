"""``safesteer probe``, ``safesteer map``, ``map-merge`` and ``safesteer atoms``: option parsing and printing.

The work is done by :func:`safesteer.probes.train.run_probe`, :func:`safesteer.cartography.map.run_map`,
:func:`~safesteer.cartography.map.run_map_merge` and :func:`safesteer.cartography.atoms.run_atoms`;
defaults come from the config sections ([probes], [map], [atoms]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safesteer.cartography.config import AtomSection, MapSection
from safesteer.errors import SafesteerError
from safesteer.probes.config import ProbeSection

DATA_DIR_HELP = "Offline data folder (layout of ../shared/data; default $SAFESTEER_DATA_DIR)."
DEFAULT_CS = "1e-4,1e-3,1e-2,0.1,1,10,100"
_A, _M, _P = AtomSection(), MapSection(), ProbeSection()


def _parse_floats(value: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SafesteerError(f"{what} must be comma-separated numbers, got {value!r}") from None
    if not out or any(c <= 0 for c in out):
        raise SafesteerError(f"{what} must be positive numbers")
    return out


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


# ========================================================================================= register
def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe_cmd(
        acts: Path = typer.Option(..., "--acts", help="Activation store folder (from 'safesteer extract')."),
        label: str = typer.Option(
            ...,
            "--label",
            help="toxicity, harmfulness, toxicity_madlibs, harm_beavertails, emotion:<e>, empathy:<e>, "
            "rtp:<attr>, harm:<cat>, identity:<group>.",
        ),
        out: Path = typer.Option(
            ...,
            "--out",
            help="Output folder (probe.json, probe.safetensors, direction.npy, diffmean.npy, metrics.json).",
        ),
        balanced: bool = typer.Option(_P.balanced, "--balanced/--no-balanced", help="Class-balanced loss."),
        seed: int = typer.Option(0, "--seed"),
        holdout: str = typer.Option(
            _P.holdout,
            "--holdout",
            help="auto (datasets' test split if usable, else id hash), dataset or id.",
        ),
        test_fraction: float = typer.Option(
            _P.test_fraction, "--test-fraction", help="Held-out share for --holdout id."
        ),
        cs: str = typer.Option(
            ",".join(f"{c:g}" for c in _P.cs) or DEFAULT_CS,
            "--cs",
            help="Inverse regularisation strengths tried by CV.",
        ),
        max_rows: Optional[int] = typer.Option(
            _P.max_rows, "--max-rows", help="Subsample the labelled rows."
        ),
    ) -> None:
        """Train an ℓ2 logistic probe (+ DiffMean) on stored activations; report held-out metrics."""
        from safesteer.probes.train import run_probe

        m = run_probe(
            acts,
            label,
            out,
            balanced=balanced,
            seed=seed,
            holdout=holdout,
            test_fraction=test_fraction,
            cs=_parse_floats(cs, "--cs"),
            max_rows=max_rows,
        )
        typer.echo(
            f"probe '{label}': held-out AUROC {m['auroc']:.3f}, accuracy {m['accuracy']:.3f}, F1 "
            f"{m['f1']:.3f} "
            f"(C={m['C']:g}, {m['n_train']} train / {m['n_test']} test rows; DiffMean AUROC "
            f"{m.get('diffmean_auroc', float('nan')):.3f}) -> {out}"
        )

    @app.command("map")
    def map_cmd(
        latents: Path = typer.Option(..., "--latents", help="Sparse latent store (from 'safesteer encode')."),
        acts: Path = typer.Option(
            ..., "--acts", help="The activation store the latents were encoded from (labels, ids)."
        ),
        out: Path = typer.Option(
            ...,
            "--out",
            help="Output folder (atom_map.parquet, summary.json, top_activations.parquet, stats/).",
        ),
        labels: Optional[str] = typer.Option(
            None, "--labels", help="Comma-separated label specs (default: every spec the data supports)."
        ),
        heldout: float = typer.Option(
            _M.heldout, "--heldout", help="Share of rows kept apart for replication (0 = none)."
        ),
        top_k: int = typer.Option(
            _M.top_k, "--top-k", help="Top-activating rows kept per atom for the cards."
        ),
        probe: Optional[list[Path]] = typer.Option(
            None, "--probe", help="Probe folder(s): logit ↔ atom correlations (+ decomposition with --sae)."
        ),
        sae: Optional[Path] = typer.Option(
            None, "--sae", help="SAE folder, for decomposing the probe directions over its decoder."
        ),
        method: str = typer.Option(_M.method, "--method", help="Decomposition: omp, omp-nonneg or nnlasso."),
        min_per_class: int = typer.Option(
            _M.min_per_class, "--min-per-class", help="Skip labels with fewer positive or negative rows."
        ),
        shards: Optional[str] = typer.Option(
            None,
            "--shards",
            help="Only these latent shards (e.g. 0-3,7): a partial map for 'safesteer map-merge'.",
        ),
    ) -> None:
        """Stream the latents once: per (atom, label) Δμ, point-biserial r, Cohen's d, firing rates, concept
        score."""
        from safesteer.cartography.map import run_map

        names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
        if not 0 <= heldout < 1:
            raise SafesteerError("--heldout must be in [0, 1)")
        s = run_map(
            latents,
            acts,
            out,
            labels=names,
            heldout=heldout,
            top_k=top_k,
            probe_dirs=probe,
            sae=sae,
            method=method,
            n_atoms_link=_M.n_atoms_link,
            min_per_class=min_per_class,
            shards=_shard_list(shards) if shards else None,
        )
        typer.echo(
            f"mapped {s['n_atoms']} atoms × {len(s['labels'])} labels over {s['n_rows']} rows in "
            f"{s['seconds']:.1f}s -> {out}"
        )

    @app.command("map-merge")
    def map_merge_cmd(
        part: list[Path] = typer.Option(
            ..., "--part", help="A partial map folder ('safesteer map --shards'); repeat for each."
        ),
        out: Path = typer.Option(..., "--out", help="Output folder for the merged map."),
    ) -> None:
        """Merge partial maps over disjoint latent shards into the map of all of them (exact)."""
        from safesteer.cartography.map import run_map_merge

        s = run_map_merge(list(part), out)
        typer.echo(
            f"merged {len(part)} maps: {s['n_atoms']} atoms × {len(s['labels'])} labels over "
            f"{s['n_rows']} rows -> {out}"
        )

    @app.command("atoms")
    def atoms_cmd(
        map_dir: Path = typer.Option(..., "--map", help="Folder written by 'safesteer map'."),
        out: Path = typer.Option(..., "--out"),
        mode: str = typer.Option("filtered", "--mode", help="topk, all-positive or filtered."),
        sae: Optional[Path] = typer.Option(
            None, "--sae", help="SAE folder (decoder directions: logit lens, screening)."
        ),
        k: int = typer.Option(_A.k, "--k", help="topk: atoms per label."),
        candidates: int = typer.Option(
            _A.candidates, "--candidates", help="filtered: candidates per macro-category."
        ),
        categories: str = typer.Option(
            ",".join(_A.categories),
            "--categories",
            help="filtered: macro-categories to draw candidates from.",
        ),
        labels: Optional[str] = typer.Option(
            None, "--labels", help="topk/all-positive: comma-separated labels (default all)."
        ),
        judge: str = typer.Option(
            _A.judge,
            "--judge",
            help="offline (embedded instruct model), openai (SAFESTEER_JUDGE_* env) or none.",
        ),
        screen: bool = typer.Option(
            _A.screen,
            "--screen/--no-screen",
            help="Causal screening: held-out replication + steering moves a concept read-out.",
        ),
        model: Optional[str] = typer.Option(
            None, "--model", help="Backbone of the SAE (default: the map's model)."
        ),
        judge_model: str = typer.Option(_A.judge_model, "--judge-model", help="Offline judge model."),
        layer: Optional[int] = typer.Option(
            None, "--layer", help="Steering layer (default: the map's layer)."
        ),
        read_layer: Optional[int] = typer.Option(
            None, "--read-layer", help="Read-out layer for screening (default: last)."
        ),
        alpha_scale: float = typer.Option(
            _A.alpha_scale,
            "--alpha-scale",
            help="Screening step α = scale × the atom's largest observed activation.",
        ),
        r_threshold: float = typer.Option(
            _A.r_threshold, "--r-threshold", help="Minimum |r| on the held-out split."
        ),
        screen_texts: int = typer.Option(
            _A.screen_texts, "--screen-texts", help="Validation texts per concept for screening."
        ),
        readout_rows: int = typer.Option(
            _A.readout_rows,
            "--readout-rows",
            help="Texts per dataset part for the screening read-out probes.",
        ),
        dedup: bool = typer.Option(
            _A.dedup, "--dedup/--no-dedup", help="De-duplicate with MiniLM embeddings."
        ),
        threshold: float = typer.Option(
            _A.threshold, "--threshold", help="De-duplication cosine-distance threshold."
        ),
        data_dir: Optional[Path] = typer.Option(
            None, "--data-dir", envvar="SAFESTEER_DATA_DIR", help=DATA_DIR_HELP
        ),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Select atoms: top-k, all-positive, or filtered (judge → causal screen → de-duplication)."""
        from safesteer.cartography.atoms import run_atoms

        names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
        r = run_atoms(
            map_dir,
            out,
            mode=mode,
            sae=sae,
            k=k,
            candidates=candidates,
            labels=names,
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
            categories=[c.strip() for c in categories.split(",") if c.strip()],
        )
        if mode == "filtered":
            typer.echo(
                f"selected {r['selected']} of {r['candidates']} candidate atoms "
                f"({r['flagged_less_safe']} flagged as making the model less safe) -> "
                f"{out / 'final_steering_atoms.csv'}"
            )
        else:
            typer.echo(f"{mode}: {r['rows']} (atom, label) rows over {r['labels']} labels -> {out}")
