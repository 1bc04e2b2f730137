"""Conditional steering (CAST, Lee et al. 2025): steer a prompt only when a gate flags it.

A :class:`Condition` is a gate on the residual of block ``layer`` pooled at ``position``
(``prompt_end``: the template tokens after the user turn; ``prompt``: the user message and those
tokens; ``last`` or ``mean`` also work), with a threshold on its logit. What computes the logit is
its *kind* (:mod:`safesteer.steering.gates`): linear ``w·h + b``, with one ReLU hidden layer
``w·relu(W1 h + b1) + b`` (an MLP gate, or an average of several — the same form with the hidden
units side by side; the probe's standardisation is folded into ``w`` / ``W1``), or ``stacked``:
several blocks ``layers`` of the same pass, their pooled vectors side by side.

:func:`conditional` installs gate and steering on a backbone for the duration of a ``with`` block,
so evaluation, benchmarks and the service share one implementation::

    with conditional(backbone, condition, intervention) as state:
        answers = backbone.generate(prompts)        # state.flags: which prompts were steered

* The gate is read from the **unsteered** residual of the same forward pass when every condition
  layer is ≤ the steering layer (the gate hooks run before the steering edit); otherwise a second,
  unsteered pass to the deepest condition layer decides first.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, write_json
from safesteer.models import hooks
from safesteer.models.positions import pool_prompt, prompt_end_length, user_header
from safesteer.steering.gates import GateKind, LinearGate, MLPGate, gate_kind, stack_features
from safesteer.steering.segments import expand, segment_max
from safesteer.steering.strategies import Intervention

GATE_POSITIONS = ("prompt_end", "prompt", "last", "mean")
DEFAULT_FPR = 0.05


class Condition:
    """Gate ``score(h) > threshold`` on blocks ``layers`` pooled at ``position``; the score is its
    kind's (:attr:`gate`, :mod:`safesteer.steering.gates`). Built from raw weights as before —
    ``score(h) = w·h + b``, or ``w·relu(W1 h + b1) + b`` when the hidden layer ``W1`` (k × d),
    ``b1`` (k) is given — or from any kind with :meth:`of`. ``layer`` is the single (or deepest)
    layer it reads."""

    def __init__(
        self,
        w: np.ndarray | None = None,
        b: float = 0.0,
        layer: int | None = None,
        position: str = "prompt_end",
        threshold: float = 0.0,
        name: str = "gate",
        meta: dict[str, Any] | None = None,
        W1: np.ndarray | None = None,
        b1: np.ndarray | None = None,
        *,
        gate: GateKind | None = None,
        layers: Sequence[int] | None = None,
    ):
        if gate is None:
            if w is None:
                raise SafesteerError("a condition needs its weights w (or a gate kind object)")
            if (W1 is None) != (b1 is None):
                raise SafesteerError("an MLP gate needs both hidden weights W1 and biases b1")
            gate = LinearGate(w, b) if W1 is None else MLPGate(w, b, W1, b1)
        if position not in GATE_POSITIONS:
            raise SafesteerError(
                f"gate position '{position}' unsupported; valid choices: {', '.join(GATE_POSITIONS)}"
            )
        if layers is None:
            if layer is None:
                raise SafesteerError("a condition needs the layer it reads")
            layers = (layer,)
        layers = tuple(int(l) for l in layers)
        if not layers or list(layers) != sorted(set(layers)):
            raise SafesteerError(f"gate layers {layers}: give one layer or increasing distinct layers")
        if layer is not None and int(layer) != layers[-1]:
            raise SafesteerError(f"gate layer {layer} is not the deepest of its layers {layers}")
        if len(layers) != gate.n_layers:
            raise SafesteerError(f"a {gate.name} gate reads {gate.n_layers} layer(s), got {len(layers)}")
        self.gate, self.layers = gate, layers
        self.position, self.threshold, self.name = position, float(threshold), name
        self.meta: dict[str, Any] = {} if meta is None else meta

    @classmethod
    def of(
        cls,
        gate: GateKind,
        layers: int | Sequence[int],
        position: str = "prompt_end",
        threshold: float = 0.0,
        name: str = "gate",
        meta: dict[str, Any] | None = None,
    ) -> "Condition":
        """A condition around a gate of any kind reading ``layers``."""
        layers = (layers,) if isinstance(layers, (int, np.integer)) else tuple(layers)
        return cls(None, 0.0, None, position, threshold, name, meta, gate=gate, layers=layers)

    @property
    def layer(self) -> int:
        return self.layers[-1]

    @property
    def kind(self) -> str:
        return self.gate.name

    @property
    def d(self) -> int:
        """Size of the feature vectors the gate reads (all its layers side by side)."""
        return self.gate.d

    # raw weights of the built-in kinds (None where the kind has none)
    w = property(lambda self: getattr(self.gate, "w", None))
    b = property(lambda self: getattr(self.gate, "b", None))
    W1 = property(lambda self: getattr(self.gate, "W1", None))
    b1 = property(lambda self: getattr(self.gate, "b1", None))

    def __repr__(self) -> str:
        return (
            f"Condition(kind={self.kind!r}, layers={self.layers}, position={self.position!r}, "
            f"threshold={self.threshold!r}, name={self.name!r})"
        )

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
        """Logits of feature rows ``H`` (rows × :attr:`d`; several layers: :func:`stack_features`)."""
        H = (
            H.detach().double().cpu().numpy()
            if isinstance(H, torch.Tensor)
            else np.asarray(H, dtype=np.float64)
        )
        if H.ndim != 2 or H.shape[1] != self.d:
            raise SafesteerError(f"gate expects rows × {self.d} activations, got {H.shape}")
        return self.gate.score(H)

    def torch_scorer(self, device: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`score` as a float64 torch function, its weights put on ``device`` once per device
        (the in-pass gate; a Condition's weights are not meant to change after it is built)."""
        return self.gate.torch_scorer(device)

    def flags(self, H: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.score(H) > self.threshold

    def with_threshold(self, threshold: float, **changes: Any) -> "Condition":
        """A copy with another ``threshold`` (and any other fields in ``changes``, e.g. ``position``;
        ``layer`` moves a one-layer gate, and must stay the deepest layer of a multi-layer one)."""
        unknown = set(changes) - {"position", "name", "meta", "layer", "layers"}
        if unknown:
            raise SafesteerError(f"a condition has no field(s) {', '.join(sorted(unknown))}")
        layers = changes.get("layers", self.layers)
        if "layer" in changes and len(self.layers) == 1 and "layers" not in changes:
            layers = (int(changes["layer"]),)
        return Condition(
            None,
            0.0,
            changes.get("layer"),
            changes.get("position", self.position),
            threshold,
            changes.get("name", self.name),
            dict(changes.get("meta", self.meta)),
            gate=self.gate,
            layers=layers,
        )

    # I/O (no pickle)
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "condition.safetensors") as tmp:
            save_file(self.gate.tensors(), str(tmp))
        extra = {} if len(self.layers) == 1 else {"layers": list(self.layers)}
        write_json(
            out / "condition.json",
            {
                "format": "safesteer-condition",
                "version": 1,
                "layer": self.layer,
                **extra,
                "position": self.position,
                "threshold": self.threshold,
                "name": self.name,
                "d": self.d,
                "kind": self.kind,
                **self.gate.config(),
                "meta": self.meta,
            },
        )
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Condition":
        folder = Path(path)
        folder = folder.parent if folder.name == "condition.json" else folder
        meta = read_json(folder / "condition.json")
        if not isinstance(meta, dict) or meta.get("format") != "safesteer-condition":
            raise SafesteerError(f"{folder / 'condition.json'} is not a safesteer condition")
        t = load_file(str(folder / "condition.safetensors"))
        kind = meta.get("kind") or ("mlp" if "W1" in t else "linear")
        return cls.of(
            gate_kind(kind).from_tensors(t, meta),
            meta.get("layers", [meta["layer"]]),
            meta["position"],
            meta["threshold"],
            meta.get("name", "gate"),
            meta.get("meta", {}),
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
    """Gate logits of chat-rendered ``prompts`` (unsteered; every layer the gate reads). A segmented
    gate (``meta["segments"]``) scores each prompt as the largest of its own logit and those of its
    pieces, each read alone (:mod:`safesteer.steering.segments`)."""
    texts = list(prompts)
    flat, owner = expand(texts) if is_segmented(condition) else ([], np.zeros(0, np.int64))
    H = backbone.pooled(
        texts + flat,
        list(condition.layers),
        batch_size=batch_size,
        position=condition.position,
        system=system,
    )
    s = condition.score(stack_features(H, condition.layers))
    return segment_max(s[: len(texts)], s[len(texts) :], owner)


def is_segmented(condition: Any) -> bool:
    """Whether a gate reads the pieces of a request too (:mod:`safesteer.steering.segments`); recorded
    in its ``meta`` by the study that fitted it."""
    return bool(getattr(condition, "meta", None) and condition.meta.get("segments"))


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
    must have that many rows). Yields a :class:`GateState` recording each decision. The hooks are
    :mod:`safesteer.models.hooks`' (the same steering hook as :meth:`Backbone.steer`).
    """
    if intervention.is_identity:
        raise SafesteerError("conditional steering needs an intervention with a vector or an edit")
    if flags is None and is_segmented(condition):
        raise SafesteerError(
            "a segmented gate reads the request's pieces in passes of their own, not in-pass: decide "
            "first (gate_flags) and pass flags=, as the service does"
        )
    L = backbone.check_layer(intervention.layer)
    cs = [backbone.check_layer(l) for l in condition.layers]
    prefix = backbone.hooks.prefix
    if prefix is not None and cs[0] < prefix.layer:
        raise SafesteerError(
            f"the gate reads layer {cs[0]}, below the active prefix cache's layer {prefix.layer}; "
            "leave the prefix cache off or gate at a layer >= it"
        )
    fixed = None if flags is None else torch.as_tensor(np.asarray(flags, dtype=bool))
    position = condition.position
    n_end = prompt_end_length(backbone, system) if position in ("prompt_end", "prompt") else 0
    header = user_header(backbone, system) if position == "prompt" else ()
    gate_score = condition.torch_scorer(backbone.device)
    in_pass = cs[-1] <= L
    state = GateState()
    now: dict[str, torch.Tensor | None] = {"mask": None, "ids": None}
    inner = {"on": False}
    if intervention.edit is not None:
        edit = intervention.edit
    else:
        delta = torch.as_tensor(
            intervention.alpha * intervention.vector, dtype=torch.float32, device=backbone.device
        )
        edit = lambda h: h + delta.to(h.dtype)  # noqa: E731

    def decide(hs: dict[int, torch.Tensor], mask: torch.Tensor, ids: torch.Tensor) -> None:
        pooled = {l: pool_prompt(h, mask, ids, position, n_end, header) for l, h in hs.items()}
        score = gate_score(stack_features(pooled, cs))
        g = score > condition.threshold
        state.scores.append(score.cpu().numpy())
        state.flagged.append(g.cpu().numpy())
        state.current = g

    def new_input(ids: torch.Tensor, mask: torch.Tensor) -> None:
        if inner["on"]:
            return
        now["mask"], now["ids"] = mask, ids
        state.current = None
        if fixed is not None:
            if fixed.shape[0] != ids.shape[0]:
                raise SafesteerError(f"{fixed.shape[0]} fixed gate flags for a batch of {ids.shape[0]} rows")
            state.current = fixed.to(ids.device)
            state.flagged.append(fixed.numpy())
        elif not in_pass:  # a gate layer comes after the steering layer: one unsteered pass decides first
            inner["on"] = True
            try:
                hs = backbone.forward_layers(ids, mask, cs)
            finally:
                inner["on"] = False
            decide(hs, mask, ids)

    def read(hs: dict[int, torch.Tensor]) -> None:
        if inner["on"] or state.current is not None or now["mask"] is None:
            return
        decide(hs, now["mask"], now["ids"])

    def apply(h: torch.Tensor) -> torch.Tensor | None:
        if inner["on"] or state.current is None or not bool(state.current.any()):
            return None
        g = state.current.to(h.device).reshape(-1, *([1] * (h.ndim - 1)))
        if g.shape[0] != h.shape[0]:
            raise SafesteerError(f"gate decided {g.shape[0]} rows but the pass has {h.shape[0]}")
        return torch.where(g, edit(h), h)

    with contextlib.ExitStack() as stack:
        stack.enter_context(hooks.on_new_input(backbone, new_input))
        if fixed is None and in_pass:
            stack.enter_context(hooks.read_in_pass(backbone, cs, read))
        stack.enter_context(hooks.steering(backbone, L, apply, intervention.where))
        yield state
