"""Subprocess for tests/test_resume_exact.py: trains a tiny SAE (resuming if a checkpoint exists).

``python tests/_resume_worker.py OUT DELAY``: ``DELAY`` seconds of sleep per training batch make
the run slow enough to be SIGKILLed in the middle (the sleep changes nothing in the numbers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from safesteer.sae import TrainConfig, Trainer, array_batches


def data(n: int = 640, d: int = 8, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    D = g.normal(size=(12, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = np.zeros((n, 12))
    idx = np.argsort(g.random((n, 12)), axis=1)[:, :2]
    np.put_along_axis(Z, idx, g.uniform(0.5, 1.5, size=(n, 2)), axis=1)
    return (Z @ D).astype(np.float32)


def config() -> TrainConfig:
    return TrainConfig(
        expansion=4,
        l1=0.1,
        lr=5e-3,
        lr_warmup_steps=7,
        l1_warmup_steps=11,
        batch_size=32,
        epochs=4,
        patience=10,
        init_rows=256,
        beta1=0.5,
        checkpoint_every=3,
    )


def train(out: Path, delay: float = 0.0, resume: bool = False):
    torch.set_num_threads(1)
    batches = array_batches(data(), 32, seed=3)

    def slow(epoch, split):
        for b in batches(epoch, split):
            if split == "train" and delay:
                time.sleep(delay)
            yield b

    return Trainer(config(), 8, out).fit(slow, resume=resume)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    res = train(out, float(sys.argv[2]), resume=(out / "checkpoints").is_dir())
    print(f"done steps={res.steps} stopped={res.stopped}", flush=True)
