"""Gated sparse autoencoders: model, training, saving (SAELens layout) and the sparse latent store.

>>> from safesteer.sae import GatedSAE, SAEConfig, load_sae, save_sae
>>> sae = load_sae("runs/x/sae")          # cfg.json + sae_weights.safetensors
>>> f = sae.encode(x); x_hat = sae.decode(f)  # sae.W_dec: (d_sae x d_in) unit-norm atom directions
"""

from safesteer.sae.checkpoint import TrainerState
from safesteer.sae.config import SAEConfig, TrainConfig
from safesteer.sae.gated import GatedForward, GatedSAE, gated_forward, loss_and_grads, reference_loss
from safesteer.sae.optim import ConstrainedAdam
from safesteer.sae.saving import fold_scale, load_sae, save_sae
from safesteer.sae.trainer import Trainer, TrainResult, array_batches, train_sae

__all__ = [
    "ConstrainedAdam",
    "GatedForward",
    "GatedSAE",
    "SAEConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "array_batches",
    "fold_scale",
    "gated_forward",
    "load_sae",
    "loss_and_grads",
    "reference_loss",
    "save_sae",
    "train_sae",
]
