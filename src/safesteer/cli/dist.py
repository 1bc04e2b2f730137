"""`safesteer encode-map`: encode + cartography in one command (each rank its shards under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safesteer.errors import SafesteerError


def register(app: typer.Typer) -> None:
    @app.command("encode-map")
    def encode_map_cmd(
        sae: Path = typer.Option(..., "--sae", help="SAE folder (cfg.json + sae_weights.safetensors)."),
        acts: Path = typer.Option(..., "--acts", help="Activation store (layer folder)."),
        latents: Path = typer.Option(
            ..., "--latents", help="Output folder for the sparse latent store (reused when complete)."
        ),
        out: Path = typer.Option(
            ..., "--out", help="Output folder for the atom map (per-rank parts under parts/)."
        ),
        labels: Optional[str] = typer.Option(
            None, "--labels", help="Comma-separated label specs (default: every spec the data supports)."
        ),
        heldout: float = typer.Option(
            0.2, "--heldout", help="Share of rows kept apart for replication (0 = none)."
        ),
        top_k: int = typer.Option(10, "--top-k", help="Top-activating rows kept per atom for the cards."),
        min_per_class: int = typer.Option(
            5, "--min-per-class", help="Skip labels with fewer positive or negative rows."
        ),
        batch_size: int = typer.Option(4096, "--batch-size", help="Encoding batch size."),
        device: str = typer.Option(
            "cpu", "--device", help="cpu (gloo between ranks) or cuda (NCCL; cuda:LOCAL_RANK per rank)."
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Encode activations and map the atoms; under torchrun each rank does its shards and rank 0
        merges."""
        from safesteer.cartography.map_dist import map_distributed
        from safesteer.devices import resolve_device
        from safesteer.distributed import from_env
        from safesteer.sae.encode_dist import encode_distributed
        from safesteer.sae.saving import load_sae

        try:  # where the cartography functions live (moving out of cli/probes.py)
            from safesteer.cartography.map import run_map, run_map_merge  # type: ignore[import-not-found]
        except ImportError:
            from safesteer.cli.probes import run_map, run_map_merge

        if not 0 <= heldout < 1:
            raise SafesteerError("--heldout must be in [0, 1)")
        names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
        dist = from_env(resolve_device(device))
        model = load_sae(sae, device=dist.device)
        z = encode_distributed(
            model, acts, latents, dist, batch_size=batch_size, progress=progress and dist.is_writer
        )
        s = map_distributed(
            latents,
            acts,
            out,
            dist,
            run_map=run_map,
            run_map_merge=run_map_merge,
            labels=names,
            heldout=heldout,
            top_k=top_k,
            min_per_class=min_per_class,
            show_progress=progress and dist.is_writer,
        )
        if dist.is_writer:
            typer.echo(
                f"encoded {z.n_rows} rows into {len(z.shards)} shard(s) -> {latents}; mapped "
                f"{s['n_atoms']} atoms × "
                f"{len(s['labels'])} labels over {s['n_rows']} rows on {dist.world} rank(s) -> {out}"
            )
