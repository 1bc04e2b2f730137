"""Request limits and batching knobs of one server (request sizes, α bound, queue, batching, timeout)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from safesteer.errors import ContextTooLong, SafesteerError


@dataclass(frozen=True)
class Limits:
    """Request limits and batching knobs of one server."""

    max_texts: int = 32
    """Texts (or prompts) per request."""
    max_text_chars: int = 4000
    """Characters per text."""
    max_body_bytes: int = 1 << 20
    """Request body size (Content-Length and the bytes actually sent)."""
    max_new_tokens: int = 128
    """Upper bound of ``max_new_tokens`` for /v1/generate."""
    max_abs_alpha: float = 100.0
    """|α| bound for every policy and request (raw activation units)."""
    max_queue: int = 256
    """Jobs waiting for the model before requests are refused with 503."""
    batch_window_ms: float = 0.0
    """Coalesce /v1/score jobs of the same policy arriving within this window (0 = off)."""
    max_batch_texts: int = 64
    """Texts per forward pass (per request chunk, and per coalesced batch)."""
    request_timeout_s: float = 300.0
    """How long a request waits for the model before giving up (504)."""

    def __post_init__(self) -> None:
        for name in (
            "max_texts",
            "max_text_chars",
            "max_body_bytes",
            "max_new_tokens",
            "max_queue",
            "max_batch_texts",
        ):
            if int(getattr(self, name)) < 1:
                raise SafesteerError(f"limit {name} must be at least 1")
        if not (self.max_abs_alpha > 0 and math.isfinite(self.max_abs_alpha)):
            raise SafesteerError("max_abs_alpha must be a positive finite number")
        if self.batch_window_ms < 0:
            raise SafesteerError("batch_window_ms must be >= 0")


def check_fits(n_prompt: int, max_new_tokens: int, limit: int, what: str = "the prompt") -> None:
    """The served-context rule of both engines (vLLM's ``max_model_len``, the HF backbone's ``max_length``):
    ContextTooLong unless ``n_prompt`` tokens and ``max_new_tokens`` more fit in ``limit`` — a request is
    refused, never cut. ``what`` names the input in the message (a route that generates nothing passes 0)."""
    if n_prompt + int(max_new_tokens) > limit:
        more = f"; with max_tokens {max_new_tokens} it" if max_new_tokens else " and"
        fewer = ", ask for fewer tokens" if max_new_tokens else ""
        raise ContextTooLong(
            f"{what} has {n_prompt} tokens{more} exceeds the served context of {limit} tokens "
            f"(shorten it{fewer}, or serve with a larger --max-model-len)"
        )
