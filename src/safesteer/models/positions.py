"""Where a sentence vector is read: ``mean``, ``last``, ``prompt_end`` or ``answer`` pooling.

* ``mean`` — mean over real tokens (attention mask): the original study's pooling.
* ``last`` — the last real token (works with left or right padding).
* ``prompt_end`` — mean over the chat template's tokens *after* the user content (SmolLM2:
  ``<|im_end|>\\n<|im_start|>assistant\\n``), where Arditi et al. (2024) read the refusal
  direction. A tokenizer without a chat template adds no such tokens: then the span is the
  prompt's last token.
* ``prompt`` — mean over the user content *and* the template tokens after it (from the first
  token of the last user message to the end of the generation prompt): what the request says as
  well as where the model decides how to answer. The harm gate's default (leave-one-dataset-out
  AUROC higher than ``prompt_end`` alone on SmolLM2, see README "Behaviour steering").
* ``answer`` — mean over the tokens of an answer appended after the generation prompt (CAA).

:func:`chat_inputs` renders user messages (+ optional answers) with the template and returns the
token ids with both spans, found from the tokenizer's character offsets, so the spans are exact
token positions whatever the tokenizer merges at the boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.progress import ticker

Position = Literal["mean", "last", "prompt_end", "prompt", "answer"]
POSITIONS: tuple[str, ...] = ("mean", "last", "prompt_end", "prompt", "answer")
CHAT_POSITIONS: tuple[str, ...] = ("prompt_end", "prompt", "answer")
"""Positions that need the chat rendering (spans); ``mean``/``last`` work on raw texts."""


def check_position(position: str) -> str:
    if position not in POSITIONS:
        raise SafesteerError(f"unknown position '{position}'; valid choices: {', '.join(POSITIONS)}")
    return position


def span_mask(spans: torch.Tensor | Sequence[tuple[int, int]], seq: int, device: Any = None) -> torch.Tensor:
    """Bool (batch × seq): True at ``start <= t < end`` of each row's ``(start, end)`` span."""
    sp = torch.as_tensor(spans, dtype=torch.long, device=device).reshape(-1, 2)
    t = torch.arange(seq, device=sp.device).unsqueeze(0)
    return (t >= sp[:, :1]) & (t < sp[:, 1:])


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (left or right padding)."""
    seq = attention_mask.shape[1]
    pos = torch.arange(seq, device=attention_mask.device).unsqueeze(0).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp_min(0)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch × seq × d) over the positions where ``mask`` (batch × seq; bool or
    0/1) is set — the one masked-mean pooling every reader uses (an empty row gives zeros)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position: str = "mean",
    spans: torch.Tensor | Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Pooled vectors (batch × d) of ``hidden`` (batch × seq × d) at ``position``.

    ``spans`` (batch × 2, ``[start, end)`` token indices) is required for ``prompt_end`` and
    ``answer`` (see :func:`chat_inputs`); it is ignored for ``mean`` and ``last``.
    """
    check_position(position)
    if position == "mean":
        return masked_mean(hidden, attention_mask)
    if position == "last":
        idx = last_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if spans is None:
        raise SafesteerError(f"position '{position}' needs token spans; build the inputs with chat_inputs()")
    m = span_mask(spans, hidden.shape[1], hidden.device) & attention_mask.bool()
    if bool((m.sum(dim=1) == 0).any()):
        raise SafesteerError(f"an empty '{position}' span; give non-empty answers / prompts")
    return masked_mean(hidden, m)


def pool_prompt(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    position: str,
    n_end: int = 0,
    header: Sequence[int] = (),
) -> torch.Tensor:
    """Pooled vectors (batch × d) of inputs that *end with the generation prompt* (a chat, nothing
    after it), read in the pass itself: ``mean`` of the real tokens; ``last`` token; ``prompt_end``
    = the last ``n_end`` (:func:`prompt_end_length`) real tokens; ``prompt`` = from just after the
    last user ``header`` (:func:`user_header`) to the end. Rows with an empty span give zeros."""
    if position == "mean":
        return masked_mean(hidden, attention_mask)
    last = last_index(attention_mask)
    if position == "prompt":
        start = prompt_starts(input_ids, attention_mask, header, last - n_end + 1).to(last.device)
    else:
        start = last - (n_end if position == "prompt_end" else 1) + 1
    spans = torch.stack([start, last + 1], dim=1)
    return masked_mean(hidden, span_mask(spans, hidden.shape[1], hidden.device) & attention_mask.bool())


@dataclass
class ChatInputs:
    """Token ids of rendered chats (no padding) with each row's prompt_end, prompt and answer spans."""

    ids: list[list[int]]
    prompt_end: list[tuple[int, int]]
    answer: list[tuple[int, int]]
    n_truncated: int = 0
    prompt: list[tuple[int, int]] = field(default_factory=list)

    def spans(self, position: str) -> list[tuple[int, int]]:
        if position == "prompt_end":
            return self.prompt_end
        if position == "prompt":
            return self.prompt
        if position == "answer":
            return self.answer
        raise SafesteerError(
            f"position '{position}' has no span; spans exist for {', '.join(CHAT_POSITIONS)}"
        )

    def batch(self, rows: Sequence[int], pad_id: int, padding_side: str = "right", device: Any = None):
        """(input_ids, attention_mask, {position: spans}) for ``rows``, padded to the longest."""
        width = max(len(self.ids[r]) for r in rows)
        ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        shift = []
        for i, r in enumerate(rows):
            n = len(self.ids[r])
            off = width - n if padding_side == "left" else 0
            ids[i, off : off + n] = torch.tensor(self.ids[r], dtype=torch.long)
            mask[i, off : off + n] = 1
            shift.append(off)
        spans = {
            p: torch.tensor([(s + o, e + o) for (s, e), o in zip((self.spans(p)[r] for r in rows), shift)])
            for p in CHAT_POSITIONS
        }
        return ids.to(device), mask.to(device), spans


def chat_inputs(
    backbone: Any,
    users: Sequence[Any],
    answers: Sequence[str] | None = None,
    system: str | None = None,
    max_length: int | None = None,
) -> ChatInputs:
    """Render ``users`` with the chat template (+ ``answers`` appended) and locate the spans. A
    user is one message (a string) or a conversation (a list of ``{"role", "content"}`` ending with
    a user turn; its spans are those of that last turn).

    prompt_end = tokens from the end of the user content to the end of the generation prompt
    (at least the prompt's last token); prompt = from the first token of the user content to the
    end of the generation prompt; answer = tokens from the end of the generation prompt to
    the end (empty when no answers are given). Too long inputs keep their *last* ``max_length``
    tokens, so both spans survive.
    """
    if answers is not None and len(answers) != len(users):
        raise SafesteerError(f"{len(users)} prompts but {len(answers)} answers; give one answer per prompt")
    tok = backbone.tokenizer
    if not getattr(tok, "is_fast", False):
        raise SafesteerError("prompt_end/answer positions need a fast tokenizer (character offsets)")
    limit = int(max_length or backbone.max_length)
    out = ChatInputs([], [], [])
    for i, user in enumerate(users):
        if isinstance(user, str):
            content = user.strip()
            chat = backbone.chat_prompt(content, system=system)
        else:  # a conversation: the spans are the last user turn's
            turns = [{"role": str(m["role"]), "content": str(m["content"]).strip()} for m in user]
            if not turns or turns[-1]["role"] != "user":
                raise SafesteerError(f"conversation {i} must end with a user turn")
            content = turns[-1]["content"]
            chat = backbone.chat_prompt(turns, system=system)
        user_start = chat.rfind(content)
        user_end = user_start + len(content)
        answer = "" if answers is None else str(answers[i])
        enc = tok(chat + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = list(enc["input_ids"]), list(enc["offset_mapping"])
        n_prompt = sum(1 for s, _e in offs if s < len(chat))
        pe_start = next((t for t, (s, _e) in enumerate(offs[:n_prompt]) if s >= user_end), n_prompt)
        pe_start = min(pe_start, n_prompt - 1)
        u_start = next((t for t, (s, _e) in enumerate(offs[:n_prompt]) if s >= user_start), pe_start)
        pe, ans, pr = (pe_start, n_prompt), (n_prompt, len(ids)), (min(u_start, pe_start), n_prompt)
        if len(ids) > limit:
            cut = len(ids) - limit
            if pe[0] < cut:
                raise SafesteerError(
                    f"input {i} is {len(ids)} tokens; its template end does not fit in {limit}"
                )
            ids = ids[cut:]
            pe, ans, pr = (
                (pe[0] - cut, pe[1] - cut),
                (ans[0] - cut, ans[1] - cut),
                (max(pr[0] - cut, 0), pr[1] - cut),
            )
            out.n_truncated += 1
        out.ids.append(ids)
        out.prompt_end.append(pe)
        out.prompt.append(pr)
        out.answer.append(ans)
    return out


def special_token_ids(tok: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (``all_special_ids``) and every added token
    marked special. A tokenizer converted from GGUF (Qwen2.5) names only BOS/EOS/PAD, while its chat
    markers (``<|im_start|>``) are added special tokens."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    special.update(int(i) for i, t in decoder.items() if getattr(t, "special", False))
    return special


def prompt_end_length(backbone: Any, system: str | None = None) -> int:
    """Number of prompt_end tokens of this backbone's template (the same for every prompt; cached)."""
    tok = backbone.tokenizer
    key = (getattr(tok, "chat_template", None), system)
    cache = tok.__dict__.setdefault("_safesteer_prompt_end", {})
    if key not in cache:
        s, e = chat_inputs(backbone, ["Hello"], system=system).prompt_end[0]
        cache[key] = e - s
    return cache[key]


def user_header(backbone: Any, system: str | None = None) -> tuple[int, ...]:
    """Token ids that open a user message in this backbone's chat template (SmolLM2:
    ``<|im_start|>user\\n``): from the last special token before the user content to the content
    (cached). Empty without a chat template or special tokens: then ``prompt`` starts at 0."""
    tok = backbone.tokenizer
    key = ("user_header", getattr(tok, "chat_template", None), system)
    cache = tok.__dict__.setdefault("_safesteer_prompt_end", {})
    if key not in cache:
        ci = chat_inputs(backbone, ["Hello"], system=system)
        ids, start = ci.ids[0], ci.prompt[0][0]
        special = special_token_ids(tok)
        k = max((t for t in range(start) if ids[t] in special), default=None)
        cache[key] = tuple(int(i) for i in ids[k:start]) if k is not None else ()
    return cache[key]


def prompt_starts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    header: Sequence[int],
    before: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row, the index just after the last occurrence of ``header`` among the real tokens that
    ends at or before ``before`` (per row; e.g. the prompt_end start, since the template's tail may
    repeat the header's first tokens) — the first token of the last user message — or 0 where it
    does not occur (truncated or no template)."""
    b, seq = input_ids.shape
    n = len(header)
    if n == 0 or seq < n:
        return torch.zeros(b, dtype=torch.long, device=input_ids.device)
    want = torch.as_tensor(list(header), dtype=input_ids.dtype, device=input_ids.device)
    hit = (input_ids.unfold(1, n, 1) == want).all(-1) & attention_mask.bool().unfold(1, n, 1).all(-1)
    pos = torch.arange(seq - n + 1, device=input_ids.device).unsqueeze(0)
    if before is not None:
        hit &= pos + n <= before.to(pos.device).reshape(-1, 1)
    last = torch.where(hit, pos, torch.full_like(pos, -1)).max(dim=1).values
    return torch.where(last >= 0, last + n, torch.zeros_like(last))


def pooled_vectors(
    backbone: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 32,
    max_length: int | None = None,
    position: str = "mean",
    answers: Sequence[str] | None = None,
    system: str | None = None,
) -> dict[int, np.ndarray]:
    """The body of :meth:`Backbone.pooled`: float32 (rows × d) vectors per layer at ``position``."""
    return pooled_at(backbone, texts, layers, (position,), batch_size, max_length, answers, system)[position]


def pooled_at(
    backbone: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    positions: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    answers: Sequence[str] | None = None,
    system: str | None = None,
) -> dict[str, dict[int, np.ndarray]]:
    """Vectors at several ``positions`` from one forward pass per batch: ``{position: {layer: rows × d}}``.
    Chat positions (``prompt_end``, ``prompt``, ``answer``) and raw-text ones (``mean``, ``last``)
    read different inputs, so one call takes positions of one kind only."""
    positions = tuple(dict.fromkeys(check_position(p) for p in positions))
    chat = {p in CHAT_POSITIONS for p in positions}
    if not positions or len(chat) != 1:
        raise SafesteerError(
            f"positions {list(positions)}: pass one or more of one kind ({', '.join(CHAT_POSITIONS)} "
            "read chat-rendered prompts; mean/last the raw texts)"
        )
    if "answer" in positions and answers is None:
        raise SafesteerError("position 'answer' needs the answers to append; pass answers=[...]")
    out: dict[str, dict[int, list[np.ndarray]]] = {p: {int(l): [] for l in layers} for p in positions}
    ci = chat_inputs(backbone, texts, answers, system, max_length) if chat == {True} else None
    pad = backbone.tokenizer.pad_token_id or 0
    # chat inputs are batched in order of length (less padding: ~2x faster on mixed-length sets),
    # then put back in the callers' order; raw texts keep their order (the tokenizer pads per batch)
    order = np.argsort([len(x) for x in ci.ids], kind="stable") if ci is not None else np.arange(len(texts))
    advance = ticker(len(texts), f"pooled vectors at {', '.join(positions)}")
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        if ci is not None:
            ids, mask, spans = ci.batch(rows, pad, "right", backbone.device)
        else:
            enc = backbone.tokenize(texts[start : start + batch_size], max_length=max_length)
            ids, mask, spans = enc.input_ids, enc.attention_mask, {}
        for l, h in backbone.forward_layers(ids, mask, layers).items():
            for p in positions:
                out[p][l].append(pool(h.float(), mask, p, spans.get(p)).cpu().numpy())
        advance(len(rows))
    back = np.argsort(order, kind="stable")
    return {
        p: {
            l: np.concatenate(v)[back] if v else np.zeros((0, backbone.d_model), np.float32)
            for l, v in per.items()
        }
        for p, per in out.items()
    }
