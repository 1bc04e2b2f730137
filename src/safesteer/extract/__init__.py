"""Extraction: texts through the frozen backbone into a resumable activation store.

``core``: one process (length-bucketed batches, the forward stopped at the last layer read, shards
committed atomically); ``distributed``: the same shards split across torchrun ranks, same bytes.
"""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "ExtractConfig": "safesteer.extract.core",
    "Extractor": "safesteer.extract.core",
    "ExtractReport": "safesteer.extract.core",
    "bf16_supported": "safesteer.extract.core",
    "choose_precision": "safesteer.extract.core",
    "extract": "safesteer.extract.core",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
