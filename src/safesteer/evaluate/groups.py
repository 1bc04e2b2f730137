"""The built-in metric groups (registered in :mod:`safesteer.evaluate.registry` on import).

=================  ========================================================  ==================
``harm_probe``     mean harm-probe P(harmful) on harmful prompts (ΔP)         lower is safer
``tox_probe``      mean toxicity-probe P(toxic) on toxic texts (ΔP)           lower is safer
``yes_harmful``    forced-choice P(Yes) "would you help" on harmful prompts   lower is safer
``yes_toxic``      forced-choice P(Yes) "do you agree" on toxic statements    lower is safer
``no_safe``        forced-choice P(No) on XSTest *safe* prompts               lower (over-refusal)
``refusal_harmful``  refusal-phrase rate of greedy answers, harmful (causal)  higher is safer
``refusal_safe``   refusal-phrase rate on XSTest safe prompts (causal)        lower (over-refusal)
``fluency``        per-token log-prob: PLL (masked) / −NLL on WikiText       higher is better
``crows``          CrowS-Pairs metric score (% pairs more-stereotyping wins)  50 is unbiased
``stereoset_lms``  StereoSet language-model score                            higher is better
``stereoset_ss``   StereoSet stereotype score                                 50 is unbiased
``stereoset_icat`` StereoSet ICAT                                             higher is better
=================  ========================================================  ==================
"""

from __future__ import annotations

from typing import Any

import numpy as np

from safesteer.data import load
from safesteer.evaluate import bias as B
from safesteer.evaluate.choice import answer_tokens, forced_choice
from safesteer.evaluate.efficacy import probe_layer, probe_probabilities
from safesteer.evaluate.fluency import fluency as fluency_scores
from safesteer.evaluate.fluency import wiki_passages
from safesteer.evaluate.generation import generate_answers, refusal_flags
from safesteer.evaluate.registry import GroupResult, MetricGroup, MetricSpec, register

HARMFUL_SETS = ("advbench", "donotanswer")


def load_rows(name: str, split: str, cfg: Any, max_rows: int | None) -> list:
    """Records of one dataset split, with the suite's source, data folder and seed."""
    return list(
        load(name, split=split, source=cfg.source, data_dir=cfg.data_dir, max_rows=max_rows, seed=cfg.seed)
    )


def harmful_prompts(split: str, n: int, cfg: Any) -> list[str]:
    out: list[str] = []
    for name in HARMFUL_SETS:
        out += [r.text for r in load_rows(name, split, cfg, max(1, n // 2))]
    return out[:n]


def toxic_texts(split: str, n: int, cfg: Any) -> list[str]:
    half = max(1, n // 2)
    rtp = [r.text for r in load_rows("realtoxicityprompts", split, cfg, None) if r.labels.get("toxic") == 1]
    tg = [r.text for r in load_rows("toxigen", split, cfg, None) if r.labels.get("toxic") == 1]
    rng = np.random.default_rng(cfg.seed)
    pick = lambda xs, k: [xs[i] for i in sorted(rng.permutation(len(xs))[:k])]  # noqa: E731
    return (pick(rtp, half) + pick(tg, n - min(half, len(rtp))))[:n]


def safe_prompts(split: str, n: int, cfg: Any) -> list[str]:
    return [r.text for r in load_rows("xstest", split, cfg, None) if r.labels.get("unsafe") == 0][:n]


# ------------------------------------------------------------------------------ probe efficacy


class ProbeGroup(MetricGroup):
    """Mean P(concept) of a saved probe on the steered pooled vector (needs that probe)."""

    probe_key = ""

    def available(self, ctx: Any) -> bool:
        return self.probe_key in ctx.probes

    def score(self, ctx: Any, items: Any, iv: Any) -> GroupResult:
        probe = ctx.probes[self.probe_key]
        p = probe_probabilities(
            ctx.bb, items, probe, probe_layer(probe, ctx.cfg.layer), iv, batch_size=ctx.cfg.batch_size
        )
        return GroupResult(self.name, {self.metrics[0].name: p})


@register
class HarmProbe(ProbeGroup):
    name, probe_key = "eff_harm", "harm"
    metrics = (MetricSpec("harm_probe", "eff_harm", "lower", "harm probe P(harmful), harmful prompts"),)

    def load(self, split, n, cfg):
        return harmful_prompts(split, n, cfg)


@register
class ToxProbe(ProbeGroup):
    name, probe_key = "eff_tox", "tox"
    metrics = (MetricSpec("tox_probe", "eff_tox", "lower", "toxicity probe P(toxic), toxic texts"),)

    def load(self, split, n, cfg):
        return toxic_texts(split, n, cfg)


# ------------------------------------------------------------------------------ forced choice


class ChoiceGroup(MetricGroup):
    """Forced-choice P(Yes) (or P(No) for safe prompts) of a templated question."""

    kind = ""

    def score(self, ctx: Any, items: Any, iv: Any) -> GroupResult:
        if "answers" not in ctx.cache:
            ctx.cache["answers"] = answer_tokens(ctx.bb.tokenizer)
        p, mass = forced_choice(
            ctx.bb,
            items,
            self.kind,
            iv,
            batch_size=ctx.cfg.batch_size,
            answers=ctx.cache["answers"],
            return_mass=True,
        )
        return GroupResult(
            self.name,
            {self.metrics[0].name: (1.0 - p) if self.kind == "safe" else p},
            {"p_yes": p, "answer_mass": float(np.mean(mass))},
        )


@register
class ChoiceHarmful(ChoiceGroup):
    name, kind = "choice_harmful", "harmful"
    metrics = (MetricSpec("yes_harmful", "choice_harmful", "lower", "P(Yes), harmful prompts"),)

    def load(self, split, n, cfg):
        return harmful_prompts(split, n, cfg)


@register
class ChoiceToxic(ChoiceGroup):
    name, kind = "choice_toxic", "toxic"
    metrics = (MetricSpec("yes_toxic", "choice_toxic", "lower", "P(Yes), toxic statements"),)

    def load(self, split, n, cfg):
        return toxic_texts(split, n, cfg)


@register
class ChoiceSafe(ChoiceGroup):
    name, kind = "choice_safe", "safe"
    metrics = (MetricSpec("no_safe", "choice_safe", "lower", "P(No), XSTest safe prompts (over-refusal)"),)

    def load(self, split, n, cfg):
        return safe_prompts(split, n, cfg)


# ------------------------------------------------------------------------------ generation


class GenerationGroup(MetricGroup):
    """Refusal-phrase rate of greedy answers (causal LMs, only with ``cfg.generation``)."""

    def available(self, ctx: Any) -> bool:
        return ctx.bb.kind == "causal" and bool(ctx.cfg.generation)

    def score(self, ctx: Any, items: Any, iv: Any) -> GroupResult:
        answers = generate_answers(
            ctx.bb,
            items,
            iv,
            max_new_tokens=ctx.cfg.max_new_tokens,
            batch_size=max(1, ctx.cfg.batch_size // 2),
        )
        return GroupResult(
            self.name,
            {self.metrics[0].name: refusal_flags(answers)},
            {"answers": answers, "prompts": list(items)},
        )


@register
class GenHarmful(GenerationGroup):
    name = "gen_harmful"
    metrics = (MetricSpec("refusal_harmful", "gen_harmful", "higher", "refusal rate, harmful prompts", True),)

    def load(self, split, n, cfg):
        return harmful_prompts(split, n, cfg)


@register
class GenSafe(GenerationGroup):
    name = "gen_safe"
    metrics = (MetricSpec("refusal_safe", "gen_safe", "lower", "refusal rate, XSTest safe prompts", True),)

    def load(self, split, n, cfg):
        return safe_prompts(split, n, cfg)


# ------------------------------------------------------------------------------ fluency and bias


@register
class Fluency(MetricGroup):
    name = "fluency"
    metrics = (MetricSpec("fluency", "fluency", "higher", "fluency (mean log-prob per token)"),)

    def load(self, split, n, cfg):
        return wiki_passages((r.text for r in load_rows("wikipedia", split, cfg, None)), limit=n)

    def score(self, ctx: Any, items: Any, iv: Any) -> GroupResult:
        f = fluency_scores(ctx.bb, items, iv, batch_size=ctx.cfg.batch_size)
        return GroupResult(
            self.name,
            {"fluency": f.per_token},
            {"corpus_nll": f.corpus_nll(), "n_tokens": int(f.n_tokens.sum())},
        )


class BiasGroup(MetricGroup):
    def size(self, cfg: Any) -> int:
        return int(cfg.max_bias or cfg.max_prompts)


@register
class Crows(BiasGroup):
    name = "crows"
    metrics = (MetricSpec("crows", "crows", "fifty", "CrowS-Pairs metric score"),)

    def load(self, split, n, cfg):
        return B.crows_pairs_from_records(load_rows("crows_pairs", split, cfg, n))

    def score(self, ctx: Any, items: Any, iv: Any) -> GroupResult:
        s = B.crows_scores(ctx.bb, items, iv, batch_size=max(ctx.cfg.batch_size, 32))
        hit, _ = B.crows_hits(s, ctx.bb.kind)
        return GroupResult(
            self.name,
            {"crows": 100.0 * hit},
            {"scores": s, "summary": B.crows_summary(items, s, ctx.bb.kind)},
        )


@register
class StereoSet(BiasGroup):
    name = "stereoset"
    metrics = (
        MetricSpec("stereoset_lms", "stereoset", "higher", "StereoSet LMS"),
        MetricSpec("stereoset_ss", "stereoset", "fifty", "StereoSet SS"),
        MetricSpec("stereoset_icat", "stereoset", "higher", "StereoSet ICAT"),
    )

    def load(self, split, n, cfg):
        return B.stereoset_from_records(load_rows("stereoset", split, cfg, n))

    def score(self, ctx: Any, items: Any, iv: Any) -> GroupResult:
        s = B.stereoset_scores(ctx.bb, items, iv, batch_size=max(ctx.cfg.batch_size, 32))
        return GroupResult(
            self.name,
            {"stereoset_lms": s, "stereoset_ss": s, "stereoset_icat": s},
            {"metrics": B.stereoset_metrics(items, s)},
        )

    def statistic(self, metric: str, items: Any, values: np.ndarray):
        return B.stereoset_stat(items, values, metric.split("_", 1)[1])


__all__ = ["HARMFUL_SETS", "harmful_prompts", "load_rows", "safe_prompts", "toxic_texts"]
