"""SAE quality metrics, computed from mergeable sums so they stream over any number of batches.

* MSE   = E_rows |x - x^|^2                       (in the space the SAE was trained in)
* FVU   = E|x - x^|^2 / E|x - E x|^2              (explained variance = 1 - FVU)
* L0    = mean number of active latents per row
* dead  = fraction of latents that did not fire over the last N training rows
* gamma = E|x^|^2 / E[x^ . x]                    (relative reconstruction bias; < 1 = shrinkage)
* loss  = MSE + lambda * L1 + aux                 (the training objective at the final lambda)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch


@dataclass
class ReconSums:
    """Running sums over rows; :meth:`merge` combines two streams exactly."""

    n: int = 0
    sq_err: float = 0.0  # sum |x - x^|^2
    sq_err_aux: float = 0.0
    l1: float = 0.0  # sum of the sparsity term (before lambda)
    nnz: int = 0
    xhat_sq: float = 0.0  # sum |x^|^2
    xhat_dot_x: float = 0.0
    x_sq: float = 0.0
    x_sum: np.ndarray | None = field(default=None, repr=False)

    def add(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        f: torch.Tensor,
        *,
        x_aux: torch.Tensor | None = None,
        l1_term: torch.Tensor | None = None,
    ) -> None:
        xd = x.double()
        xh = x_hat.double()
        self.n += x.shape[0]
        self.sq_err += float((xd - xh).pow(2).sum())
        if x_aux is not None:
            self.sq_err_aux += float((xd - x_aux.double()).pow(2).sum())
        if l1_term is not None:
            self.l1 += float(l1_term.double().sum())
        self.nnz += int((f > 0).sum())
        self.xhat_sq += float(xh.pow(2).sum())
        self.xhat_dot_x += float((xh * xd).sum())
        self.x_sq += float(xd.pow(2).sum())
        s = xd.sum(0).cpu().numpy()
        self.x_sum = s if self.x_sum is None else self.x_sum + s

    def merge(self, other: "ReconSums") -> "ReconSums":
        out = ReconSums(
            n=self.n + other.n,
            sq_err=self.sq_err + other.sq_err,
            sq_err_aux=self.sq_err_aux + other.sq_err_aux,
            l1=self.l1 + other.l1,
            nnz=self.nnz + other.nnz,
            xhat_sq=self.xhat_sq + other.xhat_sq,
            xhat_dot_x=self.xhat_dot_x + other.xhat_dot_x,
            x_sq=self.x_sq + other.x_sq,
        )
        if self.x_sum is None:
            out.x_sum = other.x_sum
        elif other.x_sum is None:
            out.x_sum = self.x_sum
        else:
            out.x_sum = self.x_sum + other.x_sum
        return out

    def total_variance(self) -> float:
        if self.n == 0 or self.x_sum is None:
            return float("nan")
        return self.x_sq - float(np.dot(self.x_sum, self.x_sum)) / self.n

    def summary(self, l1_coef: float | None = None) -> dict[str, float]:
        if self.n == 0:
            return {}
        var = self.total_variance()
        out = {
            "rows": self.n,
            "mse": self.sq_err / self.n,
            "fvu": self.sq_err / var if var > 0 else float("nan"),
            "l0": self.nnz / self.n,
            "gamma": self.xhat_sq / self.xhat_dot_x if self.xhat_dot_x != 0 else float("nan"),
            "aux": self.sq_err_aux / self.n,
            "l1": self.l1 / self.n,
        }
        out["explained_variance"] = 1.0 - out["fvu"]
        if l1_coef is not None:
            out["loss"] = out["mse"] + l1_coef * out["l1"] + out["aux"]
        return out


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x.double() - x_hat.double()).pow(2).sum(-1).mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    xd = x.double()
    return float((xd - x_hat.double()).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())


def l0(f: torch.Tensor) -> float:
    return float((f > 0).sum(-1).double().mean())


def gamma(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    xh = x_hat.double()
    return float(xh.pow(2).sum() / (xh * x.double()).sum())


def dead_fraction(last_fired: torch.Tensor, rows_seen: int, window: int) -> float:
    """Fraction of latents whose last firing is at least ``window`` rows ago (or never, early on)."""
    if last_fired.numel() == 0:
        return 0.0
    horizon = max(1, min(int(window), int(rows_seen)))
    return float(((rows_seen - last_fired) >= horizon).double().mean())


def convergence_table(history: Iterable[dict[str, Any]]) -> str:
    """Markdown table, one row per epoch (the shape of the original study's Table 2)."""
    head = (
        "| epoch | train loss | val loss | val MSE | FVU | L0 | dead % | gamma |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for h in history:
        v = h.get("val") or {}
        t = h.get("train") or {}
        lines.append(
            f"| {h.get('epoch')} | {_f(t.get('loss'))} | {_f(v.get('loss'))} | {_f(v.get('mse'))} | "
            f"{_f(v.get('fvu'), 4)} | {_f(v.get('l0'), 1)} | "
            f"{_f(100 * h['dead_fraction'] if h.get('dead_fraction') is not None else None, 2)} | "
            f"{_f(v.get('gamma'), 4)} |"
        )
    return "\n".join(lines) + "\n"


def _f(v: Any, digits: int = 6) -> str:
    if v is None:
        return "-"
    try:
        fv = float(v)
    except (TypeError, ValueError):
        return str(v)
    if fv != fv:
        return "nan"
    if digits >= 5 and (abs(fv) < 1e-3 or abs(fv) >= 1e4) and fv != 0:
        return f"{fv:.4e}"
    return f"{fv:.{digits}f}"
