"""Save/load SAEs in the SAELens disk layout: ``cfg.json`` + ``sae_weights.safetensors``.

Keys (SAELens ``architecture="gated"``): ``W_enc`` (d_in x d_sae), ``b_gate``, ``r_mag``, ``b_mag``
(d_sae), ``W_dec`` (d_sae x d_in, unit rows), ``b_dec`` (d_in). ``cfg.json`` has
``normalize_activations="none"`` and ``apply_b_dec_to_input=true``, so SAELens/SAEBench load it
as a plain gated SAE. The article variant is saved with the same keys (its ``r_mag`` is 0) and
``"variant": "article"``.

**Scale folding.** Training runs on ``x_s = c x`` (``c`` makes E|x_s|^2 = 1). The saved SAE works on
raw ``x`` and keeps every decoder row at unit norm: with ``b_dec' = b_dec / c``,
``b_gate' = b_gate / c`` and ``b_mag' = b_mag / c`` (``W_enc``, ``r_mag``, ``W_dec`` unchanged),

    pi_gate' = pi_gate / c (same sign, same gate),  f' = f / c,  x^' = f' W_dec + b_dec' = x^_s / c.

So the latent values are in raw activation units: ``f'_j`` is the coefficient of the unit atom
``W_dec[j]`` in raw space. (SAELens' own folding instead rescales ``W_enc``/``W_dec``, which would
break the unit-norm rows that downstream steering relies on.) ``c`` is recorded as
``scaling_factor`` for information only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, sha256_file, write_json, canonical_safetensors
from safesteer.sae.config import SAEConfig
from safesteer.sae.gated import PARAM_NAMES, GatedSAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


def fold_scale(params: dict[str, torch.Tensor], c: float) -> dict[str, torch.Tensor]:
    """Parameters trained on ``c * x`` -> parameters for raw ``x`` (see module docstring)."""
    out = {k: v.detach().clone() for k, v in params.items()}
    for k in ("b_dec", "b_gate", "b_mag"):
        out[k] = out[k] / c
    return out


def save_sae(sae: GatedSAE, folder: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` atomically; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(sae, n).detach().to("cpu", torch.float32).contiguous() for n in PARAM_NAMES}
    with atomic_path(folder / WEIGHTS_FILENAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": "gated", "variant": sae.cfg.variant})
        canonical_safetensors(tmp)  # metadata key order is random per process otherwise
    cfg = sae.cfg.to_dict()
    cfg["weights_sha256"] = sha256_file(folder / WEIGHTS_FILENAME)
    if extra:
        cfg.setdefault("metadata", {}).update(extra)
    write_json(folder / CFG_FILENAME, cfg)
    return folder


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GatedSAE:
    """Load an SAE saved by :func:`save_sae` (or a SAELens gated SAE with the same keys).

    Decoder rows that are not unit norm (e.g. a SAELens SAE trained without the constraint) are
    normalised and the norms folded into the encoder so the function is unchanged.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise SafesteerError(f"{folder} is not an SAE folder (needs {CFG_FILENAME} and {WEIGHTS_FILENAME}); run train-sae first")
    raw = read_json(cfg_path)
    if not isinstance(raw, dict):
        raise SafesteerError(f"{cfg_path} is not an SAE config")
    cfg = SAEConfig.from_dict(raw)
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types
        raise SafesteerError(f"{w_path} cannot be read ({exc}); the file is corrupted, re-run train-sae") from exc
    want_sha = raw.get("weights_sha256")
    if want_sha and want_sha != sha256_file(w_path):
        raise SafesteerError(f"{w_path} does not match the sha256 recorded in {CFG_FILENAME}; the file is corrupted")
    d, s = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d, s), "b_gate": (s,), "r_mag": (s,), "b_mag": (s,), "W_dec": (s, d), "b_dec": (d,)}
    if "r_mag" not in tensors:
        tensors["r_mag"] = torch.zeros(s)
    for name, shape in shapes.items():
        if name not in tensors:
            raise SafesteerError(f"{w_path} lacks the tensor {name!r}; it is not a gated SAE")
        if tuple(tensors[name].shape) != shape:
            raise SafesteerError(f"{w_path}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}")
    sae = GatedSAE(cfg, seed=0)
    with torch.no_grad():
        for name in PARAM_NAMES:
            getattr(sae, name).copy_(tensors[name].float())
        norms = sae.W_dec.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            n = norms.clamp_min(1e-12)
            sae.W_dec /= n[:, None]
            sae.W_enc *= n[None, :]
            sae.b_gate *= n
            sae.b_mag *= n
    sae.source_sha256 = raw.get("weights_sha256") or sha256_file(w_path)  # type: ignore[attr-defined]
    return sae.to(device)


def sae_fingerprint(sae: GatedSAE) -> str:
    """sha256 of the weights file the SAE came from, else of its tensors' bytes."""
    known = getattr(sae, "source_sha256", None)
    if known:
        return str(known)
    h = hashlib.sha256()
    for n in PARAM_NAMES:
        h.update(n.encode())
        h.update(getattr(sae, n).detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()
