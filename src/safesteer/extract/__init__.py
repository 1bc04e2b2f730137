"""Extraction: texts through the frozen backbone into a resumable activation store.

``core``: one process (length-bucketed batches, the forward stopped at the last layer read, shards
committed atomically); ``distributed``: the same shards split across torchrun ranks, same bytes.
"""

from safesteer.extract.core import (
    ExtractConfig,
    Extractor,
    ExtractReport,
    bf16_supported,
    choose_precision,
    extract,
)

__all__ = ["ExtractConfig", "ExtractReport", "Extractor", "bf16_supported", "choose_precision", "extract"]
