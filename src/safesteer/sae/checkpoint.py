"""Trainer checkpoints: one :class:`TrainerState` saved and loaded as a folder, no pickle.

A checkpoint ``ckpt-<step>`` holds ``tensors.safetensors`` (weights, Adam moments, best weights,
dead-latent counters, torch RNG, numpy RNG key) and ``state.json`` (config fingerprint, data position
``(epoch, batch_index)``, history, python/numpy RNG, the sha256 of the tensors file). It is written to
a temporary folder, fsynced and renamed; the last :data:`KEEP_CHECKPOINTS` are kept. Loading checks
the format, the sha256 and the fingerprint and restores the global RNGs, so a resumed run replays
the same stream of random numbers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from safesteer.errors import SafesteerError
from safesteer.io import sha256_file
from safesteer.sae.gated import PARAM_NAMES, enc_layout

CKPT_FORMAT = "safesteer-sae-ckpt/1"
KEEP_CHECKPOINTS = 2


def new_acc() -> dict[str, float]:
    """Empty per-epoch training accumulators."""
    return {"batches": 0, "rows": 0, "loss": 0.0, "mse": 0.0, "aux": 0.0, "l1": 0.0, "l0": 0.0, "var": 0.0}


@dataclass
class TrainerState:
    """Everything a training run needs to continue exactly where it stopped."""

    params: dict[str, torch.Tensor]
    adam_v: dict[str, torch.Tensor]
    adam_m: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    last_fired: torch.Tensor
    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    rows_seen: int = 0
    scale: float = 1.0
    precision: str = "fp32"
    sparse_threshold: float = 0.0
    best_val_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    acc: dict[str, float] = field(default_factory=new_acc)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {f"param.{n}": t for n, t in self.params.items()}
        out.update({f"adam_v.{n}": t for n, t in self.adam_v.items()})
        out.update({f"adam_m.{n}": t for n, t in self.adam_m.items()})
        if self.best is not None:
            out.update({f"best.{n}": t for n, t in self.best.items()})
        out["last_fired"] = self.last_fired
        return out

    def scalars(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "rows_seen": self.rows_seen,
            "scale": self.scale,
            "precision": self.precision,
            "sparse_threshold": self.sparse_threshold,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "acc": self.acc,
        }


def list_checkpoints(ckpt_dir: Path | None) -> list[Path]:
    if ckpt_dir is None or not ckpt_dir.is_dir():
        return []
    return sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("ckpt-")), key=lambda p: p.name
    )


def save_checkpoint(ckpt_dir: Path, state: TrainerState, header: dict[str, Any]) -> Path:
    """Write ``ckpt-<step>`` under ``ckpt_dir`` (atomically) with the global RNG states; prune old ones.

    ``header``: identity fields stored first in ``state.json`` (fingerprint, configs, widths).
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{state.step:010d}"
    final = ckpt_dir / name
    tensors = state.tensors()
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy_key"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    py_state = random.getstate()
    payload = {
        "format": CKPT_FORMAT,
        **header,
        **state.scalars(),
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": {
                "name": np_state[0],
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
        },
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=ckpt_dir))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        payload["tensors_sha256"] = sha256_file(tmp / "tensors.safetensors")
        (tmp / "state.json").write_text(json.dumps(payload))
        for fname in ("tensors.safetensors", "state.json"):
            with open(tmp / fname, "rb+") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SafesteerError(
            f"cannot write checkpoint {final}: {exc.strerror or exc}; check free space"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(
    ckpt_dir: Path | None,
    fingerprint: str,
    device: torch.device,
    mismatch: Callable[[dict[str, Any]], str],
    trainable: list[str],
    beta1: float,
) -> tuple[TrainerState, Path] | None:
    """The newest checkpoint as a :class:`TrainerState` (global RNGs restored), or None when there is none.

    ``mismatch(saved_identity)`` explains a fingerprint difference in the error message.
    """
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return None
    latest = ckpts[-1]
    prev = ckpts[-2].name if len(ckpts) > 1 else None
    keep = (
        f"; the previous checkpoint {prev} is kept: delete {latest} to resume from it"
        if prev
        else "; no earlier checkpoint exists: delete it to start over"
    )
    try:
        saved = json.loads((latest / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SafesteerError(
            f"checkpoint {latest} is corrupted (state.json unreadable: {exc}){keep}"
        ) from exc
    tpath = latest / "tensors.safetensors"
    if not isinstance(saved, dict) or saved.get("format") != CKPT_FORMAT:
        raise SafesteerError(f"checkpoint {latest} is corrupted or not a safesteer SAE checkpoint{keep}")
    if not tpath.is_file() or sha256_file(tpath) != saved.get("tensors_sha256"):
        raise SafesteerError(
            f"checkpoint {latest} is corrupted (tensors.safetensors missing or sha256 mismatch){keep}"
        )
    if saved.get("fingerprint") != fingerprint:
        raise SafesteerError(
            f"checkpoint {latest} was written by another configuration "
            f"({mismatch(saved.get('identity') or {})}); "
            "resume with the same settings or choose another --out"
        )
    try:
        t = load_file(str(tpath), device=str(device)) if device.type != "cpu" else load_file(str(tpath))
    except Exception as exc:
        raise SafesteerError(f"checkpoint {latest} is corrupted ({exc}){keep}") from exc

    def layout(name: str, v: torch.Tensor) -> torch.Tensor:
        return enc_layout(v) if name == "W_enc" else v.clone()

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {
            k.split(".", 1)[1]: layout(k.split(".", 1)[1], v) for k, v in t.items() if k.startswith(prefix)
        }

    params = {n: layout(n, t[f"param.{n}"]) for n in PARAM_NAMES}
    adam_m = group("adam_m.")
    if beta1 > 0:
        for n in trainable:
            adam_m.setdefault(n, torch.zeros_like(params[n]))
    state = TrainerState(
        params=params,
        adam_v=group("adam_v."),
        adam_m=adam_m,
        best=group("best.") or None,
        last_fired=t["last_fired"].clone().to(device),
        step=int(saved["step"]),
        epoch=int(saved["epoch"]),
        batch_index=int(saved["batch_index"]),
        rows_seen=int(saved["rows_seen"]),
        scale=float(saved["scale"]),
        precision=str(saved.get("precision", "fp32")),
        sparse_threshold=float(saved.get("sparse_threshold", 0.0)),
        best_val_loss=saved.get("best_val_loss"),
        best_epoch=saved.get("best_epoch"),
        bad_epochs=int(saved.get("bad_epochs", 0)),
        history=list(saved.get("history") or []),
        acc=dict(saved.get("acc") or new_acc()),
    )
    torch.set_rng_state(t["rng.torch"].cpu())
    rng = saved.get("rng") or {}
    if "python" in rng:
        v, internal, gauss = rng["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in rng:
        ns = rng["numpy"]
        np.random.set_state(
            (
                ns["name"],
                t["rng.numpy_key"].cpu().numpy().astype(np.uint32),
                ns["pos"],
                ns["has_gauss"],
                ns["cached_gaussian"],
            )
        )
    return state, latest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "CKPT_FORMAT",
    "KEEP_CHECKPOINTS",
    "TrainerState",
    "list_checkpoints",
    "load_latest_checkpoint",
    "new_acc",
    "save_checkpoint",
]
