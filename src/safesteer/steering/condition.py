"""Conditional steering (CAST, Lee et al. 2025): steer a prompt only when a gate flags it.

A :class:`Condition` is a probe on the residual of block ``layer`` pooled at ``position``
(``prompt_end``: the template tokens after the user turn; ``prompt``: the user message and those
tokens; ``last`` or ``mean`` also work), with a threshold on its logit: linear ``w·h + b``, or
with one ReLU hidden layer ``w·relu(W1 h + b1) + b`` (an MLP gate, or an average of several —
the same form with the hidden units side by side); the probe's standardisation is folded into
``w`` / ``W1``.

:func:`conditional` installs gate and steering on a backbone for the duration of a ``with`` block,
so evaluation, benchmarks and the service share one implementation::

    with conditional(backbone, condition, intervention) as state:
        answers = backbone.generate(prompts)        # state.flags: which prompts were steered

* The gate is read from the **unsteered** residual of the same forward pass when the condition
  layer is ≤ the steering layer (the gate hook runs before the steering edit); otherwise a second,
  unsteered pass to the condition layer decides first.
* The decision is made per prompt on every *new* input (no KV cache yet) and then held for the
  generated tokens of that input (KV-cached steps): ``h' = h + g·(edit(h) − h)``, g ∈ {0, 1}.
* An unflagged row's activations are left untouched (``torch.where`` keeps the very tensor
  values), so its outputs are bit-identical to an unsteered pass over the same batch.
* ``prompt_end`` is read as the last :func:`~safesteer.models.positions.prompt_end_length` real
  tokens of the input, i.e. the input must end with the generation prompt (chat + nothing);
  ``prompt`` from just after the last user header (:func:`~safesteer.models.positions.user_header`)
  to the input's end. For
  inputs with text after it (teacher-forced answers) pass ``flags`` computed by :func:`gate_flags`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, write_json
from safesteer.models.positions import last_index, prompt_end_length, prompt_starts, span_mask, user_header
from safesteer.models.where import PromptOnly, body, is_new_input
from safesteer.steering.strategies import Intervention

GATE_POSITIONS = ("prompt_end", "prompt", "last", "mean")
DEFAULT_FPR = 0.05


@dataclass
class Condition:
    """Gate ``score(h) > threshold`` on block ``layer`` pooled at ``position``; ``score(h) = w·h + b``,
    or ``w·relu(W1 h + b1) + b`` when the hidden layer ``W1`` (k × d), ``b1`` (k) is given."""

    w: np.ndarray
    b: float
    layer: int
    position: str = "prompt_end"
    threshold: float = 0.0
    name: str = "gate"
    meta: dict[str, Any] = field(default_factory=dict)
    W1: np.ndarray | None = None
    b1: np.ndarray | None = None
    _torch: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.w = np.asarray(self.w, dtype=np.float64).reshape(-1)
        if self.position not in GATE_POSITIONS:
            raise SafesteerError(
                f"gate position '{self.position}' unsupported; valid choices: {', '.join(GATE_POSITIONS)}"
            )
        self.layer, self.b, self.threshold = int(self.layer), float(self.b), float(self.threshold)
        if (self.W1 is None) != (self.b1 is None):
            raise SafesteerError("an MLP gate needs both hidden weights W1 and biases b1")
        if self.W1 is not None:
            self.W1 = np.asarray(self.W1, dtype=np.float64)
            self.b1 = np.asarray(self.b1, dtype=np.float64).reshape(-1)
            k = self.w.shape[0]
            if self.W1.ndim != 2 or self.W1.shape[0] != k or self.b1.shape[0] != k:
                raise SafesteerError(
                    f"MLP gate shapes disagree: W1 {self.W1.shape}, b1 {self.b1.shape}, w {self.w.shape}; "
                    "need W1 (k × d), b1 (k), w (k)"
                )

    @property
    def kind(self) -> str:
        return "linear" if self.W1 is None else "mlp"

    @property
    def d(self) -> int:
        """Size of the activation vectors the gate reads."""
        return int(self.w.shape[0] if self.W1 is None else self.W1.shape[1])

    @classmethod
    def from_probe(
        cls, probe: Any, layer: int, position: str = "prompt_end", threshold: float = 0.0, name: str = "gate"
    ) -> "Condition":
        """From a :class:`~safesteer.probes.Probe` (raw-space ``w``, ``b``: standardisation folded in)."""
        return cls(
            np.asarray(probe.w),
            float(probe.b),
            layer,
            position,
            threshold,
            name,
            {"probe_metrics": dict(getattr(probe, "metrics", {}) or {})},
        )

    def score(self, H: np.ndarray | torch.Tensor) -> np.ndarray:
        H = (
            H.detach().double().cpu().numpy()
            if isinstance(H, torch.Tensor)
            else np.asarray(H, dtype=np.float64)
        )
        if H.ndim != 2 or H.shape[1] != self.d:
            raise SafesteerError(f"gate expects rows × {self.d} activations, got {H.shape}")
        if self.W1 is not None:
            H = np.maximum(H @ self.W1.T + self.b1, 0.0)
        return H @ self.w + self.b

    def torch_scorer(self, device: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`score` as a float64 torch function, its weights put on ``device`` once per device
        (the in-pass gate; a Condition's weights are not meant to change after it is built)."""
        key = str(device)
        if key not in self._torch:
            self._torch[key] = (
                torch.as_tensor(self.w, dtype=torch.float64, device=device),
                None
                if self.W1 is None
                else (
                    torch.as_tensor(self.W1.T.copy(), dtype=torch.float64, device=device),
                    torch.as_tensor(self.b1, dtype=torch.float64, device=device),
                ),
            )
        w, hidden = self._torch[key]
        b = self.b

        def score(pooled: torch.Tensor) -> torch.Tensor:
            x = pooled.double()
            if hidden is not None:
                x = torch.relu(x @ hidden[0] + hidden[1])
            return x @ w + b

        return score

    def flags(self, H: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.score(H) > self.threshold

    def with_threshold(self, threshold: float, **changes: Any) -> "Condition":
        """A copy with another ``threshold`` (and any other fields in ``changes``, e.g. ``position``)."""
        return dataclasses.replace(self, threshold=threshold, meta=dict(self.meta), **changes)

    # I/O (no pickle)
    def save(self, out_dir: str | Path) -> Path:
        from safetensors.numpy import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "condition.safetensors") as tmp:
            tensors = {"w": np.ascontiguousarray(self.w), "b": np.array([self.b])}
            if self.W1 is not None:
                tensors.update({"W1": np.ascontiguousarray(self.W1), "b1": np.ascontiguousarray(self.b1)})
            save_file(tensors, str(tmp))
        write_json(
            out / "condition.json",
            {
                "format": "safesteer-condition",
                "version": 1,
                "layer": self.layer,
                "position": self.position,
                "threshold": self.threshold,
                "name": self.name,
                "d": self.d,
                "kind": self.kind,
                "hidden": 0 if self.W1 is None else int(self.W1.shape[0]),
                "meta": self.meta,
            },
        )
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Condition":
        from safetensors.numpy import load_file

        folder = Path(path)
        folder = folder.parent if folder.name == "condition.json" else folder
        meta = read_json(folder / "condition.json")
        if not isinstance(meta, dict) or meta.get("format") != "safesteer-condition":
            raise SafesteerError(f"{folder / 'condition.json'} is not a safesteer condition")
        t = load_file(str(folder / "condition.safetensors"))
        return cls(
            t["w"],
            float(t["b"][0]),
            meta["layer"],
            meta["position"],
            meta["threshold"],
            meta.get("name", "gate"),
            meta.get("meta", {}),
            t.get("W1"),
            t.get("b1"),
        )


def threshold_for_fpr(scores: Sequence[float] | np.ndarray, target_fpr: float = DEFAULT_FPR) -> float:
    """The lowest threshold t with share(scores > t) ≤ ``target_fpr`` on harmless ``scores``."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise SafesteerError("threshold calibration needs finite scores of at least one harmless prompt")
    if not 0.0 <= target_fpr < 1.0:
        raise SafesteerError(f"target false-positive rate must be in [0, 1), got {target_fpr}")
    k = int(np.floor(target_fpr * s.size + 1e-9))  # false positives allowed
    return float(s[k])


def gate_scores(
    backbone: Any,
    condition: Condition,
    prompts: Sequence[str],
    batch_size: int = 32,
    system: str | None = None,
) -> np.ndarray:
    """Gate logits of chat-rendered ``prompts`` (unsteered)."""
    H = backbone.pooled(
        list(prompts), [condition.layer], batch_size=batch_size, position=condition.position, system=system
    )[condition.layer]
    return condition.score(H)


def gate_flags(
    backbone: Any,
    condition: Condition,
    prompts: Sequence[str],
    batch_size: int = 32,
    system: str | None = None,
) -> np.ndarray:
    return gate_scores(backbone, condition, prompts, batch_size, system) > condition.threshold


@dataclass
class GateState:
    """What the gate decided inside a :func:`conditional` block (one entry per new input batch)."""

    scores: list[np.ndarray] = field(default_factory=list)
    flagged: list[np.ndarray] = field(default_factory=list)
    current: torch.Tensor | None = None

    @property
    def flags(self) -> np.ndarray:
        return np.concatenate(self.flagged) if self.flagged else np.zeros(0, dtype=bool)


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


@contextlib.contextmanager
def conditional(
    backbone: Any,
    condition: Condition,
    intervention: Intervention,
    flags: Sequence[bool] | np.ndarray | None = None,
    system: str | None = None,
) -> Iterator[GateState]:
    """Apply ``intervention`` only to the rows that ``condition`` flags (see the module docstring).

    ``flags`` (optional) replaces the gate by fixed per-row decisions (then every new input batch
    must have that many rows). Yields a :class:`GateState` recording each decision.
    """
    if intervention.is_identity:
        raise SafesteerError("conditional steering needs an intervention with a vector or an edit")
    L, c = backbone.check_layer(intervention.layer), backbone.check_layer(condition.layer)
    prefix = getattr(backbone, "_prefix", None)
    if prefix is not None and c < prefix.layer:
        raise SafesteerError(
            f"the gate reads layer {c}, below the active prefix cache's layer {prefix.layer}; "
            "leave the prefix cache off or gate at a layer >= it"
        )
    fixed = None if flags is None else torch.as_tensor(np.asarray(flags, dtype=bool))
    n_end = prompt_end_length(backbone, system) if condition.position in ("prompt_end", "prompt") else 0
    header = user_header(backbone, system) if condition.position == "prompt" else ()
    gate_score = condition.torch_scorer(backbone.device)
    state = GateState()
    mask_now: dict[str, torch.Tensor | None] = {"mask": None, "ids": None}
    inner = {"on": False}
    if intervention.edit is not None:
        edit = intervention.edit
    else:
        delta = torch.as_tensor(
            intervention.alpha * intervention.vector, dtype=torch.float32, device=backbone.device
        )
        edit = lambda h: h + delta.to(h.dtype)  # noqa: E731

    def decide(h: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> None:
        if condition.position == "mean":
            m = mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            last = last_index(mask)
            if condition.position == "prompt":
                start = prompt_starts(ids, mask, header, last - n_end + 1).to(last.device)
            else:
                start = last - (n_end if condition.position == "prompt_end" else 1) + 1
            spans = torch.stack([start, last + 1], dim=1)
            m = (span_mask(spans, h.shape[1], h.device) & mask.bool()).to(h.dtype).unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        score = gate_score(pooled)
        g = score > condition.threshold
        state.scores.append(score.cpu().numpy())
        state.flagged.append(g.cpu().numpy())
        state.current = g

    def pre(_module, args, kwargs):
        if inner["on"]:
            return None
        if not is_new_input(kwargs):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is None:
            mask = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        mask_now["mask"], mask_now["ids"] = mask, ids
        state.current = None
        if fixed is not None:
            if fixed.shape[0] != ids.shape[0]:
                raise SafesteerError(f"{fixed.shape[0]} fixed gate flags for a batch of {ids.shape[0]} rows")
            state.current = fixed.to(ids.device)
            state.flagged.append(fixed.numpy())
        elif c > L:  # the gate layer comes after the steering layer: one unsteered pass decides first
            inner["on"] = True
            try:
                h = backbone.forward_layers(ids, mask, [c])[c]
            finally:
                inner["on"] = False
            decide(h, mask, ids)
        return None

    def gate_hook(_module, _inputs, output):
        if inner["on"] or state.current is not None or mask_now["mask"] is None:
            return None
        decide(_hidden(output), mask_now["mask"], mask_now["ids"])
        return None

    def steer_hook(_module, _inputs, output):
        if inner["on"] or state.current is None or not bool(state.current.any()):
            return None
        h = _hidden(output)
        g = state.current.to(h.device).reshape(-1, *([1] * (h.ndim - 1)))
        if g.shape[0] != h.shape[0]:
            raise SafesteerError(f"gate decided {g.shape[0]} rows but the pass has {h.shape[0]}")
        return _replace(output, only.select(torch.where(g, edit(h), h), h))

    only = PromptOnly(backbone, intervention.where)
    handles = [body(backbone).register_forward_pre_hook(pre, with_kwargs=True)]
    if fixed is None and c <= L:
        handles.append(backbone.layers[c].register_forward_hook(gate_hook, prepend=True))
    handles.append(backbone.layers[L].register_forward_hook(steer_hook))
    backbone._steer_depth += 1
    backbone._steer_layers.append(L)
    try:
        with only:
            yield state
    finally:
        for hd in handles:
            hd.remove()
        backbone._steer_depth -= 1
        backbone._steer_layers.remove(L)
