"""Supervised linear probes on sentence activations (ℓ2 logistic regression + DiffMean).

>>> from safesteer.probes import train_probe, load_probe, diffmean_direction
>>> probe = train_probe(H_train, y_train, H_test, y_test, balanced=True)
>>> probe.metrics["auroc"], probe.direction  # held-out AUROC, unit raw-space direction

Label specs (which rows are positive/negative for ``toxicity``, ``harmfulness``, each emotion,
identity groups…) live in :mod:`safesteer.probes.labels`.
"""

from safesteer.probes.labels import LabelSpec, get_spec, spec_names
from safesteer.probes.logistic import DEFAULT_CS, Probe, diffmean_direction, evaluate, load_probe, train_probe

__all__ = [
    "DEFAULT_CS",
    "LabelSpec",
    "Probe",
    "diffmean_direction",
    "evaluate",
    "get_spec",
    "load_probe",
    "spec_names",
    "train_probe",
]
