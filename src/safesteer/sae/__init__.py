"""Gated sparse autoencoders: model, training, saving (SAELens layout) and the sparse latent store.

>>> from safesteer.sae import GatedSAE, SAEConfig, load_sae, save_sae
>>> sae = load_sae("runs/x/sae")          # cfg.json + sae_weights.safetensors
>>> f = sae.encode(x); x_hat = sae.decode(f)  # sae.W_dec: (d_sae x d_in) unit-norm atom directions
"""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "TrainerState": "safesteer.sae.checkpoint",
    "SAEConfig": "safesteer.sae.config",
    "TrainConfig": "safesteer.sae.config",
    "GatedForward": "safesteer.sae.gated",
    "GatedSAE": "safesteer.sae.gated",
    "gated_forward": "safesteer.sae.gated",
    "loss_and_grads": "safesteer.sae.gated",
    "reference_loss": "safesteer.sae.gated",
    "ConstrainedAdam": "safesteer.sae.optim",
    "fold_scale": "safesteer.sae.saving",
    "load_sae": "safesteer.sae.saving",
    "save_sae": "safesteer.sae.saving",
    "Trainer": "safesteer.sae.trainer",
    "TrainResult": "safesteer.sae.trainer",
    "array_batches": "safesteer.sae.trainer",
    "train_sae": "safesteer.sae.trainer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
