"""`safesteer train-sae` and `safesteer encode`: option parsing and printing.

The work is :func:`safesteer.sae.run.train_on_store` and :func:`safesteer.sae.run.encode`; every
default comes from the config's [sae] / [encode] sections.
"""

from __future__ import annotations

from pathlib import Path

import typer

from safesteer.errors import SafesteerError
from safesteer.sae.config import EncodeSection, SAESection

_S, _E = SAESection(), EncodeSection()


def _float_list(value: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SafesteerError(f"{what} must be comma-separated numbers, got {value!r}") from None
    if not out:
        raise SafesteerError(f"{what} is empty")
    return out


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def register(app: typer.Typer) -> None:
    @app.command("train-sae")
    def train_sae_cmd(
        acts: Path = typer.Option(
            ..., "--acts", help="Activation store (a layer folder written by 'safesteer extract')."
        ),
        out: Path = typer.Option(
            ...,
            "--out",
            help="Output folder: sae/ (cfg.json + sae_weights.safetensors), metrics, checkpoints.",
        ),
        expansion: int = typer.Option(_S.expansions[0], "--expansion", help="d_sae = expansion x d_in."),
        l1: float = typer.Option(
            _S.l1[0],
            "--l1",
            help="Sparsity coefficient lambda (on activations scaled to unit mean squared norm).",
        ),
        variant: str = typer.Option(
            _S.variant,
            "--variant",
            help="paper (Rajamanoharan et al. 2024) or article (the original article's eqs. 6-9).",
        ),
        epochs: int = typer.Option(
            _S.epochs, "--epochs", help="Epochs (with --grid: of the final run of the best configuration)."
        ),
        batch_size: int = typer.Option(_S.batch_size, "--batch-size"),
        lr: float = typer.Option(_S.lr, "--lr"),
        grid: bool = typer.Option(
            False,
            "--grid",
            help="Grid over --grid-expansions x --grid-l1, then continue the best to convergence.",
        ),
        grid_expansions: str = typer.Option(_csv(_S.expansions), "--grid-expansions"),
        grid_l1: str = typer.Option(_csv(_S.l1), "--grid-l1"),
        grid_epochs: int = typer.Option(_S.grid_epochs, "--grid-epochs"),
        grid_patience: int = typer.Option(_S.grid_patience, "--grid-patience"),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from the latest checkpoint in --out (bit-exact on CPU)."
        ),
        patience: int = typer.Option(
            _S.patience, "--patience", help="Early-stopping patience in epochs (validation loss)."
        ),
        seed: int = typer.Option(0, "--seed"),
        lr_warmup: int = typer.Option(_S.lr_warmup, "--lr-warmup", help="Linear LR warmup steps."),
        l1_warmup: int = typer.Option(
            _S.l1_warmup, "--l1-warmup", help="Linear sparsity-coefficient warmup steps."
        ),
        checkpoint_every: int = typer.Option(
            _S.checkpoint_every,
            "--checkpoint-every",
            help="Also checkpoint every N steps (0 = per epoch only).",
        ),
        val_fraction: float = typer.Option(
            _S.val_fraction, "--val-fraction", help="Validation split, by row id."
        ),
        shuffle_buffer: int = typer.Option(
            _S.shuffle_buffer, "--shuffle-buffer", help="Rows shuffled together (0 = store order)."
        ),
        precision: str = typer.Option(
            _S.precision,
            "--precision",
            help="auto (bf16 matmuls only with native bf16 hardware), fp32 or bf16.",
        ),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Train a Gated SAE on an activation store (grid search optional; resumable)."""
        from safesteer.distributed import env_world_size, from_env
        from safesteer.sae.config import TrainConfig
        from safesteer.sae.metrics import convergence_table
        from safesteer.sae.run import train_on_store

        if expansion <= 0:
            raise SafesteerError(f"--expansion must be > 0 (got {expansion})")
        if not l1 > 0:
            raise SafesteerError(f"--l1 must be > 0 (got {l1})")
        base = TrainConfig(
            expansion=expansion,
            l1=l1,
            variant=variant,
            lr=lr,
            lr_warmup_steps=lr_warmup,
            l1_warmup_steps=l1_warmup,
            batch_size=batch_size,
            epochs=epochs,
            patience=patience,
            seed=seed,
            precision=precision,
            checkpoint_every=checkpoint_every,
        )
        grid_spec = None
        if grid:
            grid_spec = {
                "expansions": [int(x) for x in _float_list(grid_expansions, "--grid-expansions")],
                "l1s": _float_list(grid_l1, "--grid-l1"),
                "grid_epochs": grid_epochs,
                "grid_patience": grid_patience,
            }
        dist = from_env(device) if env_world_size() > 1 else None  # under torchrun: data-parallel
        final, table = train_on_store(
            acts,
            out,
            base,
            val_fraction=val_fraction,
            shuffle_buffer=shuffle_buffer,
            device=device,
            grid=grid_spec,
            resume=resume,
            show_progress=progress,
            dist=dist,
        )
        if dist is not None and not dist.is_writer:
            return
        if table is not None:
            typer.echo(table, nl=False)
        typer.echo(convergence_table(final.history), nl=False)
        typer.echo(
            f"trained {final.config.expansion}x/{final.config.l1:g} ({final.config.variant}) for "
            f"{final.steps} steps; "
            f"stopped: {final.stopped}; best epoch {final.best_epoch} (val loss "
            f"{final.best_val_loss if final.best_val_loss is not None else float('nan'):.6g}); "
            f"SAE -> {out / 'sae'}"
        )

    @app.command("encode")
    def encode_cmd(
        sae: Path = typer.Option(..., "--sae", help="SAE folder (cfg.json + sae_weights.safetensors)."),
        acts: Path = typer.Option(..., "--acts", help="Activation store (layer folder)."),
        out: Path = typer.Option(..., "--out", help="Output folder for the sparse latent store."),
        batch_size: int = typer.Option(_E.batch_size, "--batch-size"),
        device: str = typer.Option("cpu", "--device"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Encode activations H into a sparse latent store Z (CSR per shard; resumable)."""
        from safesteer.sae.run import encode

        z = encode(sae, acts, out, batch_size=batch_size, device=device, show_progress=progress)
        m = z.manifest
        dense = m["dense_fp16_bytes_per_row"]
        bpr = m["bytes_per_row"]
        typer.echo(
            f"encoded {z.n_rows} rows into {len(z.shards)} shard(s) -> {out}; mean L0 "
            f"{m['mean_l0']:.1f} of {z.n_latents}; "
            f"{bpr:.1f} bytes/row vs {dense} bytes/row as dense float16 "
            + (
                f"({dense / bpr:.1f}x smaller)"
                if bpr <= dense
                else f"({bpr / dense:.1f}x larger: the dictionary is tiny)"
            )
        )
