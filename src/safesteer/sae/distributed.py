"""Data-parallel Gated SAE training: the global batch split across ranks, gradients all-reduced.

Every rank reads the same deterministic batch stream (``batches(epoch, split)``) and keeps its
contiguous slice ``[n·r/W, n·(r+1)/W)`` of each global training batch of ``n`` rows. The loss is a
mean over rows, so the single-process gradient is ``Σ_r (n_r / n) · g_r``: each rank scales its
gradient by ``n_r / n`` and one fused ``all_reduce`` (sum) over the flattened gradients gives
every rank the same global gradient. The constrained-Adam step and the decoder renormalisation
are deterministic functions of (weights, gradient, moments), so the weights stay identical on
every rank and equal single-process training with the same global batch to float tolerance.

* A global batch with fewer rows than ranks (the last of an epoch) is processed whole by every
  rank with weight ``1/W`` -- still the single-process gradient, and no rank idles in a collective.
* The initialisation sample (scaling factor, geometric-median ``b_dec``) is drawn from the
  *global* stream on every rank, as one process would; validation runs on the whole validation
  split on every rank (identical numbers, hence identical early stopping on every rank).
* Only rank 0 writes checkpoints, ``metrics.json`` and ``sae/`` (``Trainer(is_writer=...)``). A
  checkpoint's data position counts global batches, so a run resumes with any number of ranks.
* Training-split statistics in the history (train loss, dead-latent fraction) are those of
  rank 0's slices; the weights and validation metrics are global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from safesteer.distributed import Dist, collective
from safesteer.errors import SafesteerError
from safesteer.sae.config import TrainConfig
from safesteer.sae.grid import run_grid
from safesteer.sae.trainer import BatchSource, Trainer, TrainResult


@dataclass
class _Slice:
    H: Any
    ids: Any = None


def _rows(H: Any) -> int:
    return int(H.shape[0]) if hasattr(H, "shape") else len(H)


class GradientAllReduce:
    """The ``reduce_grads`` hook and the slicing batch source of one rank."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.weight = 1.0  # this rank's n_r / n for the batch being trained on
        self.trainer: Trainer | None = None

    def slice_rows(self, n: int) -> tuple[int, int, float]:
        """(start, stop, weight) of this rank's part of a global batch of ``n`` rows."""
        W, r = self.dist.world, self.dist.rank
        if n < W:
            return 0, n, 1.0 / W
        lo, hi = n * r // W, n * (r + 1) // W
        return lo, hi, (hi - lo) / n

    def batches(self, source: BatchSource) -> BatchSource:
        def sliced(epoch: int, split: str) -> Iterator[Any]:
            for item in source(epoch, split):
                # the initialisation sample and validation see the global stream
                if split != "train" or self.trainer is None or not self.trainer.initialised:
                    yield item
                    continue
                H, ids = (item.H, getattr(item, "ids", None)) if hasattr(item, "H") else (item, None)
                n = _rows(H)
                lo, hi, self.weight = self.slice_rows(n)
                yield _Slice(H[lo:hi], None if ids is None else ids[lo:hi])

        return sliced

    @torch.no_grad()
    def reduce_grads(self, grads: dict[str, torch.Tensor]) -> None:
        names = sorted(grads)  # the same order on every rank
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        flat.mul_(self.weight)
        with collective(
            self.dist, f"the gradient all-reduce of step {self.trainer.step + 1 if self.trainer else '?'}"
        ):
            torch.distributed.all_reduce(flat)
        offset = 0
        for n in names:
            g = grads[n]
            k = g.numel()
            g.copy_(flat[offset : offset + k].view(g.shape))
            offset += k


def _latest_checkpoint(out_dir: Any) -> str:
    d = os.path.join(str(out_dir), "checkpoints") if out_dir is not None else None
    if d is None or not os.path.isdir(d):
        return ""
    names = sorted(n for n in os.listdir(d) if n.startswith("ckpt-"))
    return names[-1] if names else ""


def train_distributed(
    batches: BatchSource,
    d_in: int,
    cfg: TrainConfig,
    out_dir: str | os.PathLike | None,
    dist: Dist,
    *,
    resume: bool = False,
    data_identity: dict[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    sae_metadata: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on ``dist.world`` ranks (``dist.device`` each); plain :class:`Trainer` when not distributed."""
    if not dist.enabled:
        return Trainer(
            cfg,
            d_in,
            out_dir,
            device=dist.device,
            data_identity=data_identity,
            on_step=on_step,
            on_epoch=on_epoch,
            sae_metadata=sae_metadata,
        ).fit(batches, resume=resume)
    dist.agree(
        {
            "train": cfg.to_dict(),
            "d_in": int(d_in),
            "data": data_identity or {},
            "out": str(out_dir),
            "resume": bool(resume),
            "latest_checkpoint": _latest_checkpoint(out_dir) if resume else "",
        },
        "train-sae",
    )
    if next(iter(batches(0, "val")), None) is None:
        raise SafesteerError(
            "distributed SAE training needs validation rows (early stopping must agree across ranks); "
            "use --val-fraction > 0"
        )
    hook = GradientAllReduce(dist)
    tr = Trainer(
        cfg,
        d_in,
        out_dir,
        device=dist.device,
        data_identity=data_identity,
        on_step=on_step if dist.is_writer else None,
        on_epoch=on_epoch if dist.is_writer else None,
        sae_metadata=sae_metadata,
        reduce_grads=hook.reduce_grads,
        is_writer=dist.is_writer,
    )
    hook.trainer = tr
    res = tr.fit(hook.batches(batches), resume=resume)
    table = dist.all_gather_int(params_digest(tr.params), "the end-of-training weight check")
    bad = [r for r, row in enumerate(table) if row != table[0]]
    if bad:  # would mean a non-deterministic reduction: refuse rather than save one rank's view
        raise SafesteerError(
            f"rank(s) {bad} ended with other SAE weights than rank 0; the collective backend is not "
            "deterministic here -- train on one process or report this setup"
        )
    dist.barrier("the end of SAE training")  # rank 0 has written sae/ and metrics.json
    return res


def grid_distributed(
    batches: BatchSource,
    d_in: int,
    base: TrainConfig,
    out_dir: str | os.PathLike,
    dist: Dist,
    *,
    data_identity: dict[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_run: Callable[[str, TrainConfig], None] | None = None,
    sae_metadata: dict[str, Any] | None = None,
    device: str | None = None,
    **grid: Any,
) -> Any:
    """:func:`safesteer.sae.grid.run_grid` with every run trained by :func:`train_distributed` (rank 0 writes;
    ``device`` is ignored: each rank computes on ``dist.device``)."""

    def fit(cfg: TrainConfig, folder: Any, resume: bool) -> TrainResult:
        return train_distributed(
            batches,
            d_in,
            cfg,
            folder,
            dist,
            resume=resume,
            data_identity=data_identity,
            on_step=on_step,
            on_epoch=on_epoch,
            sae_metadata=sae_metadata,
        )

    res = run_grid(
        batches,
        d_in,
        base,
        out_dir,
        device=dist.device,
        data_identity=data_identity,
        on_run=on_run if dist.is_writer else None,
        sae_metadata=sae_metadata,
        fit=fit,
        is_writer=dist.is_writer,
        **grid,
    )
    dist.barrier("the end of the SAE grid")  # rank 0 has written grid_results.json and sae/
    return res


def params_digest(trainer_params: dict[str, torch.Tensor]) -> list[int]:
    """Cheap per-tensor fingerprints (sum, sum of squares as float64 bits) to compare ranks' weights."""
    out = []
    for n in sorted(trainer_params):
        t = trainer_params[n].detach().double().cpu()
        out += [
            int(np.float64(float(t.sum())).view(np.int64)),
            int(np.float64(float((t * t).sum())).view(np.int64)),
        ]
    return out


__all__ = ["GradientAllReduce", "grid_distributed", "params_digest", "train_distributed"]
