"""Extraction under ``torchrun``: shards dealt round-robin to the ranks, one store, single-process bytes.

Every rank streams the same (deterministic) row plan; shard ``k`` is computed by rank
``k % WORLD_SIZE`` and committed with a record (:mod:`safesteer.store.commits`); after a barrier
rank 0 writes the manifests. Batching is a function of a shard's rows only, so the files equal
those of one process, whatever the number of ranks -- and a killed run resumes with any number.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from safesteer.distributed import Dist
from safesteer.extract.core import ExtractConfig, ExtractReport, extract
from safesteer.models.backbone import Backbone


def run_extract(
    backbone: Backbone,
    rows: Iterable[tuple[str, Any]],
    out: str | Path,
    cfg: ExtractConfig,
    dist: Dist | None = None,
    *,
    overwrite: bool = False,
    total: int | None = None,
    progress: bool = True,
) -> ExtractReport:
    """:func:`safesteer.extract.extract` on one rank of ``dist`` (plain extraction when not distributed).

    On rank 0 the report's counts (rows, shards computed/reused, tokens) are totals over the ranks.
    """
    if dist is None or not dist.enabled:
        return extract(backbone, rows, out, cfg, overwrite=overwrite, total=total, progress=progress)
    dist.agree(
        {
            "config": asdict(cfg),
            "out": str(out),
            "overwrite": bool(overwrite),
            "d_model": backbone.d_model,
            "n_layers": backbone.n_layers,
        },
        "extract",
    )
    rep = extract(
        backbone,
        rows,
        out,
        cfg,
        overwrite=overwrite,
        total=None,
        progress=progress and dist.is_writer,
        rank=dist.rank,
        world=dist.world,
        sync=lambda: dist.barrier("extraction"),
    )
    tot = dist.sum_int([rep.rows, rep.shards_done, rep.shards_skipped, rep.tokens], "the extraction report")
    rep.rows, rep.shards_done, rep.shards_skipped, rep.tokens = tot
    return rep


__all__ = ["run_extract"]
