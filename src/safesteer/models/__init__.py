"""Frozen backbones: masked and causal Hugging Face language models behind one interface."""

from safesteer.models.backbone import Backbone, load_backbone
from safesteer.models.registry import ALIASES, resolve_model

__all__ = ["Backbone", "load_backbone", "ALIASES", "resolve_model"]
