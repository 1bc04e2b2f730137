"""Supervised linear probes on sentence activations (ℓ2 logistic regression + DiffMean).

>>> from safesteer.probes import train_probe, load_probe, diffmean_direction
>>> probe = train_probe(H_train, y_train, H_test, y_test, balanced=True)
>>> probe.metrics["auroc"], probe.direction  # held-out AUROC, unit raw-space direction

Label specs (which rows are positive/negative for ``toxicity``, ``harmfulness``, each emotion,
identity groups…) live in :mod:`safesteer.probes.labels`.
"""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "LabelSpec": "safesteer.probes.labels",
    "get_spec": "safesteer.probes.labels",
    "spec_names": "safesteer.probes.labels",
    "DEFAULT_CS": "safesteer.probes.logistic",
    "Probe": "safesteer.probes.logistic",
    "diffmean_direction": "safesteer.probes.logistic",
    "evaluate": "safesteer.probes.logistic",
    "load_probe": "safesteer.probes.logistic",
    "train_probe": "safesteer.probes.logistic",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
