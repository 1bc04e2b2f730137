"""Judged by what the model says: fast batched greedy answers, refusal judges, coherence, agreement.

* :func:`generate` — greedy answers to chat-rendered prompts (left padding, KV cache, length-sorted
  batches). A row stops once its answer is *decided*: the judge's refusal phrase is present
  (``stop_on_refusal``), EOS was produced, or ``decide_after`` tokens passed without one. Whatever
  steering context is active around the call applies (unconditional, conditional, none).
* Judges of refusal: :mod:`safesteer.evaluate.judges` (a registry; chosen by name).
* Coherence of an answer: its mean token NLL under the *unsteered* model given the prompt
  (:func:`answer_nll`), and whether it is empty or repetitive (:func:`degenerate`).
* :func:`agreement` — how often the generated refusal and forced-choice P(No) > ½ agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.evaluate.generation import REFUSAL_PHRASES, is_refusal
from safesteer.models.hooks import answer_starts
from safesteer.models.positions import chat_inputs
from safesteer.progress import ticker


@dataclass
class Answers:
    """Greedy answers in prompt order, with their token ids and how many tokens each took."""

    prompts: list[str]
    texts: list[str]
    ids: list[list[int]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    """The prompt indices in the order they were batched (length-sorted), e.g. to map a
    :class:`~safesteer.steering.condition.GateState`'s flags back: ``flags[order] = state.flags``."""

    def in_prompt_order(self, batched: np.ndarray) -> np.ndarray:
        out = np.empty_like(np.asarray(batched))
        out[self.order] = batched
        return out

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def records(self) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "answer": a, "tokens": len(i)}
            for p, a, i in zip(self.prompts, self.texts, self.ids)
        ]


class _Decided:
    """Per-row stopping criterion: refusal phrase present, or ``decide_after`` tokens generated."""

    def __init__(
        self,
        tokenizer: Any,
        start: int,
        stop_on_refusal: bool,
        decide_after: int | None,
        phrases: Sequence[str],
    ):
        self.tok, self.start, self.stop_on_refusal, self.decide_after, self.phrases = (
            tokenizer,
            start,
            stop_on_refusal,
            decide_after,
            phrases,
        )

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.start :]
        done = torch.zeros(new.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.decide_after is not None and new.shape[1] >= self.decide_after:
            done[:] = True
            return done
        if self.stop_on_refusal:
            texts = self.tok.batch_decode(new, skip_special_tokens=True)
            done |= torch.tensor([is_refusal(t, self.phrases) for t in texts], device=input_ids.device)
        return done


@torch.inference_mode()
def generate(
    backbone: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    stop_on_refusal: bool = True,
    decide_after: int | None = None,
    system: str | None = None,
    phrases: Sequence[str] = REFUSAL_PHRASES,
) -> Answers:
    """Greedy answers to ``prompts`` (user messages, chat-rendered), batched by length."""
    if backbone.kind != "causal":
        raise SafesteerError("generation needs a causal LM; use forced choice for masked LMs")
    from transformers import StoppingCriteriaList  # transformers: safesteer.config loads this package

    prompts = [p if isinstance(p, (list, tuple)) else str(p) for p in prompts]
    ci = chat_inputs(backbone, prompts, system=system)
    order = sorted(range(len(prompts)), key=lambda i: (len(ci.ids[i]), i))
    tok = backbone.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id
    out_ids: list[list[int]] = [[] for _ in prompts]
    advance = ticker(len(prompts), "greedy answers")
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids, mask, _ = ci.batch(rows, pad, "left", backbone.device)
        crit = _Decided(tok, ids.shape[1], stop_on_refusal, decide_after, phrases)
        gen = backbone.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            stopping_criteria=StoppingCriteriaList([crit]),
        )
        for r, row in zip(rows, gen[:, ids.shape[1] :].tolist()):
            cut = next(
                (k for k, t in enumerate(row) if t == eos or (t == pad and pad != eos and k > 0)), len(row)
            )
            out_ids[r] = row[:cut]
        advance(len(rows))
    texts = [tok.decode(x, skip_special_tokens=True).strip() for x in out_ids]
    return Answers(prompts, texts, out_ids, order)


# ------------------------------------------------------------------------------------------- coherence
@torch.inference_mode()
def answer_nll(
    backbone: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    system: str | None = None,
) -> np.ndarray:
    """Mean token NLL of each answer given its chat-rendered prompt, under the model as it is now
    (call it outside any steering context for the coherence score); NaN for an empty answer."""
    out = np.full(len(prompts), np.nan)
    keep = [i for i, a in enumerate(answers) if str(a).strip()]
    if not keep:
        return out
    ci = chat_inputs(backbone, [prompts[i] for i in keep], [str(answers[i]) for i in keep], system=system)
    pad = backbone.tokenizer.pad_token_id or 0
    for s in range(0, len(keep), batch_size):
        rows = list(range(s, min(s + batch_size, len(keep))))
        ids, mask, spans = ci.batch(rows, pad, "right", backbone.device)
        with answer_starts(backbone, spans["answer"][:, 0]):  # prompt-only steering stops at the answer
            logits = backbone.logits(ids, mask)
        logp = torch.log_softmax(logits.double(), dim=-1)
        for r, row in enumerate(rows):
            a0, a1 = spans["answer"][r].tolist()
            if a1 <= a0:
                continue
            tgt = ids[r, a0:a1]
            lp = logp[r, a0 - 1 : a1 - 1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            out[keep[row]] = float(-lp.mean())
    return out


def degenerate(answer: str, n: int = 3, min_unique: float = 0.5) -> bool:
    """Empty (no letter or digit) or repetitive (< ``min_unique`` of its word ``n``-grams distinct,
    or one word four times in a row)."""
    text = str(answer)
    if not any(ch.isalnum() for ch in text):
        return True
    words = text.lower().split()
    if any(len(set(words[i : i + 4])) == 1 for i in range(len(words) - 3)):
        return True
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) >= 4 and len(set(grams)) / len(grams) < min_unique


def coherence(
    backbone: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> dict[str, Any]:
    """Per-answer NLL under the (unsteered) model and the share of empty/repetitive answers."""
    nll = answer_nll(backbone, prompts, answers, batch_size)
    bad = np.array([degenerate(a) for a in answers], dtype=np.float64)
    return {
        "nll": nll,
        "degenerate": bad,
        "mean_nll": float(np.nanmean(nll)) if np.isfinite(nll).any() else float("nan"),
        "degenerate_share": float(bad.mean()) if bad.size else float("nan"),
    }


def agreement(refused: Sequence[float], p_yes: Sequence[float]) -> dict[str, float]:
    """Agreement of generated refusals with forced choice (refused ⇔ P(Yes) < ½) and their correlation."""
    r = np.asarray(refused, dtype=np.float64)
    p = np.asarray(p_yes, dtype=np.float64)
    if r.shape != p.shape or r.size == 0:
        raise SafesteerError("agreement needs one refusal flag and one P(Yes) per prompt")
    agree = float(np.mean(r == (p < 0.5)))
    corr = float(np.corrcoef(r, 1.0 - p)[0, 1]) if r.std() > 0 and p.std() > 0 else float("nan")
    return {
        "agreement": agree,
        "corr_refusal_pno": corr,
        "n": int(r.size),
        "refusal_rate": float(r.mean()),
        "pno_rate": float(np.mean(p < 0.5)),
    }
