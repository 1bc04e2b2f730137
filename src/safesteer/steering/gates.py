"""Gate kinds: what a :class:`~safesteer.steering.condition.Condition` computes from its features.

A kind is one :class:`GateKind` subclass plus one registration::

    @register_gate
    class MyGate(GateKind):
        name = "mine"

        @classmethod
        def fit(cls, H, y, weight, seed, options, *, held_out=None, jobs=None) -> Fitted: ...
        def score(self, H): ...                    # float64 rows × d → float64 logits
        def torch_scorer(self, device=None): ...   # the same on torch tensors (the in-pass gate)
        def tensors(self): ...                     # parameters for safetensors
        @classmethod
        def from_tensors(cls, tensors, config): ...

Built in: ``linear`` (the standardised logistic probe, ``w·h + b``), ``mlp`` (an average of
seeded one-hidden-layer ReLU MLPs, ``w·relu(W1 h + b1) + b``; standardisation folded in) and
``stacked`` (several layers of the same pass, their pooled vectors concatenated in layer order,
then a linear or MLP gate on top). The features of a gate reading layers ``(l1, l2, …)`` are
:func:`stack_features` of the pooled vectors of those layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError

GATE_KINDS: dict[str, type["GateKind"]] = {}
"""Registered gate kinds by name (:func:`register_gate`)."""


@dataclass
class Fitted:
    """What a kind's :meth:`GateKind.fit` returns: the gate, its settings as a trained condition's
    ``meta`` records them (``kind`` first; :meth:`GateKind.refit_options` reads them back), other
    ``meta`` entries (linear: ``probe_metrics``) and, when the fit computed it, the held-out AUROC."""

    gate: "GateKind"
    settings: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    held_out_auroc: float | None = None


class GateKind:
    """Base class of gate kinds: a scoring function of float64 features (rows × :attr:`d`)."""

    name: ClassVar[str] = ""
    reads_layers_together: ClassVar[bool] = False
    """True for a kind that reads all of its layers at once (the study fits one gate on every gate
    layer side by side instead of one gate per layer)."""
    n_layers: int = 1
    """How many layers' pooled vectors the gate reads (concatenated, :func:`stack_features`)."""

    @property
    def d(self) -> int:
        """Size of the feature vectors the gate reads."""
        raise NotImplementedError

    @classmethod
    def fit(
        cls,
        H: np.ndarray,
        y: np.ndarray,
        weight: np.ndarray | None,
        seed: int,
        options: Mapping[str, Any],
        *,
        held_out: tuple[np.ndarray, np.ndarray] | None = None,
        jobs: int | None = None,
    ) -> Fitted:
        """Fit on features ``H`` with labels ``y`` (1 = flag), per-row ``weight`` (None: all 1) on
        top of class balancing; ``options`` are the kind's settings (a kind ignores the ones it
        does not know); ``held_out`` (features, labels) may be used for metrics only."""
        raise NotImplementedError

    @classmethod
    def refit_options(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Options that refit this kind as ``settings`` (a trained condition's ``meta``) record it."""
        return dict(settings)

    def score(self, H: np.ndarray) -> np.ndarray:
        """Logits of float64 features ``H`` (rows × :attr:`d`)."""
        raise NotImplementedError

    def torch_scorer(self, device: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`score` as a float64 torch function of pooled features (batch × :attr:`d`)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, np.ndarray]:
        """The parameters, for ``condition.safetensors``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON settings saved next to the tensors (``condition.json``) and given to :meth:`from_tensors`."""
        return {}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> "GateKind":
        raise NotImplementedError

    def _cached(self, device: Any, build: Callable[[], Any]) -> Any:
        """Per-device torch weights, built once (a gate's weights are not meant to change)."""
        cache = self.__dict__.setdefault("_torch", {})
        key = str(device)
        if key not in cache:
            cache[key] = build()
        return cache[key]


def register_gate(cls: type[GateKind]) -> type[GateKind]:
    """Class decorator: make ``cls`` available by its :attr:`GateKind.name`."""
    if not cls.name:
        raise SafesteerError(f"gate kind {cls.__name__} has no name")
    GATE_KINDS[cls.name] = cls
    return cls


def gate_kind(name: str) -> type[GateKind]:
    """The registered kind called ``name``."""
    if name not in GATE_KINDS:
        raise SafesteerError(f"gate kind '{name}' unknown; valid choices: {', '.join(GATE_KINDS)}")
    return GATE_KINDS[name]


def kind_of(settings: Mapping[str, Any]) -> str:
    """The kind a trained condition's ``meta`` records (older records: ``hidden`` > 0 = mlp)."""
    return str(settings.get("kind") or ("mlp" if int(settings.get("hidden", 0) or 0) else "linear"))


def stack_features(pooled: Mapping[int, Any], layers: Sequence[int]) -> Any:
    """The features of a gate reading ``layers``: their pooled vectors side by side, in that order
    (numpy arrays or torch tensors; one layer: its vectors as they are)."""
    if len(layers) == 1:
        return pooled[layers[0]]
    parts = [pooled[l] for l in layers]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=1)
    return np.concatenate(parts, axis=1)


def _f64(x: Any, device: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=device)


@register_gate
class LinearGate(GateKind):
    """``score(h) = w·h + b``: a standardised, class-balanced ℓ2 logistic probe (C by CV among
    ``Cs`` with ``folds`` folds), the standardisation folded into ``w``, ``b``."""

    name = "linear"

    def __init__(self, w: np.ndarray, b: float):
        self.w = np.asarray(w, dtype=np.float64).reshape(-1)
        self.b = float(b)

    @property
    def d(self) -> int:
        return int(self.w.shape[0])

    @classmethod
    def fit(cls, H, y, weight, seed, options, *, held_out=None, jobs=None) -> Fitted:
        from safesteer.probes.logistic import train_probe  # pandas (probes package): serving loads gates

        H_te, y_te = held_out if held_out is not None else (None, None)
        probe = train_probe(
            H,
            y,
            H_te,
            y_te,
            balanced=True,
            seed=seed,
            Cs=list(options.get("Cs", (1e-2, 1e-1))),
            folds=int(options.get("folds", 3)),
            sample_weight=weight,
        )
        return Fitted(
            cls(np.asarray(probe.w), float(probe.b)),
            {"kind": cls.name, "hidden": 0, "C": probe.metrics["C"]},
            {"probe_metrics": dict(getattr(probe, "metrics", {}) or {})},
            probe.metrics.get("auroc") if held_out is not None else None,
        )

    @classmethod
    def refit_options(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {"Cs": [float(settings.get("C", 0.01))], "folds": 2}

    def score(self, H: np.ndarray) -> np.ndarray:
        return H @ self.w + self.b

    def torch_scorer(self, device: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        w, b = self._cached(device, lambda: _f64(self.w, device)), self.b
        return lambda pooled: pooled.double() @ w + b

    def tensors(self) -> dict[str, np.ndarray]:
        return {"w": np.ascontiguousarray(self.w), "b": np.array([self.b])}

    def config(self) -> dict[str, Any]:
        return {"hidden": 0}

    @classmethod
    def from_tensors(cls, tensors, config) -> "LinearGate":
        return cls(tensors["w"], float(tensors["b"][0]))


@register_gate
class MLPGate(GateKind):
    """``score(h) = w·relu(W1 h + b1) + b``: the average of ``members`` one-hidden-layer ReLU MLPs
    (:func:`safesteer.steering.gate_fit.fit_mlp`), their hidden units side by side."""

    name = "mlp"

    def __init__(self, w: np.ndarray, b: float, W1: np.ndarray, b1: np.ndarray):
        self.w = np.asarray(w, dtype=np.float64).reshape(-1)
        self.b = float(b)
        self.W1 = np.asarray(W1, dtype=np.float64)
        self.b1 = np.asarray(b1, dtype=np.float64).reshape(-1)
        k = self.w.shape[0]
        if self.W1.ndim != 2 or self.W1.shape[0] != k or self.b1.shape[0] != k:
            raise SafesteerError(
                f"MLP gate shapes disagree: W1 {self.W1.shape}, b1 {self.b1.shape}, w {self.w.shape}; "
                "need W1 (k × d), b1 (k), w (k)"
            )

    @property
    def d(self) -> int:
        return int(self.W1.shape[1])

    @classmethod
    def fit(cls, H, y, weight, seed, options, *, held_out=None, jobs=None) -> Fitted:
        from safesteer.steering.gate_fit import fit_mlp  # scikit-learn: only when an MLP gate is fit

        hidden = int(options.get("hidden", 128) or 128)
        members, alpha = int(options.get("members", 5)), float(options.get("mlp_alpha", 1.0))
        w, b, W1, b1 = fit_mlp(H, y, hidden, members, alpha, seed, weight, jobs=jobs)
        settings = {"kind": cls.name, "hidden": hidden, "members": members, "mlp_alpha": alpha}
        return Fitted(cls(w, b, W1, b1), settings)

    def score(self, H: np.ndarray) -> np.ndarray:
        return np.maximum(H @ self.W1.T + self.b1, 0.0) @ self.w + self.b

    def torch_scorer(self, device: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        w, W1T, b1 = self._cached(
            device, lambda: (_f64(self.w, device), _f64(self.W1.T.copy(), device), _f64(self.b1, device))
        )
        b = self.b
        return lambda pooled: torch.relu(pooled.double() @ W1T + b1) @ w + b

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "w": np.ascontiguousarray(self.w),
            "b": np.array([self.b]),
            "W1": np.ascontiguousarray(self.W1),
            "b1": np.ascontiguousarray(self.b1),
        }

    def config(self) -> dict[str, Any]:
        return {"hidden": int(self.W1.shape[0])}

    @classmethod
    def from_tensors(cls, tensors, config) -> "MLPGate":
        return cls(tensors["w"], float(tensors["b"][0]), tensors["W1"], tensors["b1"])


@register_gate
class StackedGate(GateKind):
    """Several layers read in the same pass: the pooled vectors of ``n_layers`` layers concatenated
    (:func:`stack_features`), scored by an ``inner`` gate (``linear`` or ``mlp``) on top. Fit
    options: ``n_layers`` (or ``layers``), ``inner`` (default linear) and the inner kind's options."""

    name = "stacked"
    reads_layers_together = True

    def __init__(self, inner: GateKind, n_layers: int):
        if isinstance(inner, StackedGate) or n_layers < 1 or inner.d % n_layers:
            raise SafesteerError(
                f"a stacked gate needs a non-stacked inner gate whose size ({inner.d}) splits into "
                f"{n_layers} equal layers"
            )
        self.inner, self.n_layers = inner, int(n_layers)

    @property
    def d(self) -> int:
        return self.inner.d

    @classmethod
    def fit(cls, H, y, weight, seed, options, *, held_out=None, jobs=None) -> Fitted:
        n = int(options.get("n_layers") or len(options.get("layers") or ()) or 0)
        inner_cls = gate_kind(str(options.get("inner", "linear")))
        fitted = inner_cls.fit(H, y, weight, seed, options, held_out=held_out, jobs=jobs)
        inner_settings = {k: v for k, v in fitted.settings.items() if k != "kind"}
        settings = {"kind": cls.name, "inner": inner_cls.name, "n_layers": n, **inner_settings}
        return Fitted(cls(fitted.gate, n), settings, fitted.meta, fitted.held_out_auroc)

    @classmethod
    def refit_options(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        inner = gate_kind(str(settings.get("inner", "linear")))
        return {"inner": inner.name, "n_layers": settings.get("n_layers"), **inner.refit_options(settings)}

    def score(self, H: np.ndarray) -> np.ndarray:
        return self.inner.score(H)

    def torch_scorer(self, device: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.inner.torch_scorer(device)

    def tensors(self) -> dict[str, np.ndarray]:
        return self.inner.tensors()

    def config(self) -> dict[str, Any]:
        return {"inner": self.inner.name, "n_layers": self.n_layers, "inner_config": self.inner.config()}

    @classmethod
    def from_tensors(cls, tensors, config) -> "StackedGate":
        inner = gate_kind(str(config["inner"])).from_tensors(tensors, config.get("inner_config", {}))
        return cls(inner, int(config["n_layers"]))
