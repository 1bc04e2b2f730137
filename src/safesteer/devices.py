"""Which torch device to run on: ``auto`` picks CUDA when a GPU is visible."""

from __future__ import annotations

from safesteer.errors import SafesteerError


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; an explicit CUDA device must exist."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SafesteerError(f"device {name!r} requested but no CUDA device is visible; use auto or cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise SafesteerError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    return name
