"""The trainer's view of the data: batches as checked tensors, and the SAE initialised from them.

* :func:`batch_tensor` -- one batch (array or tensor, rows x d_in) as float32 on the training
  device, refused with one line when it has another width or holds NaN/Inf (naming the row id);
* :func:`init_from_data` -- the starting parameters from the first ``init_rows`` training rows:
  the scale ``c`` that gives the activations unit mean squared norm (when ``scale_activations``),
  ``b_dec`` at the geometric median (Weiszfeld) or the mean of the scaled sample, and the rest as
  :class:`~safesteer.sae.gated.GatedSAE` draws them from ``seed`` (random unit ``W_dec`` rows,
  ``W_enc = W_dec^T``, zero gate/magnitude biases and ``r_mag``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.sae.batches import BatchSource, unpack
from safesteer.sae.config import SAEConfig, TrainConfig
from safesteer.sae.gated import PARAM_NAMES, GatedSAE, enc_layout, geometric_median


def batch_tensor(
    H: Any, d_in: int, device: torch.device, *, epoch: int, batch: int, ids: Any, step: int
) -> torch.Tensor:
    """``H`` as a float32 ``rows x d_in`` tensor on ``device``; ``epoch``/``batch``/``ids``/``step`` name
    the batch in the errors."""
    x = H if isinstance(H, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(H)))
    if x.ndim != 2 or x.shape[1] != d_in:
        shape = tuple(x.shape)
        raise SafesteerError(
            f"batch {batch} of epoch {epoch} has shape {shape}; expected rows x {d_in} "
            "(activations of another width than this SAE; check --acts)"
        )
    x = x.to(device=device, dtype=torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_row = int((~finite.all(1)).nonzero()[0, 0])
        where = (
            f" (row id {ids[bad_row]!s})" if ids is not None and len(ids) > bad_row else f" (row {bad_row})"
        )
        raise SafesteerError(
            f"non-finite activations (NaN/Inf) in batch {batch} of epoch {epoch} at step {step}{where}; "
            "re-extract that shard"
        )
    return x


def init_from_data(
    batches: BatchSource, cfg: TrainConfig, d_in: int, d_sae: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], float]:
    """(initial parameters in the trainer's layout, activation scale ``c``) from epoch 0's training rows."""
    rows: list[torch.Tensor] = []
    have = 0
    for bi, item in enumerate(batches(0, "train")):
        H, ids = unpack(item)
        x = batch_tensor(H, d_in, device, epoch=0, batch=bi, ids=ids, step=0)
        rows.append(x)
        have += x.shape[0]
        if have >= cfg.init_rows:
            break
    if have == 0:
        raise SafesteerError(
            "the training split is empty; extract more activations or lower the validation fraction"
        )
    sample = torch.cat(rows)[: cfg.init_rows].to(device)
    scale = 1.0
    if cfg.scale_activations:
        msq = float(sample.double().pow(2).sum(1).mean())
        if not msq > 0:
            raise SafesteerError("the activations are all zero; cannot scale them to unit norm")
        scale = 1.0 / math.sqrt(msq)
    sample = sample * scale
    sae = GatedSAE(SAEConfig(d_in=d_in, d_sae=d_sae, variant=cfg.variant), seed=cfg.seed, device=device)
    with torch.no_grad():
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(sample.float()))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(sample.mean(0))
    params = {n: getattr(sae, n).detach().clone().contiguous() for n in PARAM_NAMES}
    params["W_enc"] = enc_layout(params["W_enc"])
    return params, scale


__all__ = ["batch_tensor", "init_from_data"]
