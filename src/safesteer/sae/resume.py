"""Checkpoint and resume for :class:`~safesteer.sae.trainer.Trainer`.

:class:`TrainerCheckpoints` (a base of ``Trainer``) moves the run's state to and from one
:class:`~safesteer.sae.checkpoint.TrainerState` and the ``checkpoints/`` folder of the output
directory (file format: :mod:`safesteer.sae.checkpoint`): a run refuses to start over an earlier
run's checkpoints unless resumed, only the writer rank saves, and a checkpoint of other settings or
other activations is refused with the differences named (:func:`identity_diff`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from safesteer.errors import SafesteerError
from safesteer.sae.checkpoint import TrainerState, list_checkpoints, load_latest_checkpoint, save_checkpoint
from safesteer.sae.config import TrainConfig
from safesteer.sae.optim import ConstrainedAdam


class TrainerCheckpoints:
    """The checkpoint half of a trainer; the attributes below are set by the trainer."""

    cfg: TrainConfig
    d_in: int
    d_sae: int
    device: torch.device
    out_dir: Path | None
    data_identity: dict[str, Any]
    fingerprint: str
    is_writer: bool
    opt: ConstrainedAdam
    params: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    last_fired: torch.Tensor
    step: int
    epoch: int
    batch_index: int
    rows_seen: int
    scale: float
    precision: str
    sparse_threshold: float
    best_val_loss: float | None
    best_epoch: int | None
    bad_epochs: int
    history: list[dict[str, Any]]
    acc: dict[str, float]
    initialised: bool

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _trainable(self) -> list[str]:
        raise NotImplementedError

    @property
    def ckpt_dir(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def _refuse_existing_run(self) -> None:
        if self.ckpt_dir is not None and self._list_checkpoints():
            raise SafesteerError(
                f"{self.out_dir} already holds checkpoints of a training run; pass --resume to continue it "
                "or choose another --out"
            )

    def _list_checkpoints(self) -> list[Path]:
        return list_checkpoints(self.ckpt_dir)

    def state(self) -> TrainerState:
        """The run's state now (tensors by reference)."""
        return TrainerState(
            params=self.params,
            adam_v=self.opt.v,
            adam_m=self.opt.m,
            best=self.best,
            last_fired=self.last_fired,
            step=self.step,
            epoch=self.epoch,
            batch_index=self.batch_index,
            rows_seen=self.rows_seen,
            scale=self.scale,
            precision=self.precision,
            sparse_threshold=self.sparse_threshold,
            best_val_loss=self.best_val_loss,
            best_epoch=self.best_epoch,
            bad_epochs=self.bad_epochs,
            history=self.history,
            acc=self.acc,
        )

    def load_state(self, st: TrainerState) -> None:
        """Continue from ``st`` (as returned by :meth:`state` or a checkpoint)."""
        self._reset_state()
        self.params, self.best, self.last_fired = st.params, st.best, st.last_fired
        self.opt.v, self.opt.m = st.adam_v, st.adam_m
        self.step, self.epoch, self.batch_index, self.rows_seen = (
            st.step,
            st.epoch,
            st.batch_index,
            st.rows_seen,
        )
        self.scale, self.precision, self.sparse_threshold = st.scale, st.precision, st.sparse_threshold
        self.best_val_loss, self.best_epoch, self.bad_epochs = st.best_val_loss, st.best_epoch, st.bad_epochs
        self.history, self.acc = st.history, st.acc
        self.initialised = True

    def save_checkpoint(self) -> Path | None:
        if self.ckpt_dir is None or not self.is_writer:
            return None
        header = {
            "fingerprint": self.fingerprint,
            "train_config": self.cfg.to_dict(),
            "identity": {"train": self.cfg.identity(), "d_in": self.d_in, "data": self.data_identity},
            "d_in": self.d_in,
            "d_sae": self.d_sae,
        }
        return save_checkpoint(self.ckpt_dir, self.state(), header)

    def _load_latest_checkpoint(self) -> bool:
        got = load_latest_checkpoint(
            self.ckpt_dir,
            self.fingerprint,
            self.device,
            lambda saved: identity_diff(saved, self),
            self._trainable(),
            self.cfg.beta1,
        )
        if got is None:
            return False
        st, latest = got
        self.load_state(st)
        print(
            f"[safesteer] resuming {self.out_dir.name} from {latest.name} (epoch {self.epoch}, step "
            f"{self.step})",
            file=sys.stderr,
            flush=True,
        )
        return True


def identity_diff(saved: dict[str, Any], trainer: TrainerCheckpoints) -> str:
    """What differs between a checkpoint's identity and the trainer's now (a few items, one line)."""
    now = {"train": trainer.cfg.identity(), "d_in": trainer.d_in, "data": trainer.data_identity}
    diffs = []
    for k in sorted(set(saved.get("train", {})) | set(now["train"])):
        a, b = saved.get("train", {}).get(k), now["train"].get(k)
        if a != b:
            diffs.append(f"{k}: checkpoint {a!r}, now {b!r}")
    if saved.get("d_in") != now["d_in"]:
        diffs.append(f"d_in: checkpoint {saved.get('d_in')!r}, now {now['d_in']!r}")
    if saved.get("data") != now["data"]:
        diffs.append("the activations differ")
    return "; ".join(diffs[:4]) or "fingerprint differs"


__all__ = ["TrainerCheckpoints", "identity_diff"]
