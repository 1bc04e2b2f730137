"""Efficacy ΔP: how much steering lowers a probe's toxicity / harm probability on unsafe texts.

For each text the probe reads the mean-pooled activation at *its* layer, computed with the
intervention installed (so for a masked LM steered at the last layer, the probe reads the steered
pooled vector; a probe below the steering layer sees no change). ΔP is the paired difference
``P(steered) − P(unsteered)`` per text; negative = safer.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.steering.strategies import Intervention


def probe_layer(probe: Any, default: int) -> int:
    """The layer a probe was trained on (``probe.meta['layer']``), else ``default``."""
    meta = getattr(probe, "meta", None) or {}
    layer = meta.get("layer", default)
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise SafesteerError(f"probe metadata has a non-integer layer {layer!r}") from None


def probe_probabilities(
    backbone: Any,
    texts: Sequence[str],
    probe: Any,
    layer: int,
    intervention: Intervention | None = None,
    batch_size: int = 16,
    max_length: int | None = 256,
) -> np.ndarray:
    """``probe.predict_proba`` of each text's pooled layer-``layer`` vector under ``intervention``."""
    if not texts:
        return np.zeros(0)
    iv = intervention or Intervention.none()
    with iv.apply(backbone):
        H = backbone.pooled(list(texts), [layer], batch_size=batch_size, max_length=max_length)[layer]
    return np.asarray(probe.predict_proba(H), dtype=np.float64)


def efficacy(
    backbone: Any,
    texts: Sequence[str],
    probe: Any,
    layer: int,
    intervention: Intervention,
    baseline: np.ndarray | None = None,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """Per-text probe probabilities unsteered (``baseline``, computed if absent) and steered, and ΔP."""
    base = (
        probe_probabilities(backbone, texts, probe, layer, None, batch_size)
        if baseline is None
        else np.asarray(baseline)
    )
    steered = probe_probabilities(backbone, texts, probe, layer, intervention, batch_size)
    return {"baseline": base, "steered": steered, "delta": steered - base}
