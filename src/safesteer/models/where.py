"""Which positions a steering touches: every one, or the prompt's only (see :class:`PromptOnly`)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from safesteer.errors import SafesteerError

WHERE = ("all", "prompt")


def check_where(where: str) -> str:
    if where not in WHERE:
        raise SafesteerError(f"steering positions '{where}' unknown; valid choices: {', '.join(WHERE)}")
    return where


def is_new_input(kwargs: dict) -> bool:
    """Whether a model call (its forward kwargs) starts a new input: no KV cache, or an empty one."""
    pkv = next(
        (kwargs[k] for k in ("past_key_values", "cache", "past_key_value") if kwargs.get(k) is not None), None
    )
    if pkv is None:
        return True
    try:
        return int(pkv.get_seq_length()) == 0
    except AttributeError:  # legacy tuple caches
        return len(pkv) == 0 or pkv[0] is None


def body(backbone: Any) -> nn.Module:
    """The transformer body under the LM head (Llama ``model.model``), called by every forward path
    (generation, logits, :meth:`Backbone.forward_layers`); the whole model if it has none."""
    base = getattr(backbone.model, getattr(backbone.model, "base_model_prefix", ""), None)
    return base if isinstance(base, nn.Module) else backbone.model


@contextlib.contextmanager
def answer_starts(backbone: Any, starts: torch.Tensor | Sequence[int]) -> Iterator[None]:
    """Declare, for the passes inside, where each row's appended answer starts (teacher-forced
    scoring of prompt + answer in one pass), so that prompt-only steering stops there."""
    prev = backbone._answer_starts
    backbone._answer_starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1)
    try:
        yield
    finally:
        backbone._answer_starts = prev


class PromptOnly:
    """Which positions of the current pass a ``where`` steering touches.

    ``all``: every position of every pass. ``prompt``: the positions of a new input (the prompt;
    cached generation then decodes the answer tokens unsteered, on the steered context), and in a
    teacher-forced pass the positions before :func:`answer_starts` — so that scoring a
    given answer sees exactly the activations generating it would. Used as a context manager, it
    watches the model's calls (a forward pre-hook) while steering is installed. Generation must
    use the KV cache (transformers' default): without it every step is a new input, steered whole."""

    def __init__(self, backbone: Any, where: str = "all"):
        self.bb, self.where, self.new, self._handle = backbone, where, True, None

    def __enter__(self) -> "PromptOnly":
        if self.where == "prompt":
            self._handle = body(self.bb).register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre(self, _module, _args, kwargs):
        self.new = is_new_input(kwargs)
        return None

    def mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """Bool (batch × seq) of the positions to steer in this pass (a new input); None = all of them."""
        if self.where == "all":
            return None
        starts = self.bb._answer_starts
        if starts is None:
            return None
        if starts.shape[0] != h.shape[0]:
            raise SafesteerError(f"{starts.shape[0]} answer starts for a pass of {h.shape[0]} rows")
        return torch.arange(h.shape[1], device=h.device).unsqueeze(0) < starts.to(h.device).unsqueeze(1)

    def select(self, new: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``new`` where this pass steers, ``h`` elsewhere (all of ``h`` in a cached decoding step)."""
        if self.where == "prompt" and not self.new:
            return h
        m = self.mask(h)
        return new if m is None else torch.where(m.unsqueeze(-1), new, h)
