"""Scoring primitives shared by fluency and bias metrics (float64 log-softmax, length-sorted batches).

* :func:`masked_logprobs` — masked LM: for items ``(ids, position, target)`` (``ids`` already holds
  the mask where wanted) the log-probability of ``target`` at ``position``.
* :func:`causal_logprobs` — causal LM: per-token log-probabilities of ``continuation`` given
  ``BOS + context`` (``context`` may be empty: the whole text, BOS-conditioned).

Interventions are installed by the caller around these calls.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError

MaskedItem = tuple[Sequence[int], int, int]


def _pad_id(tok: Any) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else 0)


@torch.inference_mode()
def masked_logprobs(
    backbone: Any, items: Sequence[MaskedItem], batch_size: int = 32, token_budget: int = 2048
) -> np.ndarray:
    """log P(target | ids) at ``position`` for each item (float64), batched by similar length."""
    if backbone.kind != "masked":
        raise SafesteerError("masked_logprobs needs a masked LM")
    out = np.zeros(len(items), dtype=np.float64)
    if not items:
        return out
    pad = _pad_id(backbone.tokenizer)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    for chunk in _token_batches(order, [len(it[0]) for it in items], batch_size, token_budget):
        width = max(len(items[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            seq = list(items[i][0])
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            att[r, : len(seq)] = 1
        logits = backbone.logits(ids.to(backbone.device), att.to(backbone.device))
        pos = torch.tensor([items[i][1] for i in chunk], device=logits.device)
        tgt = torch.tensor([items[i][2] for i in chunk], device=logits.device)
        rows = logits[torch.arange(len(chunk), device=logits.device), pos].double()
        lp = torch.log_softmax(rows, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu().numpy()
        out[chunk] = lp
    return out


def bos_ids(tok: Any) -> list[int]:
    """``[bos]`` when the tokenizer has a BOS token (causal scoring always conditions on it)."""
    return [] if tok.bos_token_id is None else [int(tok.bos_token_id)]


def encode_plain(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def causal_logprobs(
    backbone: Any,
    continuations: Sequence[str],
    contexts: Sequence[str] | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    token_budget: int = 2048,
) -> list[np.ndarray]:
    """Per-token log P(continuation tokens | BOS + context) for each pair (float64 arrays).

    The continuation is tokenised on its own (with a leading space when a context precedes it)
    and appended to the context's tokens, so its tokens are the same whatever the context.
    ``max_tokens`` truncates each continuation.
    """
    if backbone.kind != "causal":
        raise SafesteerError("causal_logprobs needs a causal LM")
    tok = backbone.tokenizer
    ctxs = list(contexts) if contexts is not None else [""] * len(continuations)
    if len(ctxs) != len(continuations):
        raise SafesteerError("contexts and continuations differ in length")
    seqs: list[tuple[list[int], int]] = []  # (ids, start of continuation)
    for ctx, cont in zip(ctxs, continuations):
        head = bos_ids(tok) + (encode_plain(tok, ctx) if ctx else [])
        body = encode_plain(tok, (" " + cont.lstrip()) if ctx else cont)
        if max_tokens is not None:
            body = body[:max_tokens]
        room = backbone.max_length - len(head)
        if room <= 0:
            head = head[: backbone.max_length - 1]
            room = 1
        body = body[:room]
        if not head:
            raise SafesteerError(
                "causal scoring needs a BOS token or a context to condition the first token on"
            )
        seqs.append((head + body, len(head)))
    out: list[np.ndarray] = [np.zeros(0)] * len(seqs)
    pad = _pad_id(tok)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for chunk in _token_batches(order, [len(seqs[i][0]) for i in range(len(seqs))], batch_size, token_budget):
        width = max(len(seqs[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            seq = seqs[i][0]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            att[r, : len(seq)] = 1
        logits = backbone.logits(ids.to(backbone.device), att.to(backbone.device))
        for r, i in enumerate(chunk):
            seq, start = seqs[i]
            rows = logits[r, start - 1 : len(seq) - 1].double()
            tgt = ids[r, start : len(seq)].to(rows.device)
            lp = rows.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1)
            out[i] = lp.cpu().numpy()
    return out


def _token_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int, token_budget: int):
    """Consecutive groups of ``order`` with at most ``batch_size`` rows and ``token_budget`` padded tokens."""
    chunk: list[int] = []
    for i in order:
        width = max([lengths[j] for j in chunk] + [lengths[i]])
        if chunk and (len(chunk) >= batch_size or width * (len(chunk) + 1) > token_budget):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk
