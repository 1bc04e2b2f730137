"""What the service reads off a loaded SAE object: its sizes and the layer it was trained on."""

from __future__ import annotations

from typing import Any


def sae_dims(sae: Any) -> tuple[int | None, int | None]:
    """(d_in, d_sae) of an SAE object when it tells."""
    cfg = getattr(sae, "cfg", None)
    if cfg is not None and hasattr(cfg, "d_in"):
        return int(cfg.d_in), int(cfg.d_sae)
    W = getattr(sae, "W_dec", None)
    if W is not None and hasattr(W, "shape") and len(W.shape) == 2:
        return int(W.shape[1]), int(W.shape[0])
    return None, None


def sae_layer_of(sae: Any) -> int | None:
    """The layer an SAE was trained on, when its config records one."""
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None) or {}
    for key in ("hook_layer", "layer"):
        v = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(v, int):
            return v
    return None
