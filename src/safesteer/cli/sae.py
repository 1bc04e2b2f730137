"""`safesteer train-sae` and `safesteer encode`."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import typer

from safesteer.errors import SafesteerError


def _float_list(value: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SafesteerError(f"{what} must be comma-separated numbers, got {value!r}") from None
    if not out:
        raise SafesteerError(f"{what} is empty")
    return out


def open_store(path: Path):
    """The activation store at ``path`` (a seam for tests)."""
    from safesteer.store import ActivationStore

    return ActivationStore(path)


def store_identity(store: Any, val_fraction: float, shuffle_buffer: int) -> dict[str, Any]:
    """What makes the batch stream of a store: its shards' hashes, the split and the shuffling."""
    h = hashlib.sha256()
    for s in (store.manifest or {}).get("shards", []):
        h.update(json.dumps([s.get("index"), s.get("rows"), (s.get("sha256") or {}).get("H")]).encode())
    return {"d": int(store.d), "n_rows": int(store.n_rows), "shards_sha256": h.hexdigest()[:16],
            "val_fraction": val_fraction, "shuffle_buffer": shuffle_buffer}


def store_batches(store: Any, batch_size: int, *, val_fraction: float, shuffle_buffer: int, seed: int):
    """``batches(epoch, split)`` over an :class:`~safesteer.store.ActivationStore` (deterministic per epoch)."""

    def batches(epoch: int, split: str):
        return store.iter_batches(
            batch_size, split=split, val_fraction=val_fraction, shuffle_buffer=shuffle_buffer if split == "train" else 0,
            seed=seed, epoch=epoch, with_labels=False,
        )

    return batches


class _Progress:
    """A rich progress bar per training run showing loss, L0 and FVU (stderr; silent when disabled)."""

    def __init__(self, enabled: bool, steps_per_epoch: int | None):
        self.enabled = enabled
        self.steps_per_epoch = steps_per_epoch
        self.bar = None
        self.task = None
        self.run = ""

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  L0 {task.fields[l0]}  FVU {task.fields[fvu]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start_run(self, name: str, cfg: Any) -> None:
        self.run = name
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, visible=True)
        self.task = None

    def on_step(self, info: dict[str, Any]) -> None:
        if self.bar is None:
            return
        desc = f"{self.run + ' ' if self.run else ''}epoch {info['epoch'] + 1}"
        if self.task is None or self.bar.tasks[self.task].description != desc:
            self.task = self.bar.add_task(desc, total=self.steps_per_epoch, loss="-", l0="-", fvu="-")
        self.bar.update(self.task, advance=1, loss=f"{info['loss']:.4g}", l0=f"{info['l0']:.1f}", fvu=f"{info['fvu']:.4f}")

    def on_epoch(self, entry: dict[str, Any]) -> None:
        v = entry.get("val") or {}
        line = (f"epoch {entry['epoch']}: val loss {v.get('loss', float('nan')):.6g}  FVU {v.get('fvu', float('nan')):.4f}  "
                f"L0 {v.get('l0', float('nan')):.1f}  dead {100 * entry['dead_fraction']:.2f}%  gamma {v.get('gamma', float('nan')):.4f}"
                + ("  *" if entry.get("improved") else ""))
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, file=sys.stderr)


def register(app: typer.Typer) -> None:
    @app.command("train-sae")
    def train_sae_cmd(
        acts: Path = typer.Option(..., "--acts", help="Activation store (a layer folder written by 'safesteer extract')."),
        out: Path = typer.Option(..., "--out", help="Output folder: sae/ (cfg.json + sae_weights.safetensors), metrics, checkpoints."),
        expansion: int = typer.Option(32, "--expansion", help="d_sae = expansion x d_in."),
        l1: float = typer.Option(5e-5, "--l1", help="Sparsity coefficient lambda (on activations scaled to unit mean squared norm)."),
        variant: str = typer.Option("paper", "--variant", help="paper (Rajamanoharan et al. 2024) or article (the original article's eqs. 6-9)."),
        epochs: int = typer.Option(5, "--epochs", help="Epochs (with --grid: of the final run of the best configuration)."),
        batch_size: int = typer.Option(8192, "--batch-size"),
        lr: float = typer.Option(3e-4, "--lr"),
        grid: bool = typer.Option(False, "--grid", help="Grid over --grid-expansions x --grid-l1, then continue the best to convergence."),
        grid_expansions: str = typer.Option("32,64", "--grid-expansions"),
        grid_l1: str = typer.Option("1e-4,5e-5", "--grid-l1"),
        grid_epochs: int = typer.Option(5, "--grid-epochs"),
        grid_patience: int = typer.Option(2, "--grid-patience"),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out (bit-exact on CPU)."),
        patience: int = typer.Option(3, "--patience", help="Early-stopping patience in epochs (validation loss)."),
        seed: int = typer.Option(0, "--seed"),
        lr_warmup: int = typer.Option(1000, "--lr-warmup", help="Linear LR warmup steps."),
        l1_warmup: int = typer.Option(0, "--l1-warmup", help="Linear sparsity-coefficient warmup steps."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also checkpoint every N steps (0 = per epoch only)."),
        val_fraction: float = typer.Option(0.05, "--val-fraction", help="Validation split, by row id."),
        shuffle_buffer: int = typer.Option(65536, "--shuffle-buffer", help="Rows shuffled together (0 = store order)."),
        precision: str = typer.Option("auto", "--precision", help="auto (bf16 matmuls only with native bf16 hardware), fp32 or bf16."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Train a Gated SAE on an activation store (grid search optional; resumable)."""
        from safesteer.sae.config import TrainConfig
        from safesteer.sae.grid import run_grid
        from safesteer.sae.metrics import convergence_table
        from safesteer.sae.trainer import Trainer

        if expansion <= 0:
            raise SafesteerError(f"--expansion must be > 0 (got {expansion})")
        if not l1 > 0:
            raise SafesteerError(f"--l1 must be > 0 (got {l1})")
        if not 0.0 <= val_fraction < 1.0:
            raise SafesteerError(f"--val-fraction must lie in [0, 1) (got {val_fraction})")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise SafesteerError("--device cuda requested but no CUDA device is available; use --device cpu")
        from safesteer.distributed import env_world_size, from_env
        from safesteer.sae.distributed import grid_distributed, train_distributed

        dist = from_env(device) if env_world_size() > 1 else None
        store = open_store(acts)
        ident = store_identity(store, val_fraction, shuffle_buffer)
        base = TrainConfig(
            expansion=expansion, l1=l1, variant=variant, lr=lr, lr_warmup_steps=lr_warmup, l1_warmup_steps=l1_warmup,
            batch_size=batch_size, epochs=epochs, patience=patience, seed=seed, precision=precision,
            checkpoint_every=checkpoint_every,
        )
        batches = store_batches(store, batch_size, val_fraction=val_fraction, shuffle_buffer=shuffle_buffer, seed=seed)
        meta = {"dataset_path": str(getattr(store, "path", acts)), "hook_layer": (store.manifest or {}).get("layer"),
                "model_name": (store.manifest or {}).get("model")}
        steps = max(1, -(-int(store.n_rows * (1 - val_fraction)) // batch_size))
        with _Progress(progress and (dist is None or dist.is_writer), steps) as prog:
            if grid:
                grid_fn = run_grid if dist is None else functools.partial(grid_distributed, dist=dist)
                res = grid_fn(
                    batches, store.d, base, out, expansions=[int(x) for x in _float_list(grid_expansions, "--grid-expansions")],
                    l1s=_float_list(grid_l1, "--grid-l1"), grid_epochs=grid_epochs, grid_patience=grid_patience,
                    final_epochs=epochs, final_patience=patience, resume=resume, device=device, data_identity=ident,
                    on_step=prog.on_step, on_epoch=prog.on_epoch, on_run=prog.start_run, sae_metadata=meta,
                )
                if dist is not None and not dist.is_writer:
                    return
                typer.echo(res.table, nl=False)
                final = res.final
                sae_dir = out / "sae"
            elif dist is not None:
                final = train_distributed(batches, store.d, base, out, dist, resume=resume, data_identity=ident, on_step=prog.on_step,
                                          on_epoch=prog.on_epoch, sae_metadata=meta)
                sae_dir = out / "sae"
                if not dist.is_writer:
                    return
            else:
                tr = Trainer(base, store.d, out, device=device, data_identity=ident, on_step=prog.on_step, on_epoch=prog.on_epoch,
                             sae_metadata=meta)
                final = tr.fit(batches, resume=resume)
                sae_dir = out / "sae"
        typer.echo(convergence_table(final.history), nl=False)
        typer.echo(
            f"trained {final.config.expansion}x/{final.config.l1:g} ({final.config.variant}) for {final.steps} steps; "
            f"stopped: {final.stopped}; best epoch {final.best_epoch} (val loss {final.best_val_loss if final.best_val_loss is not None else float('nan'):.6g}); "
            f"SAE -> {sae_dir}"
        )

    @app.command("encode")
    def encode_cmd(
        sae: Path = typer.Option(..., "--sae", help="SAE folder (cfg.json + sae_weights.safetensors)."),
        acts: Path = typer.Option(..., "--acts", help="Activation store (layer folder)."),
        out: Path = typer.Option(..., "--out", help="Output folder for the sparse latent store."),
        batch_size: int = typer.Option(4096, "--batch-size"),
        device: str = typer.Option("cpu", "--device"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Encode activations H into a sparse latent store Z (CSR per shard; resumable)."""
        from safesteer.sae.latents import encode_store
        from safesteer.sae.saving import load_sae

        model = load_sae(sae, device=device)
        store = open_store(acts)
        z = encode_store(model, store, out, batch_size=batch_size, progress=progress)
        m = z.manifest
        dense = m["dense_fp16_bytes_per_row"]
        bpr = m["bytes_per_row"]
        typer.echo(
            f"encoded {z.n_rows} rows into {len(z.shards)} shard(s) -> {out}; mean L0 {m['mean_l0']:.1f} of {z.n_latents}; "
            f"{bpr:.1f} bytes/row vs {dense} bytes/row as dense float16 "
            + (f"({dense / bpr:.1f}x smaller)" if bpr <= dense else f"({bpr / dense:.1f}x larger: the dictionary is tiny)")
        )

