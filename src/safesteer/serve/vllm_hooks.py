"""The gate and the steering inside vLLM's forward pass, per request of a flattened batch.

vLLM runs the scheduled tokens of every running request as one flat batch (rows = tokens). A
decoder layer returns ``(hidden_states, residual)``; the residual stream after the block is their
sum. For each forward pass, :class:`BatchHooks` reads which rows belong to which request (the
attention metadata's ``query_start_loc`` with the model runner's ``input_batch.req_ids``, in the
same order) and each row's absolute position (the layer's ``positions`` argument). Per request
(:class:`RequestSteer`, registered before vLLM schedules it and fixed for its life):

* **gate** — at each layer the gate reads, the *unsteered* residual rows whose positions fall in the
  request's gate span (``prompt`` / ``prompt_end`` of its prompt, computed from its token ids exactly
  as the HF engine's in-pass gate does, :func:`gate_span`) are summed, accumulated across prefill
  chunks; at the pass that holds the prompt's last token the mean is scored (the gate kind's own
  torch scorer, float64) and the decision is stored. It never changes afterwards (decode steps).
* **steering** — at the policy's layer, the request's rows (its prompt positions only, or every
  position, as the policy says) are replaced by ``edit(h)`` (``h + α·v`` and/or SAE clamps). The
  edited rows are written as ``residual = edit(hidden + residual)``, ``hidden = 0``: the next
  layer's fused add then sees exactly ``edit(h)``, as the HF engine's block output. Rows of other
  requests are untouched (bit-identical to a pass without any policy).

A policy's gate must read layers at or below its steering layer (the HF engine would then need a
second, unsteered pass; the vLLM engine rejects such a policy when it is put).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from safesteer.models.positions import prompt_starts
from safesteer.steering.gates import stack_features


def gate_span(ids: Sequence[int], position: str, n_end: int, header: Sequence[int]) -> tuple[int, int]:
    """``[start, end)`` of the tokens a gate at ``position`` pools over a chat prompt ``ids`` that ends
    with the generation prompt: the HF in-pass read (:func:`safesteer.models.positions.pool_prompt`)."""
    n = len(ids)
    if position == "prompt_end":
        return max(0, n - n_end), n
    if position == "prompt":
        t = torch.as_tensor([list(ids)], dtype=torch.long)
        before = torch.as_tensor([n - n_end + 1])
        start = int(prompt_starts(t, torch.ones_like(t), header, before)[0])
        return start, n
    if position == "last":
        return n - 1, n
    return 0, n  # mean over the whole rendered prompt


@dataclass
class RequestSteer:
    """One request's policy snapshot inside the engine: what to read, what to edit, what was decided."""

    layer: int
    """The steering layer."""
    edit: Callable[[torch.Tensor], torch.Tensor]
    where: str
    n_prompt: int
    gate: Any = None
    """``(pooled features) → logits`` (float64 torch), or None: steer unconditionally."""
    gate_layers: tuple[int, ...] = ()
    threshold: float = 0.0
    span: tuple[int, int] = (0, 0)
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    decided: bool = False
    flagged: bool = False
    score: float | None = None
    floor: float | None = None
    """A segmented gate's largest score over the request's pieces, read in gate passes of their own
    before it (``vllm_api.gate_pass``): the in-pass score is the larger of it and the whole prompt's."""

    def __post_init__(self) -> None:
        if self.gate is None:
            self.decided, self.flagged = True, True


class BatchHooks:
    """Forward hooks on every decoder layer of a vLLM model that apply the registered requests'
    gates and steering (see the module docstring). ``batch()`` returns the current pass's
    ``(req_ids, query_start_loc)``; ``requests`` maps vLLM request ids to their :class:`RequestSteer`
    (registered and removed by the engine's loop thread, the same thread that runs the model)."""

    def __init__(self, layers: Sequence[torch.nn.Module], batch: Callable[[], tuple[list[str], Any]]):
        self.layers = layers
        self.batch = batch
        self.requests: dict[str, RequestSteer] = {}
        self.passes = 0
        self._plan: list[tuple[RequestSteer, int, int, torch.Tensor]] | None = None
        self._handles: list[Any] = []

    def install(self, root: torch.nn.Module) -> None:
        self._handles.append(root.register_forward_pre_hook(self._new_pass))
        for l, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(l), with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _new_pass(self, _module: Any, _args: Any) -> None:
        self._plan = None
        self.passes += 1

    def _rows(self, positions: torch.Tensor) -> list[tuple[RequestSteer, int, int, torch.Tensor]]:
        """(request, first row, end row, positions of its rows) of the registered requests in this pass."""
        if self._plan is None:
            req_ids, qsl = self.batch()
            qsl = [int(x) for x in qsl.tolist()]
            plan = []
            for i in range(len(qsl) - 1):
                rs = self.requests.get(req_ids[i])
                if rs is not None and qsl[i + 1] > qsl[i]:
                    plan.append((rs, qsl[i], qsl[i + 1], positions[qsl[i] : qsl[i + 1]].clone()))
            self._plan = plan
        return self._plan

    def _hook(self, l: int) -> Callable[..., Any]:
        def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.requests:
                return None
            positions = kwargs.get("positions", args[0] if args else None)
            plan = self._rows(positions)
            if not plan:
                return None
            hidden, residual = output
            self._read_gates(l, plan, hidden, residual)
            return self._steer(l, plan, hidden, residual)

        return hook

    def _read_gates(self, l: int, plan: list, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        for rs, s, _e, pos in plan:
            if rs.decided or l not in rs.gate_layers:
                continue
            m = (pos >= rs.span[0]) & (pos < rs.span[1])
            if bool(m.any()):
                idx = torch.nonzero(m).reshape(-1) + s
                h = hidden[idx] + residual[idx]  # the unsteered residual stream (no edit ran at l yet)
                rs.sums[l] = rs.sums.get(l, 0) + h.double().sum(dim=0)  # float64: chunks add up exactly
                rs.counts[l] = rs.counts.get(l, 0) + int(idx.numel())
            if l == rs.gate_layers[-1] and bool((pos == rs.n_prompt - 1).any()):
                pooled = {
                    g: (rs.sums[g] / max(rs.counts.get(g, 0), 1)).reshape(1, -1)
                    if g in rs.sums
                    else torch.zeros(1, hidden.shape[-1], dtype=torch.float64, device=hidden.device)
                    for g in rs.gate_layers
                }
                score = float(rs.gate(stack_features(pooled, rs.gate_layers))[0])
                if rs.floor is not None:  # the pieces' largest score (steering.segments.segment_max)
                    score = max(score, rs.floor)
                rs.score, rs.flagged, rs.decided = score, bool(score > rs.threshold), True
                rs.sums.clear()

    def _steer(self, l: int, plan: list, hidden: torch.Tensor, residual: torch.Tensor) -> Any:
        rows: list[torch.Tensor] = []
        edits: list[tuple[Callable, torch.Tensor]] = []
        for rs, s, e, pos in plan:
            if rs.layer != l or not (rs.decided and rs.flagged):
                continue
            if rs.where == "prompt":
                idx = torch.nonzero(pos < rs.n_prompt).reshape(-1) + s
                if idx.numel() == 0:
                    continue
            else:
                idx = torch.arange(s, e, device=hidden.device)
            rows.append(idx)
            edits.append((rs.edit, idx))
        if not rows:
            return None
        new_res = residual.clone()
        new_hidden = hidden.clone()
        for edit, idx in edits:
            new_res[idx] = edit(hidden[idx] + residual[idx])
            new_hidden[idx] = 0.0
        return new_hidden, new_res
