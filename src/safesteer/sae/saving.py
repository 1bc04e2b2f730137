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
``metadata.training_scaling_factor`` for information only: it is already folded in, and
``normalize_activations`` is ``"none"``, so SAELens' ``encode``/``decode`` on raw activations give
exactly safesteer's numbers.

**SAELens 6 metadata** (:func:`saelens_metadata`): ``sae_lens_version`` (the config format, so
SAELens skips its pre-6.0 conversion), ``model_name``, ``hook_name`` and ``hook_layer``. safesteer's
layer ``L`` is the output of transformer block ``L`` (0-based) = Hugging Face
``hidden_states[L + 1]`` = TransformerLens ``blocks.{L}.hook_resid_post``; that is the hook name
written. The SAEs are trained on *mean-pooled* block outputs (one vector per text), recorded as
``metadata.activations``. The article variant is the same inference function as SAELens'
``gated`` architecture with ``r_mag = 0``; its training objective has no SAELens architecture,
which ``metadata.training_objective`` says (see :mod:`safesteer.interop.saelens`).

**Reading SAELens folders** (:func:`from_saelens`, called by :func:`load_sae` when needed):

* ``gated`` — the same parameters; with ``apply_b_dec_to_input=false`` the input bias is folded
  into the gate/magnitude biases (``b_gate += b_dec W_enc``, ``b_mag += exp(r_mag) * (b_dec W_enc)``).
* ``standard`` (ReLU) — ``ReLU(x~ W_enc + b_enc)`` is exactly the gated function with
  ``r_mag = 0`` and ``b_gate = b_mag = b_enc`` (gate open iff the ReLU is positive).
* decoder rows that are not unit norm are normalised, their norms folded into the encoder (the
  same function, latents in units of unit atoms).
* anything else (top-k, JumpReLU, run-time ``layer_norm`` / ``constant_norm_rescale``
  normalisation, ``hook_z`` reshaping) is refused with one line: it is not a gated function of
  the raw activations.

The layer comes from ``metadata.hook_name`` (``blocks.N.hook_resid_post`` = safesteer layer ``N``;
``blocks.N.hook_resid_pre`` = layer ``N - 1``; ``model.layers.N`` / ``transformer.h.N`` = the
output of block ``N``; :func:`layer_from_hook`) and is stored as ``metadata.hook_layer``, which the
service and the CLI read.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, canonical_safetensors, read_json, sha256_file, write_json
from safesteer.sae.config import SAEConfig
from safesteer.sae.gated import PARAM_NAMES, GatedSAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens config format written (``metadata.sae_lens_version``); checked with sae-lens 6.54.12."""
LAYER_CONVENTION = (
    "layer L = output of transformer block L (0-based) = HF hidden_states[L+1] "
    "= TransformerLens blocks.L.hook_resid_post"
)
TRAINING_OBJECTIVES = {
    "paper": "gated (Rajamanoharan et al. 2024); SAELens architecture 'gated'",
    "article": (
        "article (L1 on magnitudes, r_mag fixed at 0): no SAELens architecture trains this objective; "
        "it runs in SAELens as architecture 'gated' with r_mag = 0 (the same inference function)"
    ),
}


def hook_name_for_layer(layer: int) -> str:
    """The TransformerLens/SAELens hook of safesteer's layer ``layer`` (output of block ``layer``)."""
    return f"blocks.{int(layer)}.hook_resid_post"


def saelens_metadata(cfg: SAEConfig) -> dict:
    """The ``metadata`` block of a SAELens 6 ``cfg.json`` for ``cfg`` (plus safesteer's own keys)."""
    meta = dict(cfg.metadata)
    layer = meta.get("hook_layer")
    if isinstance(layer, int) and not meta.get("hook_name"):
        meta["hook_name"] = hook_name_for_layer(layer)
    meta.setdefault("model_name", None)
    meta.setdefault("hook_name", None)
    meta.setdefault("hook_head_index", None)
    meta.setdefault("prepend_bos", True)
    meta.setdefault(
        "activations", "mean over the tokens of each text of the block output (one vector per text)"
    )
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION
    meta.setdefault("sae_lens_training_version", None)
    meta["layer_convention"] = LAYER_CONVENTION
    meta["safesteer_variant"] = cfg.variant
    meta["training_objective"] = TRAINING_OBJECTIVES[cfg.variant]
    meta["training_scaling_factor"] = float(cfg.scaling_factor)
    meta["training_scaling_note"] = (
        "already folded into the saved weights; apply nothing (normalize_activations='none')"
    )
    return meta


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
        save_file(
            tensors, str(tmp), metadata={"format": "pt", "architecture": "gated", "variant": sae.cfg.variant}
        )
        canonical_safetensors(tmp)  # metadata key order is random per process otherwise
    cfg = sae.cfg.to_dict()
    cfg["weights_sha256"] = sha256_file(folder / WEIGHTS_FILENAME)
    meta = saelens_metadata(sae.cfg)
    if extra:
        meta.update(extra)
    cfg["metadata"] = meta
    cfg["reshape_activations"] = "none"
    cfg["model_name"], cfg["hook_name"] = meta["model_name"], meta["hook_name"]
    cfg["meta"] = {k: meta.get(k) for k in ("model_name", "hook_name", "hook_layer", "dataset_path")}
    cfg.pop("scaling_factor", None)  # folded in: SAELens must not see a factor it would be tempted to apply
    write_json(folder / CFG_FILENAME, cfg)
    return folder


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GatedSAE:
    """Load an SAE saved by :func:`save_sae`, or one saved by SAELens (gated or standard; see
    :func:`from_saelens`).

    Decoder rows that are not unit norm (e.g. a SAELens SAE trained without the constraint) are
    normalised and the norms folded into the encoder so the function is unchanged.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise SafesteerError(
            f"{folder} is not an SAE folder (needs {CFG_FILENAME} and {WEIGHTS_FILENAME}); run "
            "train-sae first"
        )
    raw = read_json(cfg_path)
    if not isinstance(raw, dict):
        raise SafesteerError(f"{cfg_path} is not an SAE config")
    if needs_conversion(raw):  # a SAELens standard SAE, or one that does not subtract b_dec from its input
        return from_saelens(folder, device=device)
    raw = dict(raw)
    if "scaling_factor" not in raw:
        sf = (raw.get("metadata") or {}).get("training_scaling_factor")
        raw["scaling_factor"] = float(sf) if isinstance(sf, (int, float)) else 1.0
    cfg = SAEConfig.from_dict(raw)
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types
        raise SafesteerError(
            f"{w_path} cannot be read ({exc}); the file is corrupted, re-run train-sae"
        ) from exc
    want_sha = raw.get("weights_sha256")
    if want_sha and want_sha != sha256_file(w_path):
        raise SafesteerError(
            f"{w_path} does not match the sha256 recorded in {CFG_FILENAME}; the file is corrupted"
        )
    d, s = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d, s), "b_gate": (s,), "r_mag": (s,), "b_mag": (s,), "W_dec": (s, d), "b_dec": (d,)}
    if "r_mag" not in tensors:
        tensors["r_mag"] = torch.zeros(s)
    for name, shape in shapes.items():
        if name not in tensors:
            raise SafesteerError(f"{w_path} lacks the tensor {name!r}; it is not a gated SAE")
        if tuple(tensors[name].shape) != shape:
            raise SafesteerError(
                f"{w_path}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}"
            )
    if cfg.variant == "article" and bool(torch.any(tensors["r_mag"] != 0)):
        raise SafesteerError(
            f"{cfg_path} says variant 'article' but r_mag is not 0: the article variant cannot represent it; "
            'set "variant": "paper" (SAELens\' gated architecture)'
        )
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
    if not isinstance(sae.cfg.metadata.get("hook_layer"), int):
        layer = layer_from_hook(sae.cfg.metadata.get("hook_name") or raw.get("hook_name"))
        if layer is not None:
            sae.cfg.metadata["hook_layer"] = layer
    sae.source_sha256 = raw.get("weights_sha256") or sha256_file(w_path)  # type: ignore[attr-defined]
    return sae.to(device)


# ----------------------------------------------------------------------------- SAELens folders in
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
    """safesteer's layer (output of block L) for a SAELens hook name; None when it is not a residual-stream
    hook."""
    if not hook_name:
        return None
    for pattern, shift in _HOOKS:
        m = pattern.match(hook_name)
        if m:
            layer = int(m.group(1)) + shift
            return layer if layer >= 0 else None
    return None


def needs_conversion(raw: dict[str, Any]) -> bool:
    """True when a ``cfg.json`` is not directly safesteer's gated layout (standard SAE, no b_dec on
    input…)."""
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
            f"{where} reshapes activations ({raw['reshape_activations']!r}); only residual-stream SAEs "
            "are supported"
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
        # SAELens computes x W_enc + b; safesteer (x - b_dec) W_enc + b': b' = b + b_dec W_enc (times
        # exp(r_mag) on the magnitude path)
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
