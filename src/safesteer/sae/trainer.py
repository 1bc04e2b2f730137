"""Train a Gated SAE from any stream of activation batches.

The trainer knows nothing about language models. It consumes ``batches(epoch, split)`` -- a
callable returning an iterator of float arrays/tensors (rows x d_in), or objects with ``.H`` (and
optionally ``.ids``) such as :class:`safesteer.store.Batch` -- for ``split`` in ``"train"``/``"val"``.
The callable must replay the same stream for the same epoch: resuming re-creates epoch *e*'s
stream and skips the batches already consumed (the data position ``(epoch, batch_index)`` is
stored in every checkpoint), so a resumed run ends with bit-identical weights on CPU.

Training recipe (Rajamanoharan et al. 2024 / dictionary_learning ``gdm.py``):

* activations scaled by ``c`` to unit mean squared norm (estimated on the first ``init_rows``
  training rows; folded back into the biases on save, see :mod:`safesteer.sae.saving`);
* ``b_dec`` initialised at the geometric median of that sample (Weiszfeld) or its mean;
  ``W_dec`` random unit rows, ``W_enc = W_dec^T``, gate/magnitude biases and ``r_mag`` zero;
* constrained Adam (beta1=0, beta2=0.999 by default): the gradient component parallel to each
  decoder row is removed before the update and the rows are renormalised after it;
* linear LR and sparsity-coefficient warmups (``lr_warmup_steps``, ``l1_warmup_steps``);
* dead-latent tracking, validation every epoch on the held-out split, early stopping with
  ``patience``; the weights of the best validation epoch are the result;
* a checkpoint of one :class:`~safesteer.sae.checkpoint.TrainerState` at every epoch end (and every
  ``checkpoint_every`` steps), see :mod:`safesteer.sae.checkpoint`. No pickle anywhere.

Optimiser: :class:`safesteer.sae.optim.ConstrainedAdam`; evaluation forward:
:func:`safesteer.sae.gated.gated_forward`; data-parallel hooks: ``reduce_grads``, ``is_writer``.
Where the parts live (as SAELens keeps architecture, trainer and runner apart): the model and its
fused loss in :mod:`safesteer.sae.gated`; batch checks and the initialisation from data in
:mod:`safesteer.sae.data_init`; checkpoint/resume in :mod:`safesteer.sae.resume`; driving a run on
an activation store in :mod:`safesteer.sae.run`; this module keeps the optimisation loop.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.io import write_json
from safesteer.sae.batches import BatchSource, array_batches, split_of_id
from safesteer.sae.batches import unpack as _unpack
from safesteer.sae.checkpoint import CKPT_FORMAT, KEEP_CHECKPOINTS, TrainerState, new_acc
from safesteer.sae.config import SAEConfig, TrainConfig
from safesteer.sae.data_init import batch_tensor, init_from_data
from safesteer.sae.gated import PARAM_NAMES, GatedSAE, gated_forward, loss_and_grads
from safesteer.sae.metrics import ReconSums, convergence_table, dead_fraction
from safesteer.sae.optim import ConstrainedAdam
from safesteer.sae.precision import resolve_precision, resolve_sparse_threshold
from safesteer.sae.resume import TrainerCheckpoints
from safesteer.sae.saving import fold_scale, save_sae

GradReducer = Callable[[dict[str, torch.Tensor]], None]


# ------------------------------------------------------------------------------- result


@dataclass
class TrainResult:
    sae: GatedSAE  # best weights, scale folded back: works on raw activations
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_val_loss: float | None
    stopped: str  # "epochs" | "early_stopping" | "max_steps"
    steps: int
    out_dir: Path | None
    config: TrainConfig
    scale: float
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- trainer


class Trainer(TrainerCheckpoints):
    """One training run. ``fit(batches)`` trains (or resumes) and returns a :class:`TrainResult`.

    Checkpointing and resuming (``state``, ``load_state``, ``save_checkpoint``) come from
    :class:`~safesteer.sae.resume.TrainerCheckpoints`."""

    def __init__(
        self,
        cfg: TrainConfig,
        d_in: int,
        out_dir: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        data_identity: dict[str, Any] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        sae_metadata: dict[str, Any] | None = None,
        reduce_grads: GradReducer | None = None,
        is_writer: bool = True,
    ):
        """``reduce_grads``: called with the gradient dict (modify in place) right before every optimiser
        step (data-parallel all-reduce). ``is_writer``: only a writer saves checkpoints, metrics and the
        SAE."""
        cfg.validate()
        if int(d_in) <= 0:
            raise SafesteerError(f"d_in must be > 0 (got {d_in})")
        self.cfg = cfg
        self.d_in = int(d_in)
        self.d_sae = int(d_in) * int(cfg.expansion)
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.data_identity = data_identity or {}
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.sae_metadata = sae_metadata or {}
        self.reduce_grads = reduce_grads
        self.is_writer = bool(is_writer)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.sparse_threshold = resolve_sparse_threshold(cfg.sparse_threshold, self.device)
        self.fingerprint = cfg.fingerprint({"d_in": self.d_in, "data": self.data_identity})
        self._reset_state()

    # ---------------------------------------------------------------- state
    def _reset_state(self) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.opt = ConstrainedAdam(
            beta1=self.cfg.beta1, beta2=self.cfg.beta2, eps=self.cfg.eps, unit_rows=("W_dec",)
        )
        self.best: dict[str, torch.Tensor] | None = None
        self._ws: dict[str, torch.Tensor] = {}
        self.last_fired = torch.zeros(self.d_sae, dtype=torch.int64, device=self.device)
        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self.rows_seen = 0
        self.scale = 1.0
        self.best_val_loss: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.timings: list[dict[str, Any]] = []  # per-epoch wall clock; never in metrics.json or checkpoints
        self._seconds = 0.0
        self.acc = self._new_acc()
        self.initialised = False

    @staticmethod
    def _new_acc() -> dict[str, float]:
        return new_acc()

    @property
    def adam_v(self) -> dict[str, torch.Tensor]:
        return self.opt.v

    @property
    def adam_m(self) -> dict[str, torch.Tensor]:
        return self.opt.m

    def _trainable(self) -> list[str]:
        return [n for n in PARAM_NAMES if not (n == "r_mag" and self.cfg.variant == "article")]

    def _init_from_data(self, batches: BatchSource) -> None:
        self.params, self.scale = init_from_data(batches, self.cfg, self.d_in, self.d_sae, self.device)
        self.opt.init(self.params, self._trainable())
        self.initialised = True

    def _to_tensor(self, H: Any, *, epoch: int, batch: int, ids: Any, step: int) -> torch.Tensor:
        return batch_tensor(H, self.d_in, self.device, epoch=epoch, batch=batch, ids=ids, step=step)

    # ---------------------------------------------------------------- optimisation
    def _lr(self) -> float:
        w = self.cfg.lr_warmup_steps
        return self.cfg.lr * (min(1.0, (self.step + 1) / w) if w > 0 else 1.0)

    def _lam(self) -> float:
        w = self.cfg.l1_warmup_steps
        return self.cfg.l1 * (min(1.0, (self.step + 1) / w) if w > 0 else 1.0)

    def train_step(self, x: torch.Tensor) -> dict[str, Any]:
        """One optimisation step on a batch already scaled; returns the step's statistics."""
        lr, lam = self._lr(), self._lam()
        grads, st = loss_and_grads(
            self.params,
            x,
            lam,
            self.cfg.variant,
            sparse_threshold=self.sparse_threshold,
            bf16=self.precision == "bf16",
            workspace=self._ws,
        )
        if not math.isfinite(st.loss):
            raise SafesteerError(
                f"the loss became {st.loss} at step {self.step} (epoch {self.epoch}, batch "
                f"{self.batch_index}); lower --lr or check the activations"
            )
        if self.reduce_grads is not None:
            self.reduce_grads(grads)
        self.opt.step(self.params, grads, lr, self.step + 1)
        n = x.shape[0]
        self.rows_seen += n
        self.last_fired[st.fired] = self.rows_seen
        a = self.acc
        a["batches"] += 1
        a["rows"] += n
        for k in ("loss", "mse", "aux", "l1", "l0", "var"):
            a[k] += getattr(st, k) * n
        self.step += 1
        self.batch_index += 1
        fvu = st.mse / st.var if st.var > 0 else float("nan")
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loss": st.loss,
            "mse": st.mse,
            "l0": st.l0,
            "fvu": fvu,
            "lr": lr,
            "l1_coef": lam,
            "rows": n,
            "density": st.density,
            "path": st.path,
        }

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self, batches_iter: Iterable[Any], params: dict[str, torch.Tensor] | None = None, *, epoch: int = -1
    ) -> dict[str, float]:
        p = params or self.params
        sums = ReconSums()
        for bi, item in enumerate(batches_iter):
            H, ids = _unpack(item)
            x = self._to_tensor(H, epoch=epoch, batch=bi, ids=ids, step=self.step) * self.scale
            rows = max(1, min(4096, (1 << 25) // self.d_sae))
            for start in range(0, x.shape[0], rows):
                xc = x[start : start + rows]
                fw = gated_forward(p, xc, self.cfg.variant)
                sums.add(xc, fw.x_hat, fw.f, x_aux=fw.x_aux, l1_term=fw.sparsity(self.cfg.variant))
        out = sums.summary(self.cfg.l1)
        if out:
            out["mse_raw"] = out["mse"] / (self.scale**2)
        return out

    # ---------------------------------------------------------------- main loop
    def fit(self, batches: BatchSource, *, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        if resume:
            loaded = self._load_latest_checkpoint()
            if not loaded:
                self._reset_state()
        else:
            self._refuse_existing_run()
        if not self.initialised:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed % (2**32))
            self._init_from_data(batches)
        stopped = "epochs"
        if self.history and self.bad_epochs >= cfg.patience:
            stopped = "early_stopping"
        last_ckpt_step = -1
        while self.epoch < cfg.epochs and stopped != "early_stopping":
            t0 = time.perf_counter()
            it = iter(batches(self.epoch, "train"))
            skip = self.batch_index
            if skip:
                for _ in itertools.islice(it, skip):
                    pass
            for item in it:
                H, ids = _unpack(item)
                x = self._to_tensor(H, epoch=self.epoch, batch=self.batch_index, ids=ids, step=self.step)
                if x.shape[0] == 0:
                    self.batch_index += 1
                    continue
                if self.scale != 1.0:
                    x = x * self.scale
                info = self.train_step(x)
                if self.on_step is not None:
                    self.on_step(info)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                    last_ckpt_step = self.step
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    self._seconds += time.perf_counter() - t0
                    if last_ckpt_step != self.step:
                        self.save_checkpoint()
                    return self._result("max_steps")
            self._seconds += time.perf_counter() - t0
            self._end_epoch(batches)
            self.save_checkpoint()
            last_ckpt_step = self.step
            if self.bad_epochs >= cfg.patience:
                stopped = "early_stopping"
        return self._finish(stopped)

    def _end_epoch(self, batches: BatchSource) -> None:
        a = self.acc
        rows = max(1, a["rows"])
        train = {k: a[k] / rows for k in ("loss", "mse", "aux", "l1", "l0")}
        train["fvu"] = a["mse"] / a["var"] if a["var"] > 0 else float("nan")
        train["rows"] = a["rows"]
        # Wall-clock figures go to timings.json only, so metrics.json and checkpoints are byte-reproducible.
        self.timings.append(
            {
                "epoch": self.epoch,
                "seconds": round(self._seconds, 3),
                "samples_per_s": a["rows"] / self._seconds if self._seconds > 0 else None,
            }
        )
        self._seconds = 0.0
        if self.is_writer and self.out_dir is not None:
            write_json(
                self.out_dir / "timings.json",
                {
                    "note": "wall clock, this process only (a resumed epoch counts from the resume)",
                    "epochs": self.timings,
                },
            )
        val = self.evaluate(batches(self.epoch, "val"), epoch=self.epoch)
        crit = val.get("loss") if val else None
        if crit is None:  # no validation rows: fall back on the training objective
            crit = train["loss"]
        improved = self.best_val_loss is None or crit < self.best_val_loss
        if improved:
            self.best_val_loss = float(crit)
            self.best_epoch = self.epoch
            self.bad_epochs = 0
            self.best = {n: t.clone() for n, t in self.params.items()}
        else:
            self.bad_epochs += 1
        entry = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train": train,
            "val": val or None,
            "dead_fraction": dead_fraction(self.last_fired, self.rows_seen, self.cfg.dead_window_rows),
            "lr": self._lr(),
            "l1_coef": self._lam(),
            "improved": improved,
            "criterion": "val_loss" if val else "train_loss",
        }
        self.history.append(entry)
        self.epoch += 1
        self.batch_index = 0
        self.acc = self._new_acc()
        if self.out_dir is not None and self.is_writer:
            write_json(
                self.out_dir / "metrics.json",
                {"fingerprint": self.fingerprint, "config": self.cfg.to_dict(), "history": self.history},
            )
        if self.on_epoch is not None:
            self.on_epoch(entry)

    def _result(self, stopped: str) -> TrainResult:
        params = self.best if (self.best is not None and stopped != "max_steps") else self.params
        return TrainResult(
            sae=self.make_sae(params),
            history=list(self.history),
            best_epoch=None if self.best_epoch is None else self.best_epoch + 1,
            best_val_loss=self.best_val_loss,
            stopped=stopped,
            steps=self.step,
            out_dir=self.out_dir,
            config=self.cfg,
            scale=self.scale,
        )

    def _finish(self, stopped: str) -> TrainResult:
        res = self._result(stopped)
        if self.out_dir is not None and self.is_writer:
            save_sae(res.sae, self.out_dir / "sae")
            (self.out_dir / "convergence.md").write_text(convergence_table(self.history))
            write_json(
                self.out_dir / "metrics.json",
                {
                    "fingerprint": self.fingerprint,
                    "config": self.cfg.to_dict(),
                    "history": self.history,
                    "best_epoch": res.best_epoch,
                    "best_val_loss": res.best_val_loss,
                    "stopped": stopped,
                    "steps": self.step,
                    "scale": self.scale,
                    "precision": self.precision,
                },
            )
        return res

    def make_sae(self, params: dict[str, torch.Tensor] | None = None, *, scaled: bool = False) -> GatedSAE:
        """A :class:`GatedSAE` with the given (default: current) weights; raw space unless ``scaled``."""
        p = params if params is not None else self.params
        p = p if scaled else fold_scale(p, self.scale)
        meta = dict(self.sae_metadata)
        meta.update({"train_fingerprint": self.fingerprint, "steps": self.step})
        cfg = SAEConfig(
            d_in=self.d_in,
            d_sae=self.d_sae,
            variant=self.cfg.variant,
            scaling_factor=1.0 if scaled else self.scale,
            l1_coefficient=self.cfg.l1,
            expansion=self.cfg.expansion,
            metadata=meta,
        )
        sae = GatedSAE(cfg, seed=0, device=self.device)
        with torch.no_grad():
            for n in PARAM_NAMES:
                getattr(sae, n).copy_(p[n])
        return sae


def train_sae(
    batches: BatchSource,
    d_in: int,
    cfg: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    data_identity: dict[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Convenience wrapper: ``Trainer(cfg, d_in, out_dir, ...).fit(batches, resume=resume)``."""
    return Trainer(
        cfg, d_in, out_dir, device=device, data_identity=data_identity, on_step=on_step, on_epoch=on_epoch
    ).fit(batches, resume=resume)


__all__ = [
    "BatchSource",
    "CKPT_FORMAT",
    "GradReducer",
    "KEEP_CHECKPOINTS",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "array_batches",
    "split_of_id",
    "train_sae",
]
