"""Drive SAE training on an activation store (single run or grid) and encode a store; the sae and
encode stages of the pipeline."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from safesteer.errors import SafesteerError
from safesteer.sae.distributed import grid_distributed, train_distributed
from safesteer.sae.grid import run_grid
from safesteer.sae.latents import encode_store
from safesteer.sae.saving import load_sae
from safesteer.sae.trainer import Trainer
from safesteer.store import ActivationStore


def open_store(path: Path):
    """The activation store at ``path`` (a seam for tests)."""
    return ActivationStore(path)


def store_identity(store: Any, val_fraction: float, shuffle_buffer: int) -> dict[str, Any]:
    """What makes the batch stream of a store: its shards' hashes, the split and the shuffling."""
    h = hashlib.sha256()
    for s in (store.manifest or {}).get("shards", []):
        h.update(json.dumps([s.get("index"), s.get("rows"), (s.get("sha256") or {}).get("H")]).encode())
    return {
        "d": int(store.d),
        "n_rows": int(store.n_rows),
        "shards_sha256": h.hexdigest()[:16],
        "val_fraction": val_fraction,
        "shuffle_buffer": shuffle_buffer,
    }


def store_batches(store: Any, batch_size: int, *, val_fraction: float, shuffle_buffer: int, seed: int):
    """``batches(epoch, split)`` over an :class:`~safesteer.store.ActivationStore` (deterministic per
    epoch)."""

    def batches(epoch: int, split: str):
        return store.iter_batches(
            batch_size,
            split=split,
            val_fraction=val_fraction,
            shuffle_buffer=shuffle_buffer if split == "train" else 0,
            seed=seed,
            epoch=epoch,
            with_labels=False,
        )

    return batches


class TrainProgress:
    """A rich progress bar per training run showing loss, L0 and FVU (stderr; silent when disabled)."""

    def __init__(self, enabled: bool, steps_per_epoch: int | None):
        self.enabled = enabled
        self.steps_per_epoch = steps_per_epoch
        self.bar = None
        self.task = None
        self.run = ""

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  L0 {task.fields[l0]}  FVU {task.fields[fvu]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
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
        self.bar.update(
            self.task, advance=1, loss=f"{info['loss']:.4g}", l0=f"{info['l0']:.1f}", fvu=f"{info['fvu']:.4f}"
        )

    def on_epoch(self, entry: dict[str, Any]) -> None:
        v = entry.get("val") or {}
        line = (
            f"epoch {entry['epoch']}: val loss {v.get('loss', float('nan')):.6g}  FVU "
            f"{v.get('fvu', float('nan')):.4f}  "
            f"L0 {v.get('l0', float('nan')):.1f}  dead {100 * entry['dead_fraction']:.2f}%  gamma "
            f"{v.get('gamma', float('nan')):.4f}" + ("  *" if entry.get("improved") else "")
        )
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, file=sys.stderr)


def train_on_store(
    acts: Path,
    out: Path,
    base: Any,
    *,
    val_fraction: float,
    shuffle_buffer: int,
    device: str = "cpu",
    grid: dict[str, Any] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    dist: Any = None,
):
    """Train one SAE (``grid=None``) or a grid (``grid``: expansions, l1s, grid_epochs, grid_patience)
    on the store at ``acts``; the selected SAE lands in ``out/sae``. Returns (final TrainResult, grid table or
    None).

    ``dist``: a :class:`safesteer.distributed.Dist` with several ranks trains data-parallel
    (:mod:`safesteer.sae.distributed`; rank 0 writes, progress on rank 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise SafesteerError(f"--val-fraction must lie in [0, 1) (got {val_fraction})")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SafesteerError("--device cuda requested but no CUDA device is available; use --device cpu")
    store = open_store(acts)
    ident = store_identity(store, val_fraction, shuffle_buffer)
    batches = store_batches(
        store, base.batch_size, val_fraction=val_fraction, shuffle_buffer=shuffle_buffer, seed=base.seed
    )
    meta = {
        "dataset_path": str(getattr(store, "path", acts)),
        "hook_layer": (store.manifest or {}).get("layer"),
        "model_name": (store.manifest or {}).get("model"),
    }
    steps = max(1, -(-int(store.n_rows * (1 - val_fraction)) // base.batch_size))
    distributed = dist is not None and dist.enabled
    with TrainProgress(show_progress and (not distributed or dist.is_writer), steps) as prog:
        if grid is not None:
            grid_fn = functools.partial(grid_distributed, dist=dist) if distributed else run_grid
            res = grid_fn(
                batches,
                store.d,
                base,
                out,
                expansions=list(grid["expansions"]),
                l1s=list(grid["l1s"]),
                grid_epochs=grid["grid_epochs"],
                grid_patience=grid["grid_patience"],
                final_epochs=base.epochs,
                final_patience=base.patience,
                resume=resume,
                device=device,
                data_identity=ident,
                on_step=prog.on_step,
                on_epoch=prog.on_epoch,
                on_run=prog.start_run,
                sae_metadata=meta,
            )
            return res.final, res.table
        if distributed:
            return train_distributed(
                batches,
                store.d,
                base,
                out,
                dist,
                resume=resume,
                data_identity=ident,
                on_step=prog.on_step,
                on_epoch=prog.on_epoch,
                sae_metadata=meta,
            ), None
        tr = Trainer(
            base,
            store.d,
            out,
            device=device,
            data_identity=ident,
            on_step=prog.on_step,
            on_epoch=prog.on_epoch,
            sae_metadata=meta,
        )
        return tr.fit(batches, resume=resume), None


def encode(
    sae: Path, acts: Path, out: Path, *, batch_size: int, device: str = "cpu", show_progress: bool = True
):
    """Encode the store at ``acts`` with the SAE at ``sae`` into a sparse latent store at ``out``."""
    model = load_sae(sae, device=device)
    return encode_store(model, open_store(acts), out, batch_size=batch_size, progress=show_progress)
