"""Frozen backbones: masked and causal Hugging Face language models behind one interface."""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "Backbone": "safesteer.models.backbone",
    "load_backbone": "safesteer.models.backbone",
    "ALIASES": "safesteer.models.registry",
    "resolve_model": "safesteer.models.registry",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
