"""Which torch device to run on: ``auto`` picks CUDA when a GPU is visible."""

from __future__ import annotations

import re

from safesteer.errors import SafesteerError

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; an explicit CUDA device must exist."""
    import torch  # torch: keeps safesteer.devices light (config checks device names)

    check_device_name(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SafesteerError(f"device {name!r} requested but no CUDA device is visible; use auto or cpu")
    return name


def check_device_name(name: str, what: str = "device") -> None:
    if not DEVICE_NAME.fullmatch(name):
        raise SafesteerError(f"{what} {name!r} is not valid; choose auto, cpu, cuda or cuda:N")
