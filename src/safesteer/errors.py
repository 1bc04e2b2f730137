"""One error type for everything a user can get wrong.

A :class:`SafesteerError` carries a one-line message that names the problem and the fix; the CLI
prints it as ``error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations


class SafesteerError(Exception):
    """A user-facing error: bad input, missing data, a refused operation."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message.strip().splitlines()[0] if message.strip() else "unknown error"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class ContextTooLong(SafesteerError):
    """A prompt that, with the tokens asked for, does not fit the served context (HTTP 422,
    ``context_length_exceeded``, as OpenAI's API and vLLM answer it)."""


def choices_hint(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """Return "'x' is not one of: a, b, c" style text for error messages."""
    return f"unknown {name}; valid choices: {', '.join(sorted(valid))}"
