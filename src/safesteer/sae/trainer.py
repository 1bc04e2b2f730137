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
* linear LR warmup over ``lr_warmup_steps`` and sparsity-coefficient warmup over ``l1_warmup_steps``;
* dead-latent tracking (last row at which each latent fired), validation every epoch on the
  held-out split, early stopping with ``patience``; the weights of the best validation epoch are
  the result;
* a checkpoint at every epoch end (and every ``checkpoint_every`` steps): safetensors for tensors
  (weights, Adam moments, best weights, dead-latent counters, torch RNG) + JSON for the rest
  (config fingerprint, data position, history, python/numpy RNG), written to a temporary folder
  and renamed; the last two are kept. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from safesteer.errors import SafesteerError
from safesteer.io import sha256_file, write_json
from safesteer.sae.config import SAEConfig, TrainConfig
from safesteer.sae.gated import PARAM_NAMES, GatedSAE, enc_layout, geometric_median, loss_and_grads
from safesteer.sae.metrics import ReconSums, convergence_table, dead_fraction
from safesteer.sae.saving import fold_scale, save_sae

BatchSource = Callable[[int, str], Iterable[Any]]
CKPT_FORMAT = "safesteer-sae-ckpt/1"
KEEP_CHECKPOINTS = 2


# ------------------------------------------------------------------------------- data helpers


def array_batches(
    X: np.ndarray | torch.Tensor,
    batch_size: int,
    *,
    ids: np.ndarray | list[str] | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    shuffle: bool = True,
) -> BatchSource:
    """A deterministic ``batches(epoch, split)`` over an in-memory array.

    The validation split is chosen by id (the activation store's hash rule), so a row is in the same split
    whatever the order or the number of rows; training order is a fresh permutation per epoch
    drawn from ``(seed, epoch)``.
    """
    Xn = X.numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    n = Xn.shape[0]
    id_list = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(id_list) != n:
        raise SafesteerError(f"{len(id_list)} ids for {n} rows")
    is_val = np.array([split_of_id(i, val_fraction) == "val" for i in id_list], dtype=bool)
    idx = {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val), "all": np.arange(n)}

    def batches(epoch: int, split: str) -> Iterator[np.ndarray]:
        rows = idx[split]
        if shuffle and split == "train":
            rng = np.random.default_rng([int(seed), int(epoch)])
            rows = rows[rng.permutation(len(rows))]
        for start in range(0, len(rows), batch_size):
            yield Xn[rows[start : start + batch_size]]

    return batches


def split_of_id(row_id: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` of ids, else ``"train"``.

    Same rule as the activation store (``safesteer.store.is_validation_id``): blake2b-64 of the
    id string, as a fraction of 2**64, below ``val_fraction``.
    """
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=8).digest(), "little")
    return "val" if h / 2.0**64 < val_fraction else "train"


def _unpack(item: Any) -> tuple[Any, Any]:
    if hasattr(item, "H"):
        return item.H, getattr(item, "ids", None)
    return item, None


# ------------------------------------------------------------------------------- precision etc.


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_sparse_threshold(value: float | None, device: torch.device) -> float:
    if value is not None:
        return float(value)
    # measured on a 2-core AVX2 CPU (d=576, 32x, batch 1024): the CSR step wins below ~8-10% gate
    # density (trained SAEs sit at 1-3%). On GPUs the dense path is kept (not measured here).
    return 0.08 if device.type == "cpu" else 0.0


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


class Trainer:
    """One training run. ``fit(batches)`` trains (or resumes) and returns a :class:`TrainResult`."""

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
        reduce_grads: Callable[[dict[str, torch.Tensor]], None] | None = None,
        is_writer: bool = True,
    ):
        """``reduce_grads``: called on the gradient dict right before each optimizer step (e.g. an
        all-reduce across ranks, :mod:`safesteer.sae.distributed`); ``is_writer``: only a writer saves
        checkpoints, metrics and the SAE (rank 0 of a distributed run)."""
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
        self.is_writer = is_writer
        self.precision = resolve_precision(cfg.precision, self.device)
        self.sparse_threshold = resolve_sparse_threshold(cfg.sparse_threshold, self.device)
        self.fingerprint = cfg.fingerprint({"d_in": self.d_in, "data": self.data_identity})
        self._reset_state()

    # ---------------------------------------------------------------- state
    def _reset_state(self) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.adam_v: dict[str, torch.Tensor] = {}
        self.adam_m: dict[str, torch.Tensor] = {}
        self.best: dict[str, torch.Tensor] | None = None
        self._bufs: dict[str, torch.Tensor] = {}
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
        self.acc = self._new_acc()
        self.initialised = False

    @staticmethod
    def _new_acc() -> dict[str, float]:
        return {"batches": 0, "rows": 0, "loss": 0.0, "mse": 0.0, "aux": 0.0, "l1": 0.0, "l0": 0.0, "var": 0.0, "seconds": 0.0}

    @property
    def ckpt_dir(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def _trainable(self) -> list[str]:
        return [n for n in PARAM_NAMES if not (n == "r_mag" and self.cfg.variant == "article")]

    def _init_from_data(self, batches: BatchSource) -> None:
        cfg = self.cfg
        rows: list[np.ndarray] = []
        have = 0
        for bi, item in enumerate(batches(0, "train")):
            H, ids = _unpack(item)
            x = self._to_tensor(H, epoch=0, batch=bi, ids=ids, step=0)
            rows.append(x)
            have += x.shape[0]
            if have >= cfg.init_rows:
                break
        if have == 0:
            raise SafesteerError("the training split is empty; extract more activations or lower the validation fraction")
        sample = torch.cat(rows)[: cfg.init_rows].to(self.device)
        if cfg.scale_activations:
            msq = float(sample.double().pow(2).sum(1).mean())
            if not msq > 0:
                raise SafesteerError("the activations are all zero; cannot scale them to unit norm")
            self.scale = 1.0 / math.sqrt(msq)
        sample = sample * self.scale
        sae = GatedSAE(SAEConfig(d_in=self.d_in, d_sae=self.d_sae, variant=cfg.variant), seed=cfg.seed, device=self.device)
        with torch.no_grad():
            if cfg.b_dec_init == "geometric_median":
                sae.b_dec.copy_(geometric_median(sample.float()))
            elif cfg.b_dec_init == "mean":
                sae.b_dec.copy_(sample.mean(0))
        self.params = {n: getattr(sae, n).detach().clone().contiguous() for n in PARAM_NAMES}
        self.params["W_enc"] = enc_layout(self.params["W_enc"])
        for n in self._trainable():
            self.adam_v[n] = torch.zeros_like(self.params[n])
            if cfg.beta1 > 0:
                self.adam_m[n] = torch.zeros_like(self.params[n])
        self.initialised = True

    def _to_tensor(self, H: Any, *, epoch: int, batch: int, ids: Any, step: int) -> torch.Tensor:
        x = H if isinstance(H, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(H)))
        if x.ndim != 2 or x.shape[1] != self.d_in:
            shape = tuple(x.shape)
            raise SafesteerError(
                f"batch {batch} of epoch {epoch} has shape {shape}; expected rows x {self.d_in} "
                "(activations of another width than this SAE; check --acts)"
            )
        x = x.to(device=self.device, dtype=torch.float32)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad_row = int((~finite.all(1)).nonzero()[0, 0])
            where = f" (row id {ids[bad_row]!s})" if ids is not None and len(ids) > bad_row else f" (row {bad_row})"
            raise SafesteerError(
                f"non-finite activations (NaN/Inf) in batch {batch} of epoch {epoch} at step {step}{where}; "
                "re-extract that shard"
            )
        return x

    # ---------------------------------------------------------------- optimisation
    def _lr(self) -> float:
        w = self.cfg.lr_warmup_steps
        return self.cfg.lr * (min(1.0, (self.step + 1) / w) if w > 0 else 1.0)

    def _lam(self) -> float:
        w = self.cfg.l1_warmup_steps
        return self.cfg.l1 * (min(1.0, (self.step + 1) / w) if w > 0 else 1.0)

    @torch.no_grad()
    def _adam(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        cfg = self.cfg
        t = self.step + 1
        bc1 = 1.0 - cfg.beta1**t if cfg.beta1 > 0 else 1.0
        root_bc2 = math.sqrt(1.0 - cfg.beta2**t)
        # p -= lr/bc1 * m / (sqrt(v/bc2) + eps), written with one fewer pass over v
        step_size = lr * root_bc2 / bc1
        eps_hat = cfg.eps * root_bc2
        for n in self._trainable():
            p, g, v = self.params[n], grads[n], self.adam_v[n]
            if n == "W_dec":
                # remove the component parallel to each (unit) decoder row (row dots as a batched
                # matmul: no (d_sae x d_in) temporary)
                coef = torch.bmm(g.unsqueeze(1), p.unsqueeze(2)).view(-1, 1)
                g.addcmul_(p, coef, value=-1.0)
            v.mul_(cfg.beta2).addcmul_(g, g, value=1.0 - cfg.beta2)
            if cfg.beta1 > 0:
                m = self.adam_m[n]
                m.mul_(cfg.beta1).add_(g, alpha=1.0 - cfg.beta1)
                num = m
            else:
                num = g
            buf = self._bufs.get(n)
            if buf is None or buf.shape != v.shape or buf.stride() != v.stride():
                buf = self._bufs[n] = torch.empty_like(v)  # reused: no fresh pages every step
            torch.sqrt(v, out=buf).add_(eps_hat)
            p.addcdiv_(num, buf, value=-step_size)
            if n == "W_dec":
                p /= p.norm(dim=1, keepdim=True)

    def train_step(self, x: torch.Tensor) -> dict[str, Any]:
        """One optimisation step on a batch already scaled; returns the step's statistics."""
        lr, lam = self._lr(), self._lam()
        grads, st = loss_and_grads(
            self.params, x, lam, self.cfg.variant, sparse_threshold=self.sparse_threshold, bf16=self.precision == "bf16",
            workspace=self._ws,
        )
        if not math.isfinite(st.loss):
            raise SafesteerError(
                f"the loss became {st.loss} at step {self.step} (epoch {self.epoch}, batch {self.batch_index}); "
                "lower --lr or check the activations"
            )
        if self.reduce_grads is not None:
            self.reduce_grads(grads)
        self._adam(grads, lr)
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
        return {"step": self.step, "epoch": self.epoch, "loss": st.loss, "mse": st.mse, "l0": st.l0, "fvu": fvu,
                "lr": lr, "l1_coef": lam, "rows": n, "density": st.density, "path": st.path}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches_iter: Iterable[Any], params: dict[str, torch.Tensor] | None = None, *, epoch: int = -1) -> dict[str, float]:
        p = params or self.params
        sums = ReconSums()
        for bi, item in enumerate(batches_iter):
            H, ids = _unpack(item)
            x = self._to_tensor(H, epoch=epoch, batch=bi, ids=ids, step=self.step) * self.scale
            rows = max(1, min(4096, (1 << 25) // self.d_sae))
            for start in range(0, x.shape[0], rows):
                xc = x[start : start + rows]
                xt = xc - p["b_dec"]
                pre = xt @ p["W_enc"]
                gate = (pre + p["b_gate"]) > 0
                if self.cfg.variant == "paper":
                    m = torch.relu(pre * torch.exp(p["r_mag"]) + p["b_mag"])
                    l1_term = torch.relu(pre + p["b_gate"]).sum(1)
                else:
                    m = torch.relu(pre + p["b_mag"])
                    l1_term = m.sum(1)
                f = m * gate
                x_hat = f @ p["W_dec"] + p["b_dec"]
                x_aux = torch.relu(pre + p["b_gate"]) @ p["W_dec"] + p["b_dec"]
                sums.add(xc, x_hat, f, x_aux=x_aux, l1_term=l1_term)
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
                    self.acc["seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                    last_ckpt_step = self.step
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    self.acc["seconds"] += time.perf_counter() - t0
                    if last_ckpt_step != self.step:
                        self.save_checkpoint()
                    return self._result("max_steps")
            self.acc["seconds"] += time.perf_counter() - t0
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
        train["seconds"] = a["seconds"]
        train["samples_per_s"] = a["rows"] / a["seconds"] if a["seconds"] > 0 else None
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
            write_json(self.out_dir / "metrics.json", {"fingerprint": self.fingerprint, "config": self.cfg.to_dict(), "history": self.history})
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
                {"fingerprint": self.fingerprint, "config": self.cfg.to_dict(), "history": self.history,
                 "best_epoch": res.best_epoch, "best_val_loss": res.best_val_loss, "stopped": stopped,
                 "steps": self.step, "scale": self.scale, "precision": self.precision},
            )
        return res

    def make_sae(self, params: dict[str, torch.Tensor] | None = None, *, scaled: bool = False) -> GatedSAE:
        """A :class:`GatedSAE` with the given (default: current) weights; raw space unless ``scaled``."""
        p = params if params is not None else self.params
        p = p if scaled else fold_scale(p, self.scale)
        meta = dict(self.sae_metadata)
        meta.update({"train_fingerprint": self.fingerprint, "steps": self.step})
        cfg = SAEConfig(
            d_in=self.d_in, d_sae=self.d_sae, variant=self.cfg.variant, scaling_factor=1.0 if scaled else self.scale,
            l1_coefficient=self.cfg.l1, expansion=self.cfg.expansion, metadata=meta,
        )
        sae = GatedSAE(cfg, seed=0, device=self.device)
        with torch.no_grad():
            for n in PARAM_NAMES:
                getattr(sae, n).copy_(p[n])
        return sae

    # ---------------------------------------------------------------- checkpoints
    def _refuse_existing_run(self) -> None:
        if self.ckpt_dir is not None and self._list_checkpoints():
            raise SafesteerError(
                f"{self.out_dir} already holds checkpoints of a training run; pass --resume to continue it "
                "or choose another --out"
            )

    def _list_checkpoints(self) -> list[Path]:
        d = self.ckpt_dir
        if d is None or not d.is_dir():
            return []
        return sorted((p for p in d.iterdir() if p.is_dir() and p.name.startswith("ckpt-")), key=lambda p: p.name)

    def save_checkpoint(self) -> Path | None:
        if self.ckpt_dir is None or not self.is_writer:
            return None
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{self.step:010d}"
        final = self.ckpt_dir / name
        tensors: dict[str, torch.Tensor] = {}
        for n, t in self.params.items():
            tensors[f"param.{n}"] = t
        for n, t in self.adam_v.items():
            tensors[f"adam_v.{n}"] = t
        for n, t in self.adam_m.items():
            tensors[f"adam_m.{n}"] = t
        if self.best is not None:
            for n, t in self.best.items():
                tensors[f"best.{n}"] = t
        tensors["last_fired"] = self.last_fired
        tensors["rng.torch"] = torch.get_rng_state()
        np_state = np.random.get_state()
        tensors["rng.numpy_key"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        py_state = random.getstate()
        state = {
            "format": CKPT_FORMAT,
            "fingerprint": self.fingerprint,
            "train_config": self.cfg.to_dict(),
            "identity": {"train": self.cfg.identity(), "d_in": self.d_in, "data": self.data_identity},
            "d_in": self.d_in,
            "d_sae": self.d_sae,
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
            "rng": {
                "python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": {"name": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            },
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.ckpt_dir))
        try:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            state["tensors_sha256"] = sha256_file(tmp / "tensors.safetensors")
            (tmp / "state.json").write_text(json.dumps(state))
            for fname in ("tensors.safetensors", "state.json"):
                with open(tmp / fname, "rb+") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SafesteerError(f"cannot write checkpoint {final}: {exc.strerror or exc}; check free space") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._list_checkpoints()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_latest_checkpoint(self) -> bool:
        ckpts = self._list_checkpoints()
        if not ckpts:
            return False
        latest = ckpts[-1]
        prev = ckpts[-2].name if len(ckpts) > 1 else None
        keep = (f"; the previous checkpoint {prev} is kept: delete {latest} to resume from it" if prev
                else "; no earlier checkpoint exists: delete it to start over")
        try:
            state = json.loads((latest / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SafesteerError(f"checkpoint {latest} is corrupted (state.json unreadable: {exc}){keep}") from exc
        tpath = latest / "tensors.safetensors"
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            raise SafesteerError(f"checkpoint {latest} is corrupted or not a safesteer SAE checkpoint{keep}")
        if not tpath.is_file() or sha256_file(tpath) != state.get("tensors_sha256"):
            raise SafesteerError(f"checkpoint {latest} is corrupted (tensors.safetensors missing or sha256 mismatch){keep}")
        if state.get("fingerprint") != self.fingerprint:
            raise SafesteerError(
                f"checkpoint {latest} was written by another configuration ({_identity_diff(state.get('identity') or {}, self)}); "
                "resume with the same settings or choose another --out"
            )
        try:
            t = load_file(str(tpath), device=str(self.device)) if self.device.type != "cpu" else load_file(str(tpath))
        except Exception as exc:
            raise SafesteerError(f"checkpoint {latest} is corrupted ({exc}){keep}") from exc
        self._reset_state()
        def layout(name: str, v: torch.Tensor) -> torch.Tensor:
            return enc_layout(v) if name == "W_enc" else v.clone()

        self.params = {n: layout(n, t[f"param.{n}"]) for n in PARAM_NAMES}
        self.adam_v = {k.split(".", 1)[1]: layout(k.split(".", 1)[1], v) for k, v in t.items() if k.startswith("adam_v.")}
        self.adam_m = {k.split(".", 1)[1]: layout(k.split(".", 1)[1], v) for k, v in t.items() if k.startswith("adam_m.")}
        if self.cfg.beta1 > 0:
            for n in self._trainable():
                self.adam_m.setdefault(n, torch.zeros_like(self.params[n]))
        best = {k.split(".", 1)[1]: layout(k.split(".", 1)[1], v) for k, v in t.items() if k.startswith("best.")}
        self.best = best or None
        self.last_fired = t["last_fired"].clone().to(self.device)
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        self.rows_seen = int(state["rows_seen"])
        self.scale = float(state["scale"])
        self.precision = str(state.get("precision", self.precision))
        self.sparse_threshold = float(state.get("sparse_threshold", self.sparse_threshold))
        self.best_val_loss = state.get("best_val_loss")
        self.best_epoch = state.get("best_epoch")
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.history = list(state.get("history") or [])
        self.acc = dict(state.get("acc") or self._new_acc())
        torch.set_rng_state(t["rng.torch"].cpu())
        rng = state.get("rng") or {}
        if "python" in rng:
            v, internal, gauss = rng["python"]
            random.setstate((v, tuple(internal), gauss))
        if "numpy" in rng:
            ns = rng["numpy"]
            np.random.set_state((ns["name"], t["rng.numpy_key"].cpu().numpy().astype(np.uint32), ns["pos"], ns["has_gauss"], ns["cached_gaussian"]))
        self.initialised = True
        print(f"[safesteer] resuming {self.out_dir.name} from {latest.name} (epoch {self.epoch}, step {self.step})",
              file=sys.stderr, flush=True)
        return True


def _identity_diff(saved: dict[str, Any], trainer: Trainer) -> str:
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
    return Trainer(cfg, d_in, out_dir, device=device, data_identity=data_identity, on_step=on_step, on_epoch=on_epoch).fit(
        batches, resume=resume
    )


__all__ = ["BatchSource", "TrainResult", "Trainer", "array_batches", "split_of_id", "train_sae"]
