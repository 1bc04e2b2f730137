"""What the harm gate reads in a conversation: one rule for the study and the service.

A chat is judged by its *requests*: the last ``window`` user turns, joined by a blank line, read
as one user message rendered alone (:func:`gate_text`). So

* a single-turn chat reads its user message, exactly as before (the single-turn gate is unchanged);
* a short follow-up ("Continue.", "now the next step", "Thanks!") after a harmful request is judged
  with that request in view, and a short turn that opens a chat ("Hi", "Thanks!") by itself;
* a request spread over several turns (multi-turn escalation) is read as the whole it makes;
* assistant turns are not read: what the gate judges is what the user asked, not what the model
  (or a forged assistant turn in the message list) said.

The behaviour study trains and calibrates the gate on texts made by this function (short turns and
conversations among its data) and the chat endpoint scores the same text, so the deployed gate sees
what it was calibrated on. ``window`` is recorded in the policy (``condition.window``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from safesteer.errors import SafesteerError

GATE_WINDOW = 3
"""User turns the gate reads by default (the last three: a request, a follow-up, one more)."""


def _role_text(m: Any) -> tuple[str, str]:
    if isinstance(m, Mapping):
        return str(m.get("role", "")), str(m.get("content", "") or "")
    text = m.text() if hasattr(m, "text") else getattr(m, "content", "")
    return str(getattr(m, "role", "")), str(text or "")


def user_turns(messages: Sequence[Any]) -> list[str]:
    """The non-empty user turns of a chat (dicts with ``role``/``content`` or message objects), in order."""
    return [t.strip() for r, t in map(_role_text, messages) if r == "user" and t.strip()]


def gate_text(messages: str | Sequence[Any], window: int = GATE_WINDOW) -> str:
    """The text the gate reads for ``messages``: the last ``window`` user turns joined by a blank
    line (a plain string is a one-turn chat and comes back stripped)."""
    if isinstance(messages, str):
        return messages.strip()
    if int(window) < 1:
        raise SafesteerError(f"the gate's window must be at least 1 user turn, got {window}")
    turns = user_turns(messages)
    if not turns:
        raise SafesteerError("a chat needs a non-empty user message for the gate to read")
    return "\n\n".join(turns[-int(window) :])
