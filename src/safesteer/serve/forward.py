"""The chunked, steered forward pass behind every compute endpoint (the model worker runs it).

:func:`run_chunks` is the one chunk → condition → steer loop: per chunk of at most
``max_batch_texts`` texts the condition probe (if the plan has one) reads the *unsteered* pooled
vectors and picks the rows to steer (:func:`condition_rows`), and :func:`steering` installs the
plan's edit on those rows, on all of them, or on none while the endpoint computes its outputs.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from safesteer.serve.plan import Plan
from safesteer.steering.condition import conditional
from safesteer.steering.gates import stack_features
from safesteer.steering.segments import expand, segment_max
from safesteer.steering.strategies import Intervention

if TYPE_CHECKING:  # annotation only: engine imports this module
    from safesteer.serve.engine import CompiledPolicy


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of at most ``size`` of ``n`` items."""
    for s in range(0, n, size):
        yield s, min(n, s + size)


def probe_layers(served: Any) -> tuple[int, ...]:
    """The layers a served probe (:class:`~safesteer.serve.engine.ServedProbe`) reads, in the order
    its features stack: the probe's ``layers`` (a stacked gate), else its one ``layer``."""
    return tuple(getattr(served.probe, "layers", None) or (served.layer,))


def condition_rows(
    backbone: Any, cp: CompiledPolicy, texts: Sequence[str], extra_layers: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """(P(condition), rows to steer, unsteered mean-pooled vectors at ``extra_layers`` (+ the condition's when
    it reads ``mean``))."""
    assert cp.condition is not None
    c = cp.condition
    layers = probe_layers(c)  # a stacked gate reads several layers of the same pass
    if cp.position == "mean":
        H0 = backbone.pooled(list(texts), sorted({*layers, *extra_layers}), batch_size=max(1, len(texts)))
        Hc = stack_features(H0, layers)
    else:
        H0 = (
            backbone.pooled(list(texts), sorted(set(extra_layers)), batch_size=max(1, len(texts)))
            if extra_layers
            else {}
        )
        Hp = backbone.pooled(list(texts), sorted(layers), batch_size=max(1, len(texts)), position=cp.position)
        Hc = stack_features(Hp, layers)
    p = np.asarray(c.probe.predict_proba(Hc), dtype=np.float64)
    logit = (
        np.asarray(c.probe.decision_function(Hc), dtype=np.float64) if cp.score_threshold is not None else p
    )
    if cp.segments:  # each text's pieces read alone; its score is the largest (steering.segments)
        flat, owner = expand(texts)
        if flat:
            Hf = backbone.pooled(flat, sorted(layers), batch_size=min(len(flat), 64), position=cp.position)
            Hf = stack_features(Hf, layers)
            p = segment_max(p, np.asarray(c.probe.predict_proba(Hf), dtype=np.float64), owner)
            if cp.score_threshold is not None:
                logit = segment_max(logit, np.asarray(c.probe.decision_function(Hf), dtype=np.float64), owner)
    rows = logit > cp.score_threshold if cp.score_threshold is not None else p > cp.threshold
    return p, rows, H0


@contextlib.contextmanager
def steering(
    backbone: Any, cp: CompiledPolicy | None, alpha: float | None, rows: np.ndarray | None
) -> Iterator[None]:
    """Install ``cp`` on the whole batch (rows None), on some rows, or not at all.

    Some rows: :func:`safesteer.steering.condition.conditional` with the gate's per-row
    decisions (the evaluation's conditional steering; unflagged rows bit-identical)."""
    if cp is None or (rows is not None and not rows.any()):
        yield
        return
    if rows is None or rows.all():
        with backbone.steer(cp.layer, edit=cp.edit(alpha or 0.0), where=cp.where):
            yield
        return
    with conditional(
        backbone,
        cp.gate(),
        Intervention("policy", layer=cp.layer, edit=cp.edit(alpha or 0.0), where=cp.where),
        flags=rows,
    ):
        yield


def run_chunks(
    backbone: Any,
    texts: Sequence[str],
    plan: Plan,
    fn: Callable[..., None],
    max_batch_texts: int,
    extra_layers: Sequence[int] = (),
) -> dict[str, Any]:
    """The one chunk → condition → steer loop behind every endpoint.

    Per chunk of at most ``max_batch_texts`` texts: the condition probe (if the plan has one)
    picks the rows to steer from the unsteered pooled vectors (also at ``extra_layers``), the
    plan's steering is installed on those rows (or on all, or none), and inside it
    ``fn(chunk, start, end, rows, H0, active)`` computes and stores the chunk's outputs
    (``rows``: bool per text or None for "all"; ``H0``: the unsteered pooled vectors, empty
    without a condition; ``active``: whether any steering is installed). Returns the common
    fields ``steered`` and (with a condition) ``condition_probability``.
    """
    cp = plan.compiled
    steered = np.zeros(len(texts), dtype=bool)
    cond_p = np.full(len(texts), np.nan)
    for s, e in chunks(len(texts), max_batch_texts):
        chunk = list(texts[s:e])
        rows = None
        H0: dict[int, np.ndarray] = {}
        if cp is not None and cp.condition is not None:
            cond_p[s:e], rows, H0 = condition_rows(backbone, cp, chunk, extra_layers)
        active = cp is not None and (rows is None or bool(rows.any()))
        with steering(backbone, cp, plan.alpha, rows):
            fn(chunk, s, e, rows, H0, active)
        steered[s:e] = cp is not None if rows is None else rows
    out: dict[str, Any] = {"steered": steered.tolist()}
    if cp is not None and cp.condition is not None:
        out["condition_probability"] = json_floats(cond_p)
    return out


def json_floats(values: np.ndarray) -> list[float | None]:
    """A JSON-safe list: non-finite values (a diverging steered model) become None."""
    arr = np.asarray(values, dtype=np.float64)
    out = arr.tolist()
    if not np.isfinite(arr).all():
        out = [x if math.isfinite(x) else None for x in out]
    return out
