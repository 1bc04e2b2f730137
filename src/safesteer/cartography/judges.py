"""LLM judges for candidate atoms: a verdict (online or offline), a granular label and a reason.

Verdicts (as in the original study's GPT-4 filter):

* ``GENUINE`` — the atom encodes the concept itself (its top texts and tokens are about it),
* ``CONTEXT`` — it fires on correlated context (topic, dataset format, a frequent word),
* ``NOISE``   — no coherent pattern.

Judges (all return :class:`JudgeResult` with one of the three verdicts, a short granular label and
a reason):

* :class:`OpenAIAtomJudge` — any OpenAI-compatible ``/chat/completions`` endpoint via httpx. Settings from
  the environment: ``SAFESTEER_JUDGE_BASE_URL`` (else ``OPENAI_BASE_URL``, else
  ``https://api.openai.com/v1``), ``SAFESTEER_JUDGE_MODEL`` (else ``OPENAI_MODEL``, else
  ``gpt-4o-mini``), ``SAFESTEER_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``). The reply is asked for as
  JSON; anything else is parsed with :func:`parse_verdict`.
* :class:`OfflineJudge` — the embedded instruct model (any causal :class:`~safesteer.models.Backbone`)
  with a structured prompt and *constrained* decoding: the verdict is the argmax over the three
  verdict words of their summed next-token log-probabilities after ``Verdict:``, calibrated by
  subtracting the same scores for a content-free card (Zhao et al. 2021, contextual calibration),
  so it is always one of the three (the prefix runs once; the verdict words reuse its KV cache).
  The granular label is the greedy completion of "This feature detects …", cut to its first clause
  without filler words; the reason is an evidence summary from the card (firing rates, promoted
  tokens, top text) plus the calibrated verdict probabilities (optionally a generated sentence).
* :class:`NoJudge` — verdict ``UNJUDGED`` (keeps every candidate).

The causal screen (:class:`CausalScreen`, :func:`train_readouts`) lives in :mod:`safesteer.cartography.screen`
and is re-exported here for the old import path.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from safesteer.cartography.screen import (  # noqa: F401  (old import path)
    UNSAFE_FLAG,
    CausalScreen,
    ScreenResult,
    pooled_by_length,
    train_readouts,
)
from safesteer.errors import SafesteerError

VERDICTS: tuple[str, str, str] = ("GENUINE", "CONTEXT", "NOISE")

SYSTEM_PROMPT = (
    "You audit features of a language model's sparse autoencoder. Given a feature's top-activating texts, "
    "the tokens it promotes, and its statistics against a concept, decide whether it is GENUINE (it "
    "encodes the "
    "concept itself), CONTEXT (it fires on correlated context: topic, format, a frequent word) or NOISE (no "
    "coherent pattern)."
)


@dataclass
class JudgeResult:
    verdict: str
    label: str = ""
    reason: str = ""
    probs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AtomJudge(Protocol):
    """A judge of SAE atoms: does an atom's card express the concept? (Not the refusal judges of
    :mod:`safesteer.evaluate.refusal`, which judge answers.)"""

    name: str

    def judge(self, card: dict[str, Any], concept: str) -> JudgeResult: ...


# ------------------------------------------------------------------------------------ prompt & parse
def concept_text(concept: str) -> str:
    """Readable concept for the judge: ``emotion:anger`` → ``anger (emotion)``."""
    concept = str(concept)
    if ":" in concept:
        kind, name = concept.split(":", 1)
        return f"{name.replace('_', ' ')} ({kind})"
    return concept.replace("_", " ")


def card_prompt(card: dict[str, Any], concept: str, n_texts: int = 4, text_chars: int = 160) -> str:
    """The structured user message describing one atom for the judge."""
    lines = [f"Concept: {concept}", f"Feature: #{card.get('atom', '?')}"]
    toks = card.get("tokens") or []
    lines.append("Promoted tokens: " + (", ".join(toks[:10]) if toks else "(none)"))
    texts = card.get("top_texts") or []
    lines.append("Top-activating texts:")
    if texts:
        for t in texts[:n_texts]:
            txt = " ".join(str(t.get("text") or t.get("id", "")).split())[:text_chars]
            lines.append(f"- ({t.get('activation', 0):.2f}) {txt}")
    else:
        lines.append("- (none)")
    stats = [
        s for s in card.get("labels") or [] if concept in (s.get("label"), concept_text(s.get("label", "")))
    ]
    stats = stats or (card.get("labels") or [])[:1]
    if stats:
        s = stats[0]
        lines.append(
            f"Statistics for {s.get('label')}: correlation r={s.get('r', float('nan')):.3f}, "
            f"fires on {100 * (s.get('freq_pos') or 0):.0f}% of positives vs "
            f"{100 * (s.get('freq_neg') or 0):.0f}% of negatives"
        )
    lines.append(
        "Answer with one word, GENUINE, CONTEXT or NOISE, then a short label (2-4 words) naming what "
        "the feature detects."
    )
    return "\n".join(lines)


def parse_verdict(text: str) -> str:
    """Map free text to one of :data:`VERDICTS` (always): first verdict word found, else prefixes, else
    NOISE."""
    t = str(text or "").upper()
    hits = [(m.start(), v) for v in VERDICTS for m in [re.search(rf"\b{v}\b", t)] if m]
    if hits:
        return min(hits)[1]
    for prefix, v in (
        ("GENU", "GENUINE"),
        ("CONTEX", "CONTEXT"),
        ("NOIS", "NOISE"),
        ("GEN", "GENUINE"),
        ("CONT", "CONTEXT"),
    ):
        if prefix in t:
            return v
    return "NOISE"


def sanitize_label(text: str, max_words: int = 5) -> str:
    first = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    first = re.sub(r"^(label|reason(ing)?)\s*[:\-]\s*", "", first, flags=re.I)
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'_\-/]*", first)
    return " ".join(words[:max_words]).lower()


def _extract_json(text: str) -> dict[str, Any] | None:
    m = re.search(r"\{.*\}", text or "", flags=re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
        return obj if isinstance(obj, dict) else None
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------------------- judges
class NoJudge:
    name = "none"

    def judge(self, card: dict[str, Any], concept: str) -> JudgeResult:
        return JudgeResult("UNJUDGED", concept, "no judge")


class OpenAIAtomJudge:
    """OpenAI-compatible chat endpoint (base URL, model and key from the environment or arguments)."""

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport=None,
        temperature: float = 0.0,
    ):
        import httpx  # httpx: only for the API judge

        env = os.environ
        self.base_url = (
            base_url
            or env.get("SAFESTEER_JUDGE_BASE_URL")
            or env.get("OPENAI_BASE_URL")
            or "https://api.openai.com/v1"
        ).rstrip("/")
        self.model = model or env.get("SAFESTEER_JUDGE_MODEL") or env.get("OPENAI_MODEL") or "gpt-4o-mini"
        self.api_key = api_key or env.get("SAFESTEER_JUDGE_API_KEY") or env.get("OPENAI_API_KEY")
        if not self.api_key and transport is None and "api.openai.com" in self.base_url:
            raise SafesteerError(
                "the openai judge needs an API key: set SAFESTEER_JUDGE_API_KEY or OPENAI_API_KEY (or "
                "use --judge offline)"
            )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.temperature = temperature

    def judge(self, card: dict[str, Any], concept: str) -> JudgeResult:
        import httpx  # httpx: only for the API judge

        user = (
            card_prompt(card, concept)
            + '\nReply as JSON: {"verdict": "GENUINE|CONTEXT|NOISE", "label": "...", "reasoning": "..."}'
        )
        body = {
            "model": self.model,
            "temperature": self.temperature,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
        }
        try:
            resp = self.client.post("/chat/completions", json=body)
            resp.raise_for_status()
            content = resp.json()["choices"][0]["message"]["content"] or ""
        except httpx.HTTPStatusError as exc:
            raise SafesteerError(
                f"judge endpoint {self.base_url} answered HTTP {exc.response.status_code}; check "
                "SAFESTEER_JUDGE_* settings"
            ) from exc
        except httpx.HTTPError as exc:
            raise SafesteerError(
                f"cannot reach judge endpoint {self.base_url} ({type(exc).__name__}); use --judge "
                "offline here"
            ) from exc
        except (KeyError, IndexError, ValueError) as exc:
            raise SafesteerError(
                f"judge endpoint {self.base_url} returned an unexpected reply; is it OpenAI-compatible?"
            ) from exc
        obj = _extract_json(content)
        if obj is not None:
            verdict = parse_verdict(str(obj.get("verdict", "")))
            label = sanitize_label(str(obj.get("label", ""))) or concept
            reason = " ".join(str(obj.get("reasoning", obj.get("reason", ""))).split())
        else:
            verdict = parse_verdict(content)
            m = re.search(r"label\s*[:\-]\s*(.+)", content, flags=re.I)
            label = sanitize_label(m.group(1)) if m else concept
            reason = " ".join(content.split())[:300]
        return JudgeResult(verdict, label, reason)


class OfflineJudge:
    """Local instruct model with constrained verdict scoring (see the module doc)."""

    name = "offline"

    def __init__(
        self,
        backbone,
        generate_reason: bool = False,
        label_tokens: int = 12,
        reason_tokens: int = 24,
        calibrate: bool = True,
    ):
        if backbone.kind != "causal":
            raise SafesteerError(
                "the offline judge needs a causal instruct model (e.g. smollm2-135m), not a masked LM"
            )
        self.backbone = backbone
        self.generate_reason = generate_reason
        self.label_tokens = label_tokens
        self.reason_tokens = reason_tokens
        self._bias: np.ndarray | None = None
        self.calibrate = calibrate

    def _prefix(self, card: dict[str, Any], concept: str) -> str:
        return self.backbone.chat_prompt(card_prompt(card, concept), system=SYSTEM_PROMPT) + "Verdict:"

    def _option_ids(self) -> list[list[int]]:
        tok = self.backbone.tokenizer
        return [tok(" " + v, add_special_tokens=False)["input_ids"] for v in VERDICTS]

    def verdict_scores(self, prefixes: Sequence[str], use_cache: bool = True) -> np.ndarray:
        """Summed log-prob of each verdict word's tokens (rows × 3) after each prefix.

        With ``use_cache`` the prefix runs once and the three continuations reuse its KV cache;
        otherwise the three full sequences run as one batch (same numbers, 3× the compute).
        """
        import torch  # torch: only for the local-model judge

        bb = self.backbone
        tok = bb.tokenizer
        opts = self._option_ids()
        longest = max(len(o) for o in opts)
        out = np.zeros((len(prefixes), len(VERDICTS)))
        for i, prefix in enumerate(prefixes):
            pre = tok(prefix, add_special_tokens=False)["input_ids"][-(bb.max_length - longest) :]
            scores = None
            if use_cache:
                try:
                    scores = self._scores_cached(pre, opts)
                except Exception:  # models/caches without batch expansion: fall back to full sequences
                    scores = None
            if scores is None:
                seqs = [pre + o for o in opts]
                width = max(len(x) for x in seqs)
                pad = tok.pad_token_id or 0
                ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=bb.device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=bb.device)
                logp = torch.log_softmax(bb.logits(ids, mask).float(), dim=-1)
                scores = []
                for k, o in enumerate(opts):
                    pos = torch.arange(len(pre) - 1, len(pre) - 1 + len(o))
                    scores.append(float(logp[k, pos, torch.tensor(o)].sum()))
            out[i] = scores
        return out

    def _scores_cached(self, pre: list[int], opts: list[list[int]]) -> list[float]:
        import torch  # torch: only for the local-model judge

        bb = self.backbone
        dev = bb.device

        key = (
            "cache" if "cache" in inspect.signature(bb.model.forward).parameters else "past_key_values"
        )  # transformers 5 renamed it
        with torch.inference_mode():
            first = bb.model(input_ids=torch.tensor([pre], device=dev), use_cache=True)
            cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
            lp0 = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
            scores = [float(lp0[o[0]]) for o in opts]
            rest = [o[1:] for o in opts]
            width = max(len(r) for r in rest)
            if width == 0:
                return scores
            cache.batch_repeat_interleave(len(opts))
            pad = bb.tokenizer.pad_token_id or 0
            ids = torch.tensor(
                [
                    [o[0]] + r[:-1] + [pad] * (width - len(r)) if r else [o[0]] + [pad] * (width - 1)
                    for o, r in zip(opts, rest)
                ],
                device=dev,
            )
            mask = torch.ones(len(opts), len(pre) + width, dtype=torch.long, device=dev)
            logits = bb.model(input_ids=ids, attention_mask=mask, use_cache=True, **{key: cache}).logits
            lp = torch.log_softmax(logits.float(), dim=-1)
            for k, r in enumerate(rest):
                for j, t in enumerate(r):
                    scores[k] += float(lp[k, j, t])
        return scores

    def _calibration(self) -> np.ndarray:
        if self._bias is None:
            blank = {"atom": "?", "tokens": [], "top_texts": [], "labels": []}
            self._bias = (
                self.verdict_scores([self._prefix(blank, "N/A")])[0]
                if self.calibrate
                else np.zeros(len(VERDICTS))
            )
        return self._bias

    def short_label(self, card: dict[str, Any], concept: str) -> str:
        """Greedy 'This feature detects …' completion, cleaned to ≤ 5 words (concept if empty)."""
        body = card_prompt(card, concept).rsplit("\n", 1)[0]
        prompt = self.backbone.chat_prompt(
            body + "\nIn a short phrase, what does this feature detect?", system=SYSTEM_PROMPT
        )
        gen = self.backbone.generate([prompt + "This feature detects"], max_new_tokens=self.label_tokens)[0]
        return clean_label(gen) or concept_text(concept)

    def judge(self, card: dict[str, Any], concept: str) -> JudgeResult:
        prefix = self._prefix(card, concept)
        raw = self.verdict_scores([prefix])[0]
        cal = raw - self._calibration()
        probs = np.exp(cal - cal.max())
        probs /= probs.sum()
        verdict = VERDICTS[int(np.argmax(cal))]
        label = self.short_label(card, concept)
        reason = evidence_summary(card, concept)
        if self.generate_reason:
            why = self.backbone.generate(
                [prefix + f" {verdict}\nReason:"], max_new_tokens=self.reason_tokens
            )[0]
            why = " ".join(why.strip().splitlines()[0].split()) if why.strip() else ""
            if why:
                reason = f"{why} ({reason})"
        reason += (
            f" [offline judge {self.backbone.name}: P(GENUINE)={probs[0]:.2f}, "
            f"P(CONTEXT)={probs[1]:.2f}, P(NOISE)={probs[2]:.2f}]"
        )
        return JudgeResult(verdict, label, reason, {v: float(p) for v, p in zip(VERDICTS, probs)})


_LABEL_FILLER = re.compile(
    r"^(?:(?:and|that|it|which|also|this|the|a|an|feature|features|detects?|detecting|identif(?:y|ies)|is|are|whether|if|when|"
    r"(?:the\s+)?(?:presence|use|mention|occurrence|detection|existence)\s+of)\b\s*)+",
    re.I,
)
_STOP = {
    "a",
    "an",
    "the",
    "in",
    "of",
    "and",
    "or",
    "to",
    "for",
    "with",
    "on",
    "that",
    "is",
    "are",
    "it",
    "this",
    "as",
    "by",
}


def clean_label(text: str, max_words: int = 5) -> str:
    """First clause of a generated description, without filler ('and detects the presence of', articles)."""
    t = str(text or "").strip().split("\n")[0]
    t = re.split(r"[.;:!?(\[]|,\s", t)[0].strip().strip("\"'")
    t = _LABEL_FILLER.sub("", t).strip()
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'_\-/]*", t)[:max_words]
    while words and words[-1].lower() in _STOP:
        words.pop()
    label = " ".join(words).lower()
    return (
        label
        if any(w.lower() not in _STOP for w in words) and label not in {"no", "yes", "none", "n/a", "nothing"}
        else ""
    )


def evidence_summary(card: dict[str, Any], concept: str, chars: int = 90) -> str:
    """A one-line, content-bearing reason from the card (used for de-duplication)."""
    parts = [f"concept {concept_text(concept)}"]
    stats = [
        s for s in card.get("labels") or [] if concept in (s.get("label"), concept_text(s.get("label", "")))
    ]
    if stats:
        s = stats[0]
        parts.append(
            f"fires on {100 * (s.get('freq_pos') or 0):.0f}% of positives vs "
            f"{100 * (s.get('freq_neg') or 0):.0f}% of negatives"
        )
    if card.get("tokens"):
        parts.append("promotes " + ", ".join(card["tokens"][:5]))
    texts = card.get("top_texts") or []
    if texts and texts[0].get("text"):
        parts.append("top text: " + " ".join(str(texts[0]["text"]).split())[:chars])
    return "; ".join(parts)


def make_judge(kind: str, backbone=None, **kwargs) -> AtomJudge:
    if kind == "none":
        return NoJudge()
    if kind == "openai":
        return OpenAIAtomJudge(**kwargs)
    if kind == "offline":
        if backbone is None:
            from safesteer.models import load_backbone  # torch: only when a judge model is loaded

            backbone = load_backbone("smollm2-135m")
        return OfflineJudge(backbone, **kwargs)
    raise SafesteerError(f"unknown judge '{kind}'; valid choices: none, offline, openai")
