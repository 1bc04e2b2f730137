"""The activation shard store: layout, manifest, reader and validation.

Layout of one layer folder (``OUT/layer-<L>/``)::

    manifest.json            model, layer, pooling, dtype, d, shard size, config, per-shard sha256
    shard-00000.npy          rows × d activations (float16 or float32), plain .npy (no pickle)
    ids-00000.npy            row ids (fixed-width unicode .npy)
    meta-00000.parquet       id, dataset, split, source and one column per label (NaN = absent)
"""

from safesteer.store.layout import FORMAT, layer_dir, shard_files
from safesteer.store.reader import ActivationStore, Batch, is_validation_id

__all__ = ["ActivationStore", "Batch", "is_validation_id", "FORMAT", "layer_dir", "shard_files"]
