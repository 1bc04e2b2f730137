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

from safesteer.cartography.atom_map import MapResult, atom_table, heldout_mask, map_latents
from safesteer.cartography.stats import SCORE_WEIGHTS, StreamingStats, concept_score
from safesteer.cartography.top import TopActivations

__all__ = [
    "SCORE_WEIGHTS",
    "MapResult",
    "StreamingStats",
    "TopActivations",
    "atom_table",
    "concept_score",
    "heldout_mask",
    "map_latents",
]
