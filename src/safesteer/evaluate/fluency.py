"""Fluency under steering.

* masked LM — pseudo-log-likelihood (Salazar et al. 2020): PLL(W) = Σ_t log P(w_t | W∖t), each
  non-special token masked once (one masked copy per token, all copies batched);
* causal LM — mean token negative log-likelihood of a text given BOS (WikiText by default).

Both return per-text arrays so that steered and unsteered runs can be compared pairwise. The
per-text fluency score used by the suite is the *per-token* value (PLL / tokens for masked,
−NLL for causal), so texts of different length weigh the same and "higher = more fluent" holds
for both kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.evaluate._lm import causal_logprobs, masked_logprobs
from safesteer.steering.strategies import Intervention


@dataclass
class FluencyScores:
    """Per-text totals: ``logprob`` (PLL for masked, Σ log P for causal) over ``n_tokens`` tokens."""

    logprob: np.ndarray
    n_tokens: np.ndarray
    kind: str

    @property
    def per_token(self) -> np.ndarray:
        """Mean log-probability per token (higher = more fluent)."""
        return self.logprob / np.maximum(self.n_tokens, 1)

    @property
    def nll(self) -> np.ndarray:
        """Mean token NLL per text (causal) / mean pseudo-NLL (masked)."""
        return -self.per_token

    def corpus_nll(self) -> float:
        """Total NLL / total tokens over all texts."""
        return float(-self.logprob.sum() / max(1, int(self.n_tokens.sum())))

    def perplexity(self) -> float:
        return float(np.exp(self.corpus_nll()))


def _special_mask(tok: Any, ids: Sequence[int]) -> list[int]:
    return tok.get_special_tokens_mask(list(ids), already_has_special_tokens=True)


def pll_items(backbone: Any, texts: Sequence[str], max_tokens: int | None = None):
    """(masked items, owner text index per item, tokens per text) for PLL scoring."""
    tok = backbone.tokenizer
    if tok.mask_token_id is None:
        raise SafesteerError("pseudo-log-likelihood needs a tokenizer with a mask token")
    limit = min(backbone.max_length, (max_tokens + 2) if max_tokens else backbone.max_length)
    items, owner, counts = [], [], []
    for t_i, text in enumerate(texts):
        ids = list(tok(text, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"])
        special = _special_mask(tok, ids)
        n = 0
        for pos, (tid, sp) in enumerate(zip(ids, special)):
            if sp:
                continue
            masked = ids.copy()
            masked[pos] = tok.mask_token_id
            items.append((masked, pos, tid))
            owner.append(t_i)
            n += 1
        counts.append(n)
    return items, np.asarray(owner, dtype=np.int64), np.asarray(counts, dtype=np.int64)


def pseudo_log_likelihood(
    backbone: Any,
    texts: Sequence[str],
    intervention: Intervention | None = None,
    batch_size: int = 32,
    max_tokens: int | None = 64,
) -> FluencyScores:
    """Masked LM PLL per text (Salazar et al. 2020), each text truncated to ``max_tokens`` tokens."""
    if backbone.kind != "masked":
        raise SafesteerError("pseudo-log-likelihood needs a masked LM; use mean_token_nll for causal LMs")
    items, owner, counts = pll_items(backbone, texts, max_tokens)
    iv = intervention or Intervention.none()
    with iv.apply(backbone):
        lp = masked_logprobs(backbone, items, batch_size=batch_size)
    totals = np.zeros(len(texts), dtype=np.float64)
    np.add.at(totals, owner, lp)
    return FluencyScores(totals, counts, "masked")


def mean_token_nll(
    backbone: Any,
    texts: Sequence[str],
    intervention: Intervention | None = None,
    batch_size: int = 8,
    max_tokens: int | None = 128,
) -> FluencyScores:
    """Causal LM: Σ log P(token | BOS, previous tokens) per text, each truncated to ``max_tokens``."""
    if backbone.kind != "causal":
        raise SafesteerError("mean_token_nll needs a causal LM; use pseudo_log_likelihood for masked LMs")
    iv = intervention or Intervention.none()
    with iv.apply(backbone):
        rows = causal_logprobs(backbone, list(texts), batch_size=batch_size, max_tokens=max_tokens)
    return FluencyScores(
        np.array([r.sum() for r in rows]), np.array([r.size for r in rows], dtype=np.int64), "causal"
    )


def fluency(
    backbone: Any, texts: Sequence[str], intervention: Intervention | None = None, **kw: Any
) -> FluencyScores:
    """PLL for masked LMs, token log-likelihood for causal LMs."""
    fn = pseudo_log_likelihood if backbone.kind == "masked" else mean_token_nll
    return fn(backbone, texts, intervention, **kw)


_HEADING = re.compile(r"^\s*=+ .* =+\s*$")


def wiki_passages(
    articles: Iterable[str], min_words: int = 20, max_words: int = 80, limit: int | None = None
) -> list[str]:
    """Paragraph passages from WikiText articles: headings dropped, each cut to ``max_words`` words
    at a sentence end when possible, paragraphs shorter than ``min_words`` skipped."""
    out: list[str] = []
    for art in articles:
        for para in art.split("\n"):
            para = para.strip()
            if not para or _HEADING.match(para):
                continue
            words = para.split()
            if len(words) < min_words:
                continue
            if len(words) > max_words:
                cut = " ".join(words[:max_words])
                end = cut.rfind(" . ")
                para = cut[: end + 2] if end > len(cut) // 2 else cut
            out.append(para)
            if limit is not None and len(out) >= limit:
                return out
    return out
