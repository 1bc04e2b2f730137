"""Encoding an activation store with an SAE under ``torchrun``: each rank encodes its shards, rank 0
assembles them.

Rank ``r`` encodes the activation shards ``k`` with ``k % W == r`` into its own part store
``<latents>/.parts/rank-r-of-W`` (:func:`safesteer.sae.latents.encode_store` over a view of the
store, so resumable per part); after a barrier rank 0 moves the shard files into ``<latents>`` and
writes the manifest: the latent store is the one a single process writes. With one process this is
the plain :func:`~safesteer.sae.latents.encode_store`.

The distributed atom map over that latent store is :mod:`safesteer.cartography.map_dist`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from safesteer.distributed import Dist
from safesteer.errors import SafesteerError
from safesteer.io import read_json, write_json
from safesteer.sae.latents import LatentStore, encode_store
from safesteer.sae.saving import sae_fingerprint
from safesteer.store import ActivationStore

PARTS = ".parts"


class ShardView:
    """The reading API of an :class:`~safesteer.store.ActivationStore` restricted to some shards."""

    def __init__(self, store: Any, indices: set[int]):
        self.store, self.indices = store, set(indices)
        self.path, self.d, self.manifest = store.path, store.d, store.manifest

    def iter_shards(self) -> Iterator[tuple[int, Any, Any]]:
        for index, H, ids in self.store.iter_shards():
            if int(index) in self.indices:
                yield index, H, ids


def part_name(dist: Dist) -> str:
    """This rank's part folder name: ``rank-R-of-W``."""
    return f"rank-{dist.rank}-of-{dist.world}"


def _latents_done(latents: Path, store: Any, sae_sha: str) -> bool:
    """A complete latent store of this SAE covering every activation shard with unchanged sources."""
    mpath = latents / "manifest.json"
    if not mpath.is_file():
        return False
    m = read_json(mpath)
    if not m.get("complete") or m.get("sae", {}).get("weights_sha256") != sae_sha:
        return False
    have = {int(e["index"]): e for e in m.get("shards", [])}
    for s in store.shards:
        e = have.get(int(s["index"]))
        if (
            e is None
            or e.get("source_sha256") != (s.get("sha256") or {}).get("H")
            or int(e.get("rows", -1)) != int(s["rows"])
        ):
            return False
    return len(have) == len(store.shards)


def assemble_latents(latents: Path, parts: list[Path]) -> dict[str, Any]:
    """Move the part stores' shard files into ``latents`` and write its manifest (as ``encode_store``
    would)."""
    manifests = [read_json(p / "manifest.json") for p in parts]
    done: list[dict[str, Any]] = []
    for p, m in zip(parts, manifests):
        for e in m.get("shards", []):
            for name in e["files"].values():
                os.replace(p / name, latents / name)
            done.append(e)
    base = dict(manifests[0])
    n_lat = int(base["n_latents"])
    done.sort(key=lambda s: s["index"])
    n_rows = sum(s["rows"] for s in done)
    z_bytes = sum(
        os.path.getsize(latents / s["files"][k]) for s in done for k in ("indptr", "indices", "values")
    )
    base.update(
        shards=done,
        n_rows=n_rows,
        complete=True,
        bytes=z_bytes,
        bytes_per_row=z_bytes / max(1, n_rows),
        dense_fp16_bytes_per_row=2 * n_lat,
        mean_l0=sum(s["nnz"] for s in done) / max(1, n_rows),
    )
    write_json(latents / "manifest.json", base)
    return base


def encode_distributed(
    sae: Any,
    acts: str | Path,
    latents: str | Path,
    dist: Dist,
    *,
    batch_size: int = 4096,
    progress: bool = True,
) -> Any:
    """Encode ``acts`` into the latent store ``latents``, each rank its shards; returns the LatentStore."""
    store = ActivationStore(acts)
    latents = Path(latents)
    if not dist.enabled:
        return encode_store(sae, store, latents, batch_size=batch_size, progress=progress)
    sha = sae_fingerprint(sae)
    dist.agree(
        {
            "sae": sha,
            "acts": str(acts),
            "latents": str(latents),
            "batch_size": int(batch_size),
            "shards": [[s["index"], (s.get("sha256") or {}).get("H")] for s in store.shards],
        },
        "encode",
    )
    if (latents / "manifest.json").is_file():
        old = read_json(latents / "manifest.json")
        if old.get("sae", {}).get("weights_sha256") != sha:
            raise SafesteerError(
                f"{latents} holds latents of another SAE; choose another --latents or delete it"
            )
    done = _latents_done(latents, store, sha)
    dist.barrier("the encode check")
    if not done:
        parts_root = latents / PARTS
        if (
            dist.is_writer and parts_root.is_dir()
        ):  # parts of a killed run with another world size are useless
            for p in parts_root.iterdir():
                if not p.name.endswith(f"-of-{dist.world}"):
                    shutil.rmtree(p, ignore_errors=True)
        dist.barrier("the encode set-up")
        mine = {int(s["index"]) for s in store.shards if dist.owns(int(s["index"]))}
        encode_store(
            sae,
            ShardView(store, mine),
            parts_root / part_name(dist),
            batch_size=batch_size,
            progress=progress,
        )
        dist.barrier("encoding")  # every part is complete
        if dist.is_writer:
            assemble_latents(latents, [parts_root / f"rank-{r}-of-{dist.world}" for r in range(dist.world)])
            shutil.rmtree(parts_root, ignore_errors=True)
        dist.barrier("the latent store assembly")
    return LatentStore(latents)


__all__ = ["PARTS", "ShardView", "assemble_latents", "encode_distributed", "part_name"]
