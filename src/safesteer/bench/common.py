"""Shared benchmark helpers: measured matmul peak and FLOP counting."""

from __future__ import annotations

import time

import torch
from torch import nn


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.5) -> float:
    """Measured dense matmul throughput (GFLOP/s) on this machine, for ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def linear_params(modules: list[nn.Module]) -> int:
    """Number of weights in the Linear (and GPT-2 Conv1D) layers of ``modules``."""
    total = 0
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D":
                total += sub.weight.numel()
    return total
