"""Constrained Adam against float64 references: a planted decoder (unit rows kept, parallel gradient removed)
and torch.optim.Adam on the unconstrained parameters."""

from __future__ import annotations

import math

import pytest
import torch

from safesteer.sae.optim import ConstrainedAdam


def _unit_rows(S, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(S, d, generator=g, dtype=torch.float64)
    return W / W.norm(dim=1, keepdim=True)


def test_parallel_component_is_removed_exactly():
    W = _unit_rows(16, 8)
    g = torch.Generator().manual_seed(1)
    perp = torch.randn(16, 8, generator=g, dtype=torch.float64)
    perp -= (perp * W).sum(1, keepdim=True) * W  # planted: a gradient orthogonal to each row...
    c = torch.randn(16, 1, generator=g, dtype=torch.float64) * 5
    grad = perp + c * W  # ...plus a known parallel part
    out = ConstrainedAdam.project_out_parallel(grad.clone(), W)
    torch.testing.assert_close(out, perp, rtol=0, atol=1e-12)
    assert float((out * W).sum(1).abs().max()) < 1e-12


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_constrained_steps_match_a_float64_reference(beta1):
    S, d, lr, b2, eps = 24, 6, 0.05, 0.999, 1e-8
    W64 = _unit_rows(S, d)
    b64 = torch.zeros(S, dtype=torch.float64)
    params = {"W_dec": W64.float().clone(), "b_gate": b64.float().clone()}
    opt = ConstrainedAdam(beta1=beta1, beta2=b2, eps=eps)
    opt.init(params, ["W_dec", "b_gate"])
    m = {n: torch.zeros_like(t) for n, t in (("W_dec", W64), ("b_gate", b64))}
    v = {n: torch.zeros_like(t) for n, t in (("W_dec", W64), ("b_gate", b64))}
    ref = {"W_dec": W64.clone(), "b_gate": b64.clone()}
    g = torch.Generator().manual_seed(2)
    for t in range(1, 21):
        grads64 = {
            "W_dec": torch.randn(S, d, generator=g, dtype=torch.float64),
            "b_gate": torch.randn(S, generator=g, dtype=torch.float64),
        }
        # the float64 reference, written as the textbook formulas
        for n, gr in grads64.items():
            gr = gr.clone()
            if n == "W_dec":
                gr = gr - (gr * ref[n]).sum(1, keepdim=True) * ref[n]
            m[n] = beta1 * m[n] + (1 - beta1) * gr
            v[n] = b2 * v[n] + (1 - b2) * gr * gr
            mhat = m[n] / (1 - beta1**t) if beta1 > 0 else gr
            vhat = v[n] / (1 - b2**t)
            ref[n] = ref[n] - lr * mhat / (vhat.sqrt() + eps)
            if n == "W_dec":
                ref[n] = ref[n] / ref[n].norm(dim=1, keepdim=True)
        # the optimiser sees the float32 gradient at its own float32 weights
        opt.step(params, {n: x.float() for n, x in grads64.items()}, lr, t)
        assert float((params["W_dec"].norm(dim=1) - 1).abs().max()) <= 2e-7
        for n in ref:
            torch.testing.assert_close(params[n].double(), ref[n], rtol=0, atol=5e-5)


def test_unconstrained_params_follow_torch_adam():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(50, generator=g, dtype=torch.float64)
    ours = {"b": x0.clone()}
    opt = ConstrainedAdam(beta1=0.9, beta2=0.99, eps=1e-8, unit_rows=())
    opt.init(ours, ["b"])
    p = torch.nn.Parameter(x0.clone())
    ref = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for t in range(1, 31):
        grad = torch.randn(50, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        ref.step()
        opt.step(ours, {"b": grad.clone()}, 0.01, t)
    # the eps placement (eps*sqrt(bc2) on sqrt(v)) is algebraically torch's eps on sqrt(v/bc2)
    torch.testing.assert_close(ours["b"], p.detach(), rtol=0, atol=1e-12)
    assert not math.isnan(float(ours["b"].sum()))
