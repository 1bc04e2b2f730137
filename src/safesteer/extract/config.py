"""The ``[extract]`` section: how the activation store is written, validated here."""

from __future__ import annotations

from dataclasses import dataclass

from safesteer.checks import choice, positive


@dataclass
class ExtractSection:
    shard_size: int = 20_000
    dtype: str = "float32"
    batch_size: int = 32
    # fp32 (the same numbers on every machine) | bf16 | auto (bf16 where the CPU has it natively)
    precision: str = "fp32"

    def validate(self) -> "ExtractSection":
        choice("extract.dtype", self.dtype, ("float16", "float32"))
        choice("extract.precision", self.precision, ("auto", "bf16", "fp32"))
        positive("extract.shard_size", self.shard_size)
        positive("extract.batch_size", self.batch_size)
        return self
