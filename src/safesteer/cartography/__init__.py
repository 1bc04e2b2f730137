"""Concept cartography: SAE atoms × labels statistics, probe ↔ dictionary links, atom cards, selection.

>>> from safesteer.cartography import StreamingStats, atom_table
>>> st = StreamingStats(n_atoms, ["toxicity", "harmfulness"])
>>> for Z, Y in shards:            # Z: scipy.sparse rows × atoms, Y: rows × labels (0/1/NaN)
...     st.update(Z, Y)
>>> df = atom_table(st)            # one row per (atom, label): dmu, r, cohens_d, freq_pos/neg, score

Partial accumulators from separate processes combine with ``st.merge(other)`` (exact, any order).
The one-pass map over a latent store is :mod:`.atom_map`. Selection lives in
:mod:`safesteer.cartography.select`, judges in :mod:`.judges`, cards in
:mod:`.cards`, de-duplication in :mod:`.dedup`, probe decompositions in :mod:`.link`.
"""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "MapResult": "safesteer.cartography.atom_map",
    "atom_table": "safesteer.cartography.atom_map",
    "heldout_mask": "safesteer.cartography.atom_map",
    "map_latents": "safesteer.cartography.atom_map",
    "SCORE_WEIGHTS": "safesteer.cartography.stats",
    "StreamingStats": "safesteer.cartography.stats",
    "concept_score": "safesteer.cartography.stats",
    "TopActivations": "safesteer.cartography.top",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
