"""Cartography under ``torchrun``: each rank maps its latent shards, rank 0 merges.

Rank ``r`` maps the shards ``k`` with ``k % W == r`` (``run_map(shards=...)``) into
``<map>/parts/rank-r-of-W``; after a barrier rank 0 combines the parts with ``run_map_merge``
(exact: streaming sums and top-k merge) into ``<map>``. With one process this is the plain
``run_map``. Encoding the latent store across ranks first is :mod:`safesteer.sae.encode_dist`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from safesteer.cartography import map as cartography_map
from safesteer.distributed import Dist
from safesteer.sae.encode_dist import part_name
from safesteer.sae.latents import LatentStore


def map_distributed(
    latents: str | Path,
    acts: str | Path,
    out: str | Path,
    dist: Dist,
    *,
    run_map: Callable | None = None,
    run_map_merge: Callable | None = None,
    **map_kwargs: Any,
) -> dict[str, Any]:
    """``run_map`` over this rank's latent shards, then (rank 0) ``run_map_merge`` of every rank's part into
    ``out``.

    ``run_map``/``run_map_merge``: the cartography functions (default: ``safesteer.cartography.map``'s);
    ``map_kwargs`` go to ``run_map``. Returns the merged summary on rank 0 and this rank's partial
    summary (or ``{}``) elsewhere.
    """
    run_map = run_map or cartography_map.run_map
    run_map_merge = run_map_merge or cartography_map.run_map_merge
    out = Path(out)
    lat = LatentStore(latents)
    indices = [int(e["index"]) for e in lat.shards]
    if not dist.enabled or len(indices) < 2:
        summary: dict[str, Any] = {}
        if dist.is_writer:
            summary = run_map(Path(latents), Path(acts), out, **map_kwargs)
        dist.barrier("cartography")
        return summary
    dist.agree(
        {
            "latents": str(latents),
            "acts": str(acts),
            "out": str(out),
            "map": {
                k: [str(x) for x in v] if isinstance(v, list) else str(v)
                for k, v in map_kwargs.items()
                if k != "show_progress"
            },
        },
        "map",
    )  # progress is shown by rank 0 only
    parts_root = out / "parts"
    if dist.is_writer and parts_root.is_dir():
        shutil.rmtree(parts_root)  # parts of an earlier run (maybe another world size) would not merge
    dist.barrier("the map set-up")
    mine = [i for i in indices if dist.owns(i)]
    summary = {}
    if mine:
        summary = run_map(
            Path(latents),
            Path(acts),
            parts_root / part_name(dist),
            shards=mine,
            **{**map_kwargs, "show_progress": False},
        )
    dist.barrier("cartography")
    if dist.is_writer:
        parts = [parts_root / f"rank-{r}-of-{dist.world}" for r in range(min(dist.world, len(indices)))]
        summary = run_map_merge(parts, out)
    dist.barrier("the map merge")
    return summary


__all__ = ["map_distributed"]
