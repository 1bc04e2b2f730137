"""One-line checks of configuration values (each error names the key and the fix)."""

from __future__ import annotations

from safesteer.errors import SafesteerError


def choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SafesteerError(f"config {key} = {value!r} is not valid; choose one of: {', '.join(valid)}")


def positive(key: str, value: float) -> None:
    if not value > 0:
        raise SafesteerError(f"config {key} must be positive (got {value})")
