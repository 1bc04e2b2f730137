"""SAELens interoperability: SAEs saved by SAELens load into safesteer, and ours load in SAELens.

**Out.** :func:`safesteer.sae.save_sae` already writes SAELens 6's disk layout (``cfg.json`` +
``sae_weights.safetensors``, ``architecture="gated"``, ``metadata.sae_lens_version``,
``model_name``, ``hook_name``); ``sae_lens.SAE.load_from_disk`` opens it and its ``encode`` /
``decode`` equal ours (the training scale is folded into the biases, so
``normalize_activations="none"``).

**In.** :func:`safesteer.sae.saving.from_saelens` reads a SAELens folder (``gated`` or ``standard``)
into a :class:`~safesteer.sae.GatedSAE` (and :func:`safesteer.sae.load_sae` calls it when a folder
needs converting): our disk format *is* SAELens', so reading and writing it lives in
:mod:`safesteer.sae.saving`. :func:`import_saelens` (``safesteer import saelens``) writes the
converted SAE as a safesteer folder.

**The article variant.** At inference it is SAELens' ``gated`` function with ``r_mag = 0``; its
training objective (L1 on the magnitudes) has no SAELens architecture. The saved ``cfg.json``
says so (``metadata.training_objective``), and :func:`saelens_training_config` — the config a
user would hand SAELens to continue training — refuses it with one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safesteer.errors import SafesteerError
from safesteer.sae.config import SAEConfig
from safesteer.sae.saving import from_saelens, save_sae


def import_saelens(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a SAELens folder into a safesteer SAE folder (``safesteer encode --sae OUT`` …)."""
    return save_sae(from_saelens(folder), out)


def saelens_training_config(cfg: SAEConfig) -> dict[str, Any]:
    """The SAELens ``GatedTrainingSAEConfig`` fields to continue training this SAE in SAELens.

    Refuses the article variant: SAELens has no architecture with its objective.
    """
    if cfg.variant == "article":
        raise SafesteerError(
            "the article variant's training objective (L1 on magnitudes, r_mag = 0) has no SAELens "
            "architecture; SAELens can run it (architecture 'gated') but not continue training it — "
            "use safesteer"
        )
    return {
        "architecture": "gated",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "l1_coefficient": cfg.l1_coefficient if cfg.l1_coefficient is not None else 1.0,
    }


__all__ = ["import_saelens", "saelens_training_config"]
