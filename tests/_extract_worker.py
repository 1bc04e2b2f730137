"""Subprocess body for the kill -9 test: extract a synthetic corpus with a tiny seeded model."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


@dataclass(frozen=True)
class Rec:
    id: str
    text: str
    split: str = "train"
    labels: dict = field(default_factory=dict)
    source: str = "local"


def corpus(n: int):
    import random

    from conftest import WORDS

    rng = random.Random(1234)
    for i in range(n):
        k = rng.randint(0, 40)
        text = " ".join(rng.choice(WORDS) for _ in range(k))
        yield "synthetic", Rec(id=f"syn:{i}", text=text, labels={"toxic": i % 2, "score": (i % 7) / 7.0})


def main(out: str, n: int, dtype: str, kind: str) -> None:
    import torch
    from conftest import make_tiny_llama, make_tiny_roberta

    from safesteer.extract import ExtractConfig, extract

    torch.set_num_threads(1)
    bb = make_tiny_llama() if kind == "causal" else make_tiny_roberta()
    cfg = ExtractConfig(
        model=bb.name,
        datasets=["synthetic"],
        layers=[0, 2],
        shard_size=200,
        dtype=dtype,
        batch_size=16,
        precision="fp32",
    )
    extract(bb, corpus(n), out, cfg, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
