"""Sparse latent store Z: the SAE codes of an activation store, one CSR matrix per shard.

Layout of a latent folder::

    manifest.json           {"format": "safesteer-sparse-z/1", "n_latents", "d_in", "n_rows",
                             "sae": {"cfg": ..., "weights_sha256": ...}, "acts": <activation folder>,
                             "shards": [{"index", "rows", "nnz", "files", "sha256", "source_sha256"}],
                             "complete", "bytes", "bytes_per_row", "dense_fp16_bytes_per_row"}
    z-00000.indptr.npy      int64, rows + 1
    z-00000.indices.npy     uint16 when n_latents <= 65535, else int32
    z-00000.values.npy      float16
    z-00000.ids.npy         row ids, copied from the activation shard

Every file is written atomically and the manifest is rewritten after each shard, so an
interrupted ``encode`` resumes: shards whose files exist and match the manifest's sha256 (and
whose source activations are unchanged) are skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from safesteer.errors import SafesteerError
from safesteer.io import load_npy, read_json, save_npy, sha256_file, write_json
from safesteer.sae.gated import GatedSAE, _csr
from safesteer.sae.saving import sae_fingerprint
from safesteer.store import ActivationStore

FORMAT = "safesteer-sparse-z/1"
FP16_MAX = 65504.0


def z_files(index: int) -> dict[str, str]:
    stem = f"z-{index:05d}"
    return {k: f"{stem}.{k}.npy" for k in ("indptr", "indices", "values", "ids")}


def index_dtype(n_latents: int) -> np.dtype:
    return np.dtype(np.uint16) if n_latents <= 65535 else np.dtype(np.int32)


class LatentStore:
    """Read a latent folder written by :func:`encode_store`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise SafesteerError(
                f"{self.path} is not a latent store (no manifest.json); run 'safesteer encode' first"
            )
        self.manifest: dict[str, Any] = read_json(self.path / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise SafesteerError(
                f"{self.path}/manifest.json has format {self.manifest.get('format')!r}, expected {FORMAT!r}"
            )
        self.n_latents = int(self.manifest["n_latents"])
        self.d_in = int(self.manifest["d_in"])
        self.shards = sorted(self.manifest["shards"], key=lambda s: s["index"])
        self.n_rows = int(sum(s["rows"] for s in self.shards))

    def __len__(self) -> int:
        return self.n_rows

    def load_shard(self, entry: dict[str, Any]) -> tuple[sp.csr_matrix, np.ndarray]:
        f = entry["files"]
        indptr = load_npy(self.path / f["indptr"])
        indices = load_npy(self.path / f["indices"])
        values = load_npy(self.path / f["values"]).astype(np.float32)
        ids = load_npy(self.path / f["ids"])
        rows = int(entry["rows"])
        if len(indptr) != rows + 1 or int(indptr[-1]) != len(indices) or len(values) != len(indices):
            raise SafesteerError(
                f"latent shard {entry['index']} in {self.path} is inconsistent; re-run 'safesteer encode'"
            )
        Z = sp.csr_matrix((values, indices, indptr), shape=(rows, self.n_latents))
        return Z, ids

    def iter_shards(self) -> Iterator[tuple[int, sp.csr_matrix, np.ndarray]]:
        """(shard index, CSR rows x n_latents with float32 values, ids) for each shard."""
        for entry in self.shards:
            Z, ids = self.load_shard(entry)
            yield int(entry["index"]), Z, ids

    def bytes_per_row(self) -> float:
        return float(self.manifest.get("bytes_per_row") or 0.0)


def _open_acts(acts: Any):
    if isinstance(acts, (str, os.PathLike)):
        return ActivationStore(acts)
    return acts  # anything with the ActivationStore reading API (d, manifest, iter_shards)


def _source_sha(store: Any, index: int) -> str | None:
    for s in (getattr(store, "manifest", None) or {}).get("shards", []):
        if int(s.get("index", -1)) == int(index):
            return (s.get("sha256") or {}).get("H")
    return None


def _entry_ok(folder: Path, entry: dict[str, Any]) -> bool:
    try:
        return all(
            (folder / name).is_file() and sha256_file(folder / name) == entry["sha256"][k]
            for k, name in entry["files"].items()
        )
    except (KeyError, OSError):
        return False


@torch.no_grad()
def encode_rows(
    sae: GatedSAE, H: np.ndarray, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (indptr int64, indices int64, values float32) of ``sae.encode`` on ``H``."""
    n = H.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    idx_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    dev = sae.W_enc.device
    step = max(1, min(int(batch_size), (1 << 25) // max(1, sae.cfg.d_sae)))  # dense codes <= 128 MB per chunk
    for start in range(0, n, step):
        x = torch.from_numpy(np.array(H[start : start + step], dtype=np.float32)).to(dev)
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x).all(1)).nonzero()[0, 0]) + start
            raise SafesteerError(f"non-finite activations (NaN/Inf) at row {bad} of the shard; re-extract it")
        f = sae.encode(x)
        mask = f > 0
        counts[start : start + x.shape[0]] = mask.sum(1).cpu().numpy()
        nz = mask.nonzero()
        idx_parts.append(nz[:, 1].cpu().numpy())
        val_parts.append(f[mask].cpu().numpy())
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    values = np.concatenate(val_parts) if val_parts else np.zeros(0, np.float32)
    return indptr, indices, values


def encode_store(
    sae: GatedSAE,
    acts_path: Any,
    out_path: str | os.PathLike,
    batch_size: int = 4096,
    progress: bool = True,
) -> LatentStore:
    """Encode every shard of an activation store into a sparse latent store (resumable)."""
    store = _open_acts(acts_path)
    d_in, n_lat = sae.cfg.d_in, sae.cfg.d_sae
    if int(store.d) != d_in:
        raise SafesteerError(
            f"the activations have width {store.d} but the SAE expects d_in={d_in}; use the SAE "
            "trained on this layer"
        )
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    sae_info = {"cfg": sae.cfg.to_dict(), "weights_sha256": sae_fingerprint(sae)}
    mpath = out / "manifest.json"
    entries: dict[int, dict[str, Any]] = {}
    if mpath.is_file():
        old = read_json(mpath)
        if old.get("format") != FORMAT:
            raise SafesteerError(f"{out} holds something else than a latent store; choose another --out")
        if (
            old.get("sae", {}).get("weights_sha256") != sae_info["weights_sha256"]
            or int(old.get("n_latents", -1)) != n_lat
        ):
            raise SafesteerError(f"{out} holds latents of another SAE; choose another --out or delete it")
        entries = {int(e["index"]): e for e in old.get("shards", [])}
    idt = index_dtype(n_lat)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "n_latents": n_lat,
        "d_in": d_in,
        "sae": sae_info,
        "acts": str(getattr(store, "path", acts_path)),
        "index_dtype": idt.name,
        "value_dtype": "float16",
        "shards": [],
        "complete": False,
    }
    done: list[dict[str, Any]] = []
    shard_iter = list(store.iter_shards())
    total_rows = sum(int(H.shape[0]) for _, H, _ in shard_iter)
    seen_rows = 0
    for index, H, ids in shard_iter:
        src = _source_sha(store, index)
        e = entries.get(int(index))
        if (
            e is not None
            and e.get("source_sha256") == src
            and int(e.get("rows", -1)) == H.shape[0]
            and _entry_ok(out, e)
        ):
            done.append(e)
            seen_rows += H.shape[0]
            continue
        indptr, indices, values = encode_rows(sae, H, batch_size)
        if values.size and float(np.abs(values).max()) > FP16_MAX:
            raise SafesteerError(
                f"latent values up to {float(np.abs(values).max()):.3g} in shard {index} overflow float16; "
                "the activations are far larger than those the SAE was trained on"
            )
        files = z_files(int(index))
        save_npy(out / files["indptr"], indptr)
        save_npy(out / files["indices"], indices.astype(idt))
        save_npy(out / files["values"], values.astype(np.float16))
        save_npy(out / files["ids"], np.asarray(ids))
        entry = {
            "index": int(index),
            "rows": int(H.shape[0]),
            "nnz": int(len(indices)),
            "files": files,
            "sha256": {k: sha256_file(out / name) for k, name in files.items()},
            "source_sha256": src,
        }
        done.append(entry)
        seen_rows += H.shape[0]
        manifest["shards"] = sorted(done, key=lambda s: s["index"])
        write_json(mpath, manifest)
        if progress:
            print(
                f"[safesteer] encoded shard {index}: {H.shape[0]} rows, L0 "
                f"{len(indices) / max(1, H.shape[0]):.1f} ({seen_rows}/{total_rows} rows)",
                file=sys.stderr,
            )
    manifest["shards"] = sorted(done, key=lambda s: s["index"])
    n_rows = sum(s["rows"] for s in done)
    z_bytes = sum(os.path.getsize(out / s["files"][k]) for s in done for k in ("indptr", "indices", "values"))
    manifest.update(
        n_rows=n_rows,
        complete=True,
        bytes=z_bytes,
        bytes_per_row=z_bytes / max(1, n_rows),
        dense_fp16_bytes_per_row=2 * n_lat,
        mean_l0=sum(s["nnz"] for s in done) / max(1, n_rows),
    )
    write_json(mpath, manifest)
    return LatentStore(out)


def decode_sparse(sae: GatedSAE, Z: sp.csr_matrix) -> torch.Tensor:
    """x^ = Z W_dec + b_dec from a CSR latent matrix (float32)."""
    Zc = Z.tocsr()
    t = _csr(
        torch.from_numpy(Zc.indptr.astype(np.int64)),
        torch.from_numpy(Zc.indices.astype(np.int64)),
        torch.from_numpy(Zc.data.astype(np.float32)),
        tuple(Zc.shape),
    )
    with torch.no_grad():
        return torch.sparse.mm(t, sae.W_dec.detach().float().cpu()) + sae.b_dec.detach().float().cpu()
