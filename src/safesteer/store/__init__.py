"""The activation shard store: layout, manifest, reader and validation.

Layout of one layer folder (``OUT/layer-<L>/``)::

    manifest.json            model, layer, pooling, dtype, d, shard size, config, per-shard sha256
    shard-00000.npy          rows × d activations (float16 or float32), plain .npy (no pickle)
    ids-00000.npy            row ids (fixed-width unicode .npy)
    meta-00000.parquet       id, dataset, split, source and one column per label (NaN = absent)
"""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "FORMAT": "safesteer.store.layout",
    "layer_dir": "safesteer.store.layout",
    "shard_files": "safesteer.store.layout",
    "ActivationStore": "safesteer.store.reader",
    "Batch": "safesteer.store.reader",
    "is_validation_id": "safesteer.store.reader",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
