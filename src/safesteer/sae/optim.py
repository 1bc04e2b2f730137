"""Constrained Adam (as dictionary_learning's ``ConstrainedAdam``): Adam that keeps decoder rows at unit norm.

For every parameter named in ``unit_rows`` (here ``W_dec``, ``d_sae x d_in``: one row per latent)
the step first removes, from each row's gradient, its component parallel to that (unit) row,
``g_j <- g_j - (g_j . w_j) w_j``, then takes the Adam step, then renormalises each row to unit norm.
So the L1/L2 trade-off cannot be gamed by shrinking decoder rows.

Adam with bias correction, ``beta1 = 0`` by default (the Gated SAE recipe: no first moment is
kept, the numerator is the gradient itself)::

    v <- beta2 v + (1 - beta2) g^2
    p <- p - lr / bc1 * m / (sqrt(v / bc2) + eps),   bc_i = 1 - beta_i^t

written as ``p -= (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2))`` (one fewer pass over v).
The optimiser holds only the moments; parameters and gradients are passed to :meth:`step` as dicts
of tensors updated in place, so the trainer keeps one parameter dict it can save and restore.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


class ConstrainedAdam:
    """Adam over named tensors, with unit-norm rows for the parameters in ``unit_rows``."""

    def __init__(
        self,
        *,
        beta1: float = 0.0,
        beta2: float = 0.999,
        eps: float = 1e-8,
        unit_rows: Sequence[str] = ("W_dec",),
    ):
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.unit_rows = tuple(unit_rows)
        self.v: dict[str, torch.Tensor] = {}
        self.m: dict[str, torch.Tensor] = {}
        self._bufs: dict[str, torch.Tensor] = {}

    def init(self, params: dict[str, torch.Tensor], names: Iterable[str]) -> None:
        """Zero moments for ``names`` (same shape, memory layout and device as the parameters)."""
        self.v, self.m = {}, {}
        for n in names:
            self.v[n] = torch.zeros_like(params[n])
            if self.beta1 > 0:
                self.m[n] = torch.zeros_like(params[n])

    @staticmethod
    @torch.no_grad()
    def project_out_parallel(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``g_j -= (g_j . w_j) w_j`` for every row j, in place (row dots as a batched matmul: no big
        temporary)."""
        coef = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)
        return g.addcmul_(w, coef, value=-1.0)

    @torch.no_grad()
    def step(
        self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float, t: int
    ) -> None:
        """One update of every parameter with moments, at step ``t`` (1-based). ``grads`` may be modified."""
        b1, b2 = self.beta1, self.beta2
        bc1 = 1.0 - b1**t if b1 > 0 else 1.0
        root_bc2 = math.sqrt(1.0 - b2**t)
        step_size = lr * root_bc2 / bc1
        eps_hat = self.eps * root_bc2
        for n, v in self.v.items():
            p, g = params[n], grads[n]
            if n in self.unit_rows:
                self.project_out_parallel(g, p)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            if b1 > 0:
                m = self.m[n]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                num = m
            else:
                num = g
            buf = self._bufs.get(n)
            if buf is None or buf.shape != v.shape or buf.stride() != v.stride():
                buf = self._bufs[n] = torch.empty_like(v)  # reused: no fresh pages every step
            torch.sqrt(v, out=buf).add_(eps_hat)
            p.addcdiv_(num, buf, value=-step_size)
            if n in self.unit_rows:
                p /= p.norm(dim=1, keepdim=True)


__all__ = ["ConstrainedAdam"]
