"""Behaviour directions: the CAA refusal vector, Arditi's refusal direction, directional ablation.

Sign (the package's one convention, see :mod:`safesteer.steering.strategies`): a stored direction
points toward the *unsafe behaviour* — here, complying — so ``h' = h − α·d`` with α ≥ 0 makes the
model refuse more, and every strategy is judged on the same α scale.

* ``refusal_caa`` (CAA, Rimsky et al. 2024; CAST's behaviour vector, Lee et al. 2025): for prompts
  p and answer prefixes a⁺ (refusal) / a⁻ (compliance), r = mean over (p, a⁺) of the residual
  averaged over a⁺'s tokens after chat(p), minus the same over (p, a⁻); stored as d = −r̂.
* ``refusal_dim`` (Arditi et al. 2024): r = μ(harmful) − μ(harmless) of the residual at the
  template tokens after the user turn (``prompt_end``); stored as d = −r̂.
* Directional ablation: h' = h − (h·r̂) r̂, at one or several layers (:func:`ablation_intervention`,
  :func:`ablate`) — an option beside addition (removing refusal is what Arditi et al. show it does).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.models.positions import chat_inputs
from safesteer.steering.strategies import Direction, Intervention, unit

REFUSAL_PREFIXES: tuple[str, ...] = (
    "I'm sorry, but I cannot help with that request.",
    "I can't assist with that. It could cause harm.",
    "I'm not able to help with this request.",
    "Sorry, I won't provide that information.",
)
"""Refusal answer prefixes (a⁺) of the CAA vector; config may replace them."""

COMPLIANCE_PREFIXES: tuple[str, ...] = (
    "Sure, here is how to do that.",
    "Of course! Here are the steps:",
    "Certainly, I can help with that. First,",
    "Absolutely, here's what you need to know.",
)
"""Compliance answer prefixes (a⁻) of the CAA vector."""


def answer_means(
    backbone: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 32,
    system: str | None = None,
) -> dict[int, np.ndarray]:
    """Mean over all (prompt, answer) pairs of the answer-position residual, per layer (float64, d)."""
    if not prompts or not answers:
        raise SafesteerError("behaviour directions need at least one prompt and one answer prefix per side")
    users = [p for p in prompts for _ in answers]
    ans = [a for _ in prompts for a in answers]
    H = backbone.pooled(
        users, list(layers), batch_size=batch_size, position="answer", answers=ans, system=system
    )
    return {l: H[l].astype(np.float64).mean(axis=0) for l in H}


def refusal_caa_vectors(
    backbone: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    refusal: Sequence[str] = REFUSAL_PREFIXES,
    compliance: Sequence[str] = COMPLIANCE_PREFIXES,
    batch_size: int = 32,
    system: str | None = None,
) -> dict[int, np.ndarray]:
    """Raw (unnormalised) CAA vectors r_L = mean_refusal − mean_compliance for each layer."""
    pos = answer_means(backbone, prompts, refusal, layers, batch_size, system)
    neg = answer_means(backbone, prompts, compliance, layers, batch_size, system)
    return {l: pos[l] - neg[l] for l in pos}


def refusal_caa(
    backbone: Any,
    prompts: Sequence[str],
    layer: int,
    refusal: Sequence[str] = REFUSAL_PREFIXES,
    compliance: Sequence[str] = COMPLIANCE_PREFIXES,
    batch_size: int = 32,
    system: str | None = None,
) -> Direction:
    """The ``refusal_caa`` direction at ``layer`` (stored toward compliance: α ≥ 0 adds refusal)."""
    r = refusal_caa_vectors(backbone, prompts, [layer], refusal, compliance, batch_size, system)[layer]
    return Direction(
        "refusal_caa",
        -unit(r, "the CAA refusal vector"),
        "behaviour",
        layer,
        ["caa:answer-position DiffMean"],
        meta={
            "position": "answer",
            "refusal": list(refusal),
            "compliance": list(compliance),
            "n_prompts": len(prompts),
            "norm": float(np.linalg.norm(r)),
            "sign": "vector = -(refusal - compliance)/norm; alpha >= 0 adds refusal",
        },
    )


def refusal_dim(
    backbone: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    layer: int,
    batch_size: int = 32,
    system: str | None = None,
) -> Direction:
    """Arditi's refusal direction at ``layer``: DiffMean harmful − harmless at ``prompt_end``."""
    if not harmful or not harmless:
        raise SafesteerError("refusal_dim needs harmful and harmless prompts")
    Hp, Hn = (
        backbone.pooled(list(x), [layer], batch_size=batch_size, position="prompt_end", system=system)[layer]
        for x in (harmful, harmless)
    )
    return refusal_dim_from_features(Hp, Hn, layer)


def refusal_dim_from_features(harmful: np.ndarray, harmless: np.ndarray, layer: int) -> Direction:
    """:func:`refusal_dim` from residuals already pooled at ``prompt_end`` (rows × d, each class)."""
    if not len(harmful) or not len(harmless):
        raise SafesteerError("refusal_dim needs harmful and harmless prompts")
    r = harmful.astype(np.float64).mean(axis=0) - harmless.astype(np.float64).mean(axis=0)
    return Direction(
        "refusal_dim",
        -unit(r, "the harmful-harmless DiffMean"),
        "behaviour",
        layer,
        ["dim:prompt_end DiffMean"],
        meta={
            "position": "prompt_end",
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "norm": float(np.linalg.norm(r)),
            "sign": "vector = -(harmful - harmless)/norm; alpha >= 0 adds refusal",
        },
    )


def ablation_edit(direction: np.ndarray | Direction):
    """``h ↦ h − (h·r̂) r̂`` as a steering edit (the sign of the direction does not matter)."""
    v = direction.vector if isinstance(direction, Direction) else direction
    r = torch.as_tensor(unit(v, "the ablated direction"), dtype=torch.float32)

    def edit(h: torch.Tensor) -> torch.Tensor:
        rr = r.to(device=h.device, dtype=h.dtype)
        return h - (h @ rr).unsqueeze(-1) * rr

    return edit


def ablation_intervention(direction: Direction, layer: int | None = None) -> Intervention:
    """An :class:`Intervention` that projects ``direction`` out at one layer (default: its own)."""
    return Intervention(
        f"ablate:{direction.name}", direction.layer if layer is None else layer, edit=ablation_edit(direction)
    )


@contextlib.contextmanager
def ablate(
    backbone: Any, direction: Direction | np.ndarray, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Directional ablation at every layer of ``layers`` (default: all blocks, as in Arditi et al.)."""
    edit = ablation_edit(direction)
    with contextlib.ExitStack() as stack:
        for l in range(backbone.n_layers) if layers is None else layers:
            stack.enter_context(backbone.steer(int(l), edit=edit))
        yield


def median_norm(
    backbone: Any, prompts: Sequence[str], layer: int, batch_size: int = 32, max_prompts: int = 64
) -> float:
    """Median residual-stream norm over the tokens of chat-rendered ``prompts`` at ``layer`` (α's unit)."""
    ci = chat_inputs(backbone, list(prompts)[:max_prompts])
    norms = []
    pad = backbone.tokenizer.pad_token_id or 0
    for s in range(0, len(ci.ids), batch_size):
        ids, mask, _ = ci.batch(range(s, min(s + batch_size, len(ci.ids))), pad, "right", backbone.device)
        h = backbone.forward_layers(ids, mask, [layer])[layer].float()
        norms.append(h.norm(dim=-1)[mask.bool()].cpu().numpy())
    return float(np.median(np.concatenate(norms)))
