"""SAELens interoperability: SAEs saved by SAELens load into safesteer, and ours load in SAELens.

**Out.** :func:`safesteer.sae.save_sae` already writes SAELens 6's disk layout (``cfg.json`` +
``sae_weights.safetensors``, ``architecture="gated"``, ``metadata.sae_lens_version``,
``model_name``, ``hook_name``); ``sae_lens.SAE.load_from_disk`` opens it and its ``encode`` /
``decode`` equal ours (the training scale is folded into the biases, so
``normalize_activations="none"``).

**In.** :func:`from_saelens` reads a SAELens folder into a :class:`~safesteer.sae.GatedSAE`:

* ``gated`` — the same parameters; with ``apply_b_dec_to_input=false`` the input bias is folded
  into the gate/magnitude biases (``b_gate += b_dec W_enc``, ``b_mag += exp(r_mag) * (b_dec W_enc)``).
* ``standard`` (ReLU) — ``ReLU(x~ W_enc + b_enc)`` is exactly the gated function with
  ``r_mag = 0`` and ``b_gate = b_mag = b_enc`` (gate open iff the ReLU is positive).
* decoder rows that are not unit norm are normalised by :func:`safesteer.sae.load_sae`, their
  norms folded into the encoder (the same function, latents in units of unit atoms).
* anything else (top-k, JumpReLU, run-time ``layer_norm`` / ``constant_norm_rescale``
  normalisation, ``hook_z`` reshaping) is refused with one line: it is not a gated function of
  the raw activations.

The layer comes from ``metadata.hook_name`` (``blocks.N.hook_resid_post`` = safesteer layer ``N``;
``blocks.N.hook_resid_pre`` = layer ``N - 1``; ``model.layers.N`` / ``transformer.h.N`` = the
output of block ``N``) and is stored as ``metadata.hook_layer``, which the service and the CLI read.

**The article variant.** At inference it is SAELens' ``gated`` function with ``r_mag = 0``; its
training objective (L1 on the magnitudes) has no SAELens architecture. The saved ``cfg.json``
says so (``metadata.training_objective``), and :func:`saelens_training_config` — the config a
user would hand SAELens to continue training — refuses it with one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from safesteer.errors import SafesteerError
from safesteer.io import read_json
from safesteer.sae.config import SAEConfig
from safesteer.sae.gated import PARAM_NAMES, GatedSAE
from safesteer.sae.saving import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, save_sae

SUPPORTED_ARCHITECTURES = ("gated", "standard")
_HOOKS = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),
    (
        re.compile(
            r"^(?:model\.layers|transformer\.h|gpt_neox\.layers|model\.decoder\.layers|layers)\.(\d+)$"
        ),
        0,
    ),
)


def layer_from_hook(hook_name: str | None) -> int | None:
    """safesteer's layer (output of block L) for a SAELens hook name; None when it is not a residual-stream hook."""
    if not hook_name:
        return None
    for pattern, shift in _HOOKS:
        m = pattern.match(hook_name)
        if m:
            layer = int(m.group(1)) + shift
            return layer if layer >= 0 else None
    return None


def needs_conversion(raw: dict[str, Any]) -> bool:
    """True when a ``cfg.json`` is not directly safesteer's gated layout (standard SAE, no b_dec on input…)."""
    return raw.get("architecture", "gated") != "gated" or raw.get("apply_b_dec_to_input", True) is False


def _check_cfg(raw: dict[str, Any], where: Path) -> str:
    arch = raw.get("architecture", "standard")  # SAELens < 6 configs without one are standard SAEs
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SafesteerError(
            f"{where} is a SAELens {arch!r} SAE; safesteer reads 'gated' and 'standard' (ReLU) SAEs only"
        )
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise SafesteerError(
            f"{where} asks for normalize_activations={norm!r}; fold it into the weights in SAELens first "
            "(e.g. fold_activation_norm_scaling_factor) and save again"
        )
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise SafesteerError(
            f"{where} reshapes activations ({raw['reshape_activations']!r}); only residual-stream SAEs are supported"
        )
    return arch


def from_saelens(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GatedSAE:
    """Load a SAELens-saved SAE folder (gated or standard) as a safesteer :class:`GatedSAE`."""
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise SafesteerError(
            f"{folder} is not a SAELens SAE folder (needs {CFG_FILENAME} and {WEIGHTS_FILENAME})"
        )
    raw = read_json(cfg_path)
    if not isinstance(raw, dict) or "d_in" not in raw or "d_sae" not in raw:
        raise SafesteerError(f"{cfg_path} is not an SAE config (no d_in/d_sae)")
    arch = _check_cfg(raw, folder)
    meta = dict(raw.get("metadata") or {})
    for key in ("model_name", "hook_name"):  # SAELens < 6 kept these at the top level
        if raw.get(key) is not None:
            meta.setdefault(key, raw[key])
        if raw.get("hook_point") and key == "hook_name":
            meta.setdefault("hook_name", raw["hook_point"])
    if not isinstance(meta.get("hook_layer"), int):
        layer = layer_from_hook(meta.get("hook_name"))
        if layer is not None:
            meta["hook_layer"] = layer
    if not needs_conversion(raw):
        return load_sae(folder, device=device)
    try:
        t = {k: v.float() for k, v in load_file(str(w_path)).items()}
    except Exception as exc:  # safetensors raises its own error types
        raise SafesteerError(f"{w_path} cannot be read ({exc}); the file is corrupted") from exc
    d, s = int(raw["d_in"]), int(raw["d_sae"])
    need = ("W_enc", "W_dec", "b_dec") + (("b_enc",) if arch == "standard" else ("b_gate", "b_mag", "r_mag"))
    for name in need:
        if name not in t:
            raise SafesteerError(f"{w_path} lacks the tensor {name!r}; it is not a SAELens {arch} SAE")
    if tuple(t["W_enc"].shape) != (d, s) or tuple(t["W_dec"].shape) != (s, d):
        raise SafesteerError(
            f"{w_path}: W_enc {tuple(t['W_enc'].shape)} / W_dec {tuple(t['W_dec'].shape)} do not match "
            f"d_in={d}, d_sae={s} (expected ({d}, {s}) and ({s}, {d}))"
        )
    p = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if arch == "standard":
        p.update(b_gate=t["b_enc"].clone(), b_mag=t["b_enc"].clone(), r_mag=torch.zeros(s))
    else:
        p.update(b_gate=t["b_gate"], b_mag=t["b_mag"], r_mag=t["r_mag"])
    if raw.get("apply_b_dec_to_input", True) is False:
        # SAELens computes x W_enc + b; safesteer (x - b_dec) W_enc + b': b' = b + b_dec W_enc (times exp(r_mag) on the magnitude path)
        shift = t["b_dec"] @ t["W_enc"]
        p["b_gate"] = p["b_gate"] + shift
        p["b_mag"] = p["b_mag"] + torch.exp(p["r_mag"]) * shift
    meta["saelens_architecture"] = arch
    cfg = SAEConfig(d_in=d, d_sae=s, variant="paper", metadata=meta)
    sae = GatedSAE(cfg, seed=0)
    with torch.no_grad():
        for name in PARAM_NAMES:
            getattr(sae, name).copy_(p[name])
        n = sae.W_dec.norm(dim=1).clamp_min(1e-12)
        if not torch.allclose(n, torch.ones_like(n), atol=1e-4):
            sae.W_dec /= n[:, None]
            sae.W_enc *= n[None, :]
            sae.b_gate *= n
            sae.b_mag *= n
    return sae.to(device)


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
            "architecture; SAELens can run it (architecture 'gated') but not continue training it — use safesteer"
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


__all__ = ["from_saelens", "import_saelens", "layer_from_hook", "needs_conversion", "saelens_training_config"]
