"""The vLLM engine's per-request hooks on a planted flat-batch model (no vLLM needed): the gate's score is
brute force's and the same whether the prompt is prefilled in one pass or in chunks; steering touches
the flagged request's rows only (its prompt rows with ``where="prompt"``)."""

from __future__ import annotations

import torch
from torch import nn

from safesteer.serve.vllm_hooks import BatchHooks, RequestSteer, gate_span

D = 8


class Layer(nn.Module):
    """vLLM's decoder-layer contract: (positions, hidden, residual) → (hidden', residual'); the
    residual stream after the layer is their sum."""

    def __init__(self, seed: int):
        super().__init__()
        self.W = torch.randn(D, D, generator=torch.Generator().manual_seed(seed)) / D**0.5

    def forward(self, positions, hidden, residual):
        x = hidden if residual is None else hidden + residual
        return torch.tanh(x @ self.W + 0.01 * positions.unsqueeze(1).float()), x


class Model(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Layer(i) for i in range(n))

    def forward(self, positions, x):
        hidden, residual, streams = x, None, []
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
            streams.append(hidden + residual)
        return streams


def _run(model, hooks, batch, xs, positions):
    hooks.batch = lambda: batch
    return model(positions, xs)


def _setup():
    model = Model()
    hooks = BatchHooks(model.layers, lambda: ([], torch.tensor([0])))
    hooks.install(model)
    return model, hooks


def test_gate_score_is_brute_force_and_chunking_does_not_change_it():
    torch.manual_seed(0)
    n, span = 10, (4, 10)
    x = torch.randn(n, D)
    pos = torch.arange(n)
    w = torch.randn(D, dtype=torch.float64)
    ref = Model()(pos, x)[1][span[0] : span[1]].mean(0).double() @ w + 0.5

    def steer():
        return RequestSteer(2, lambda h: h, "all", n, lambda f: f.double() @ w + 0.5, (1,), 0.0, span)

    model, hooks = _setup()
    one = hooks.requests["a"] = steer()
    _run(model, hooks, (["a"], torch.tensor([0, n])), x, pos)
    two = hooks.requests["a"] = steer()
    _run(model, hooks, (["a"], torch.tensor([0, 6])), x[:6], pos[:6])
    assert not two.decided  # the prompt's last token has not been seen yet
    _run(model, hooks, (["a"], torch.tensor([0, 4])), x[6:], pos[6:])
    assert one.decided and two.decided
    assert abs(one.score - float(ref)) < 1e-6  # the float32 mean of the reference vs a float64 sum
    assert abs(one.score - two.score) < 1e-12
    assert one.flagged == two.flagged == (float(ref) > 0)


def test_steering_touches_the_flagged_requests_rows_only():
    torch.manual_seed(1)
    x = torch.randn(9, D)
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1])
    qsl = torch.tensor([0, 4, 7, 9])
    plain = Model()(pos, x)
    v = torch.randn(D)
    model, hooks = _setup()
    flagged = RequestSteer(
        1, lambda h: h + v, "all", 4, lambda f: torch.ones(1, dtype=torch.float64), (0,), 0.0, (0, 4)
    )
    spared = RequestSteer(
        1, lambda h: h + v, "all", 3, lambda f: -torch.ones(1, dtype=torch.float64), (0,), 0.0, (0, 3)
    )
    hooks.requests.update(a=flagged, b=spared)  # request 'c' has no policy
    out = _run(model, hooks, (["a", "b", "c"], qsl), x, pos)
    assert flagged.flagged and not spared.flagged
    assert torch.equal(out[0], plain[0])  # below the steering layer: nothing changes
    assert torch.equal(out[1][4:], plain[1][4:])  # b (unflagged) and c (no policy): bit-identical
    assert torch.allclose(out[1][:4], plain[1][:4] + v)
    assert not torch.allclose(out[2][:4], plain[2][:4])


def test_where_prompt_steers_the_prompt_pass_not_the_decode_steps():
    torch.manual_seed(2)
    v = torch.randn(D)
    model, hooks = _setup()
    rs = RequestSteer(1, lambda h: h + v, "prompt", 3)  # unconditional
    hooks.requests["a"] = rs
    x, pos = torch.randn(3, D), torch.arange(3)
    out = _run(model, hooks, (["a"], torch.tensor([0, 3])), x, pos)
    assert torch.allclose(out[1], Model()(pos, x)[1] + v)
    step = _run(model, hooks, (["a"], torch.tensor([0, 1])), x[:1], torch.tensor([3]))
    assert torch.equal(step[1], Model()(torch.tensor([3]), x[:1])[1])


def test_gate_span_matches_the_hf_in_pass_read():
    """The span pooled by the vLLM hook is the one :func:`pool_prompt` (the HF in-pass gate) pools."""
    from safesteer.models.positions import pool_prompt

    ids = [1, 4, 9, 5, 2, 1, 4, 6, 7, 2, 8, 1, 3]  # the user header (1, 4) twice: the last one counts
    h = torch.randn(1, len(ids), D, generator=torch.Generator().manual_seed(3))
    t, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    for position, header in (("prompt", (1, 4)), ("prompt_end", ()), ("prompt", ())):
        s, e = gate_span(ids, position, 3, header)
        assert torch.allclose(h[0, s:e].mean(0), pool_prompt(h, mask, t, position, 3, header)[0]), position
    assert gate_span(ids, "prompt", 3, (1, 4)) == (7, 13)
