"""SAE-space atom clamping: lower chosen atoms' codes and leave everything else unchanged.

For an activation ``x`` and an SAE (``encode``/``decode``):

    f  = encode(x)
    f' = f with the chosen atoms lowered        (mode below)
    x' = decode(f') + (x − decode(f))           (the SAE's reconstruction error is added back)

so the only change to ``x`` is the decoded effect of the edited codes. It is computed as
``x + (decode(f') − decode(f))``, which is the same quantity and is bit-exactly ``x`` when no code
changes (λ = 0). Modes:

``subtract`` (default)  f'_a = max(f_a − λ, floor)  (``floor`` = 0 keeps codes non-negative; None = no floor)
``scale``               f'_a = (1 − λ) · f_a        (λ = 1 zeroes the atom, λ > 1 flips it)
``zero``                f'_a = 0                    (λ ignored)

:class:`ClampEdit` is a callable ``h (… × d) → h'`` for ``Backbone.steer(layer, edit=...)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError

MODES = ("subtract", "scale", "zero")


def _to_tensor(x: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device)
    return torch.as_tensor(np.asarray(x), device=like.device)


class ClampEdit:
    """Callable SAE-space edit of a block output; see the module docstring for the formula."""

    def __init__(
        self,
        sae: Any,
        atoms: Sequence[int],
        lam: float = 0.0,
        mode: str = "subtract",
        floor: float | None = 0.0,
    ):
        if mode not in MODES:
            raise SafesteerError(f"unknown clamp mode '{mode}'; valid choices: {', '.join(MODES)}")
        if not hasattr(sae, "encode") or not hasattr(sae, "decode"):
            raise SafesteerError("clamping needs an SAE with encode() and decode()")
        self.sae = sae
        self.atoms = [int(a) for a in atoms]
        if not self.atoms:
            raise SafesteerError("no atoms to clamp; pass at least one atom index")
        self.lam = float(lam)
        self.mode = mode
        self.floor = floor

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        f = _to_tensor(self.sae.encode(x), x)
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise SafesteerError(f"SAE encode returned shape {tuple(f.shape)} for {x.shape[0]} rows")
        if max(self.atoms) >= f.shape[1] or min(self.atoms) < 0:
            raise SafesteerError(f"atom index out of range 0..{f.shape[1] - 1} for this SAE")
        return f

    def _decode(self, f: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _to_tensor(self.sae.decode(f), like).to(like.dtype)

    def edit_codes(self, f: torch.Tensor) -> torch.Tensor:
        """``f'``: a copy of the codes with only the chosen atoms lowered."""
        new = f.clone()
        idx = torch.as_tensor(self.atoms, device=f.device, dtype=torch.long)
        sel = new[:, idx]
        if self.mode == "zero":
            sel = torch.zeros_like(sel)
        elif self.mode == "scale":
            sel = sel * (1.0 - self.lam)
        else:
            sel = sel - self.lam
            if self.floor is not None:
                # never raise a code: the floor applies only where lowering crossed it
                sel = torch.where(
                    sel < self.floor, torch.minimum(f[:, idx], torch.full_like(sel, self.floor)), sel
                )
        new[:, idx] = sel
        return new

    def codes(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, f') for the rows of ``h`` (flattened to rows × d) — for inspection and tests."""
        x = h.reshape(-1, h.shape[-1])
        f = self._encode(x)
        return f, self.edit_codes(f)

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        f = self._encode(x)
        f_new = self.edit_codes(f)
        if torch.equal(f_new, f):
            return h
        delta = self._decode(f_new, x) - self._decode(f, x)
        return (x + delta).reshape(shape)
