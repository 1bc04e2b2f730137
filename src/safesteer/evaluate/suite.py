"""The evaluation suite: strategies × metrics, α calibrated on validation, reported on test with CIs.

Metrics (``METRICS``; each a mean over items unless noted, with its "good" direction):

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

Every steered number comes with a 95 % bootstrap CI and a *paired* bootstrap comparison with the
unsteered model on the same test items (Δ, its CI, a two-sided p-value). Per strategy, α is chosen
on the validation split (``train`` hash split of each dataset) by :mod:`.calibrate`; the ``random``
control is not calibrated — it uses the largest α chosen for any other strategy, so that it
controls for the *size* of the intervention. α is given in units of the layer's median token norm
(``alpha_unit="norm"``, measured on validation WikiText passages) or in raw units.

The entanglement matrix holds, for each strategy and metric, z = Δ / SE(Δ) (SE of the paired
bootstrap): how clearly a strategy moves each metric, whatever its units.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.evaluate import bias as B
from safesteer.evaluate.calibrate import DEFAULT_BUDGET, Calibration, calibrate
from safesteer.evaluate.choice import answer_tokens, forced_choice
from safesteer.evaluate.efficacy import probe_layer, probe_probabilities
from safesteer.evaluate.fluency import fluency as fluency_scores, wiki_passages
from safesteer.evaluate.generation import generate_answers, refusal_flags
from safesteer.evaluate.stats import bootstrap_ci, bootstrap_p_value, ensemble_bootstrap, format_ci, paired_bootstrap
from safesteer.io import atomic_path, write_json
from safesteer.steering.strategies import Direction, DirectionSet, Intervention


@dataclass(frozen=True)
class MetricSpec:
    name: str
    group: str  # the scoring pass that produces it
    better: str  # lower | higher | fifty
    label: str
    causal_only: bool = False


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("harm_probe", "eff_harm", "lower", "harm probe P(harmful), harmful prompts"),
    MetricSpec("tox_probe", "eff_tox", "lower", "toxicity probe P(toxic), toxic texts"),
    MetricSpec("yes_harmful", "choice_harmful", "lower", "P(Yes), harmful prompts"),
    MetricSpec("yes_toxic", "choice_toxic", "lower", "P(Yes), toxic statements"),
    MetricSpec("no_safe", "choice_safe", "lower", "P(No), XSTest safe prompts (over-refusal)"),
    MetricSpec("refusal_harmful", "gen_harmful", "higher", "refusal rate, harmful prompts", True),
    MetricSpec("refusal_safe", "gen_safe", "lower", "refusal rate, XSTest safe prompts", True),
    MetricSpec("fluency", "fluency", "higher", "fluency (mean log-prob per token)"),
    MetricSpec("crows", "crows", "fifty", "CrowS-Pairs metric score"),
    MetricSpec("stereoset_lms", "stereoset", "higher", "StereoSet LMS"),
    MetricSpec("stereoset_ss", "stereoset", "fifty", "StereoSet SS"),
    MetricSpec("stereoset_icat", "stereoset", "higher", "StereoSet ICAT"),
)}

DEFAULT_METRICS = tuple(m for m in METRICS if not METRICS[m].causal_only)
DEFAULT_ALPHAS = (-1.0, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1.0)
"""α grid in norm units. Negative values (toward the unsafe direction) are included on purpose: on chat
models adding a harm direction can *raise* refusals (Arditi et al. 2024), so the sign is left to the
validation data; the report states the chosen α and its sign."""
SAFETY_OBJECTIVES = ("yes_harmful", "harm_probe", "tox_probe", "yes_toxic")


@dataclass
class SuiteConfig:
    """What to run. ``alphas`` in ``alpha_unit`` (``norm``: × the layer's median token norm)."""

    layer: int
    strategies: list[str] | None = None
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # grid of SAE clamping strategies
    alpha_unit: str = "norm"
    calibrate: bool = True
    objective: str = "yes_harmful"
    budget: float = DEFAULT_BUDGET
    random_alpha: str | float = "max"  # "max": largest chosen |α|; "each": one random row per chosen α; or a number
    max_prompts: int = 100
    max_bias: int | None = None  # rows of CrowS / StereoSet (None: max_prompts)
    calib_prompts: int = 40
    generation: bool = False  # refusal_* metrics run only when True (and the LM is causal)
    max_new_tokens: int = 48
    n_boot: int = 2000
    ci_method: str = "percentile"
    seed: int = 0
    batch_size: int = 16
    data_dir: str | None = None
    source: str = "auto"

    def check(self, kind: str) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise SafesteerError(f"unknown metric(s) {', '.join(unknown)}; valid choices: {', '.join(METRICS)}")
        if self.alpha_unit not in ("norm", "raw"):
            raise SafesteerError(f"alpha unit must be 'norm' or 'raw', got '{self.alpha_unit}'")
        if self.objective not in SAFETY_OBJECTIVES:
            raise SafesteerError(f"unknown calibration objective '{self.objective}'; valid choices: {', '.join(SAFETY_OBJECTIVES)}")
        if not self.alphas:
            raise SafesteerError("no alpha given; pass at least one")
        if not isinstance(self.random_alpha, (int, float)) and self.random_alpha not in ("max", "each"):
            raise SafesteerError(f"random alpha must be 'max', 'each' or a number, got {self.random_alpha!r}")
        if self.max_prompts < 2:
            raise SafesteerError("--max-prompts must be at least 2 (CIs need several items)")


# ------------------------------------------------------------------------------------------ data

HARMFUL_SETS = ("advbench", "donotanswer")


def _load(name: str, split: str, cfg: SuiteConfig, max_rows: int | None):
    from safesteer.data import load

    return list(load(name, split=split, source=cfg.source, data_dir=cfg.data_dir, max_rows=max_rows, seed=cfg.seed))


def load_eval_data(group: str, split: str, cfg: SuiteConfig, n: int) -> Any:
    """Items for one scoring group from one split (``train`` = validation, ``test`` = report)."""
    half = max(1, n // 2)
    if group in ("eff_harm", "choice_harmful", "gen_harmful"):
        out: list[str] = []
        for name in HARMFUL_SETS:
            out += [r.text for r in _load(name, split, cfg, half)]
        return out[:n]
    if group in ("eff_tox", "choice_toxic"):
        rtp = [r.text for r in _load("realtoxicityprompts", split, cfg, None) if r.labels.get("toxic") == 1]
        tg = [r.text for r in _load("toxigen", split, cfg, None) if r.labels.get("toxic") == 1]
        rng = np.random.default_rng(cfg.seed)
        pick = lambda xs, k: [xs[i] for i in sorted(rng.permutation(len(xs))[:k])]  # noqa: E731
        return (pick(rtp, half) + pick(tg, n - min(half, len(rtp))))[:n]
    if group in ("choice_safe", "gen_safe"):
        safe = [r.text for r in _load("xstest", split, cfg, None) if r.labels.get("unsafe") == 0]
        return safe[:n]
    if group == "fluency":
        return wiki_passages((r.text for r in _load("wikipedia", split, cfg, None)), limit=n)
    if group == "crows":
        return B.crows_pairs_from_records(_load("crows_pairs", split, cfg, n))
    if group == "stereoset":
        return B.stereoset_from_records(_load("stereoset", split, cfg, n))
    raise SafesteerError(f"unknown metric group {group}")


# ------------------------------------------------------------------------------------ evaluation

@dataclass
class GroupResult:
    """Per-item outputs of one scoring pass."""

    group: str
    items: dict[str, np.ndarray]  # metric -> per-item values (mean metrics) or scores
    extra: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """Runs metric groups on one backbone, caching the unsteered passes."""

    def __init__(self, backbone: Any, cfg: SuiteConfig, probes: dict[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None):
        self.bb = backbone
        self.cfg = cfg
        self.probes = dict(probes or {})
        self.progress = progress or (lambda msg: None)
        self._data: dict[tuple[str, str, int], Any] = {}
        self._base: dict[tuple[str, str, int], GroupResult] = {}
        self._answers = None

    def data(self, group: str, split: str, n: int) -> Any:
        key = (group, split, n)
        if key not in self._data:
            self._data[key] = load_eval_data(group, split, self.cfg, n)
            if not self._data[key]:
                raise SafesteerError(f"no {group} items in the {split} split; check the data sources")
        return self._data[key]

    def groups_for(self, metrics: Sequence[str]) -> list[str]:
        out: list[str] = []
        for m in metrics:
            spec = METRICS[m]
            if spec.causal_only and (self.bb.kind != "causal" or not self.cfg.generation):
                continue
            if spec.group == "eff_harm" and "harm" not in self.probes:
                continue
            if spec.group == "eff_tox" and "tox" not in self.probes:
                continue
            if spec.group not in out:
                out.append(spec.group)
        return out

    def run_group(self, group: str, split: str, n: int, iv: Intervention | None) -> GroupResult:
        base = iv is None or iv.is_identity
        key = (group, split, n)
        if base and key in self._base:
            return self._base[key]
        items = self.data(group, split, n)
        res = self._score(group, items, iv)
        if base:
            self._base[key] = res
        return res

    def _score(self, group: str, items: Any, iv: Intervention | None) -> GroupResult:
        bs = self.cfg.batch_size
        if group in ("eff_harm", "eff_tox"):
            probe = self.probes["harm" if group == "eff_harm" else "tox"]
            layer = probe_layer(probe, self.cfg.layer)
            p = probe_probabilities(self.bb, items, probe, layer, iv, batch_size=bs)
            return GroupResult(group, {"harm_probe" if group == "eff_harm" else "tox_probe": p})
        if group.startswith("choice_"):
            kind = group.split("_", 1)[1]
            if self._answers is None:
                self._answers = answer_tokens(self.bb.tokenizer)
            p, mass = forced_choice(self.bb, items, kind, iv, batch_size=bs, answers=self._answers, return_mass=True)
            metric = {"harmful": "yes_harmful", "toxic": "yes_toxic", "safe": "no_safe"}[kind]
            return GroupResult(group, {metric: (1.0 - p) if kind == "safe" else p},
                               {"p_yes": p, "answer_mass": float(np.mean(mass))})
        if group.startswith("gen_"):
            answers = generate_answers(self.bb, items, iv, max_new_tokens=self.cfg.max_new_tokens, batch_size=max(1, bs // 2))
            metric = "refusal_harmful" if group == "gen_harmful" else "refusal_safe"
            return GroupResult(group, {metric: refusal_flags(answers)}, {"answers": answers, "prompts": list(items)})
        if group == "fluency":
            f = fluency_scores(self.bb, items, iv, batch_size=bs)
            return GroupResult(group, {"fluency": f.per_token}, {"corpus_nll": f.corpus_nll(), "n_tokens": int(f.n_tokens.sum())})
        if group == "crows":
            s = B.crows_scores(self.bb, items, iv, batch_size=max(bs, 32))
            hit, _ = B.crows_hits(s, self.bb.kind)
            return GroupResult(group, {"crows": 100.0 * hit}, {"scores": s, "summary": B.crows_summary(items, s, self.bb.kind)})
        if group == "stereoset":
            s = B.stereoset_scores(self.bb, items, iv, batch_size=max(bs, 32))
            return GroupResult(group, {"stereoset_lms": s, "stereoset_ss": s, "stereoset_icat": s},
                               {"metrics": B.stereoset_metrics(items, s)})
        raise SafesteerError(f"unknown metric group {group}")

    # ------------------------------------------------------------------ comparisons
    def compare(self, metric: str, base: GroupResult, steered: GroupResult | Sequence[GroupResult], items: Any) -> dict[str, Any]:
        """Value with CI, baseline, paired Δ with CI and p-value, for one metric.

        ``steered`` may be a list (an ensemble such as the random control): the value is the mean
        over members and the CIs come from the two-level bootstrap (members × items).
        """
        cfg = self.cfg
        members = list(steered) if isinstance(steered, (list, tuple)) else [steered]
        a = base.items[metric]
        if metric.startswith("stereoset_"):
            which = metric.split("_", 1)[1]
            stat_a, n = B.stereoset_stat(items, a, which)
            stats_b = [B.stereoset_stat(items, m.items[metric], which)[0] for m in members]
        else:
            n = len(a)
            stat_a = lambda idx, a=a: float(a[idx].mean())  # noqa: E731
            stats_b = [lambda idx, b=m.items[metric]: float(b[idx].mean()) for m in members]
        all_idx = np.arange(n)
        if len(members) == 1:
            if metric.startswith("stereoset_"):
                ci = bootstrap_ci(stat=stats_b[0], n=n, n_boot=cfg.n_boot, method=cfg.ci_method, seed=cfg.seed)
                pair = paired_bootstrap(stat=lambda idx, w: (stat_a if w == 0 else stats_b[0])(idx), n=n,
                                        n_boot=cfg.n_boot, method=cfg.ci_method, seed=cfg.seed)
            else:
                b = members[0].items[metric]
                ci = bootstrap_ci(b, n_boot=cfg.n_boot, method=cfg.ci_method, seed=cfg.seed)
                pair = paired_bootstrap(a, b, n_boot=cfg.n_boot, method=cfg.ci_method, seed=cfg.seed)
            diff, p_value, baseline = pair.diff, pair.p_value, pair.baseline
        else:
            ci, _ = ensemble_bootstrap(stats_b, n, cfg.n_boot, seed=cfg.seed)
            diffs = [lambda idx, sb=sb: sb(idx) - stat_a(idx) for sb in stats_b]
            diff, boots = ensemble_bootstrap(diffs, n, cfg.n_boot, seed=cfg.seed)
            p_value, baseline = bootstrap_p_value(boots), float(stat_a(all_idx))
        se = diff.se
        z = diff.estimate / se if se and np.isfinite(se) and se > 0 else 0.0
        return {
            "metric": metric, "value": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "n": ci.n,
            "baseline": baseline, "delta": diff.estimate, "delta_low": diff.low, "delta_high": diff.high,
            "delta_se": se, "p_value": p_value, "z": float(z), "members": len(members),
        }


# -------------------------------------------------------------------------------------- the suite

def reference_norm(backbone: Any, layer: int, texts: Sequence[str], max_texts: int = 16) -> float:
    """Median L2 norm of layer-``layer`` token vectors over ``texts`` (real tokens only)."""
    import torch

    enc = backbone.tokenize(list(texts)[:max_texts], max_length=128)
    h = backbone.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer]
    norms = h.float().norm(dim=-1)[enc.attention_mask.bool()]
    return float(torch.median(norms))


@dataclass
class SuiteResult:
    rows: list[dict[str, Any]]
    calibrations: dict[str, Calibration]
    baseline: dict[str, Any]
    extras: dict[str, Any]
    config: dict[str, Any]
    scale: float

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def entanglement(self, key: str = "z"):
        """strategies × metrics matrix of ``key`` (``z`` = Δ/SE(Δ) or ``delta``)."""
        df = self.table()
        df = df[df["strategy"] != "unsteered"]
        return df.pivot_table(index="strategy", columns="metric", values=key, sort=False)


def run_suite(
    backbone: Any,
    directions: DirectionSet,
    cfg: SuiteConfig,
    probes: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    interventions: dict[str, Callable[[float], Intervention]] | None = None,
) -> SuiteResult:
    """Calibrate α per strategy on validation, evaluate every metric on test, compare to unsteered.

    ``interventions`` (optional): extra strategies as ``name -> (alpha -> Intervention)`` (e.g. SAE
    clamping with λ = alpha); they are calibrated and reported like the direction strategies.

    Every steered pass reuses the unsteered pass's blocks ``0..layer`` over the same items
    (:meth:`Backbone.prefix_cache`), which roughly halves the cost of a mid-layer evaluation.
    """
    cache = getattr(backbone, "prefix_cache", None)
    with (cache(cfg.layer) if cache is not None else contextlib.nullcontext()):
        return _run_suite(backbone, directions, cfg, probes, progress, interventions)


def _run_suite(backbone, directions, cfg, probes, progress, interventions) -> SuiteResult:
    cfg.check(backbone.kind)
    say = progress or (lambda msg: None)
    ev = Evaluator(backbone, cfg, probes, say)
    names = list(cfg.strategies) if cfg.strategies else directions.names()
    for n in names:
        if n not in directions and not (interventions and n in interventions):
            directions[n]  # raises the one-line error listing what exists
    if interventions:
        names += [n for n in interventions if n not in names and (not cfg.strategies or n in cfg.strategies)]
    groups = ev.groups_for(cfg.metrics)
    if not groups:
        raise SafesteerError("no metric can run here (probe metrics need --probe-tox/--probe-harm; generation needs a causal LM)")
    n_bias = cfg.max_bias or cfg.max_prompts

    def n_for(group: str) -> int:
        return n_bias if group in ("crows", "stereoset") else cfg.max_prompts

    # α scale
    scale = 1.0
    if cfg.alpha_unit == "norm":
        scale = reference_norm(backbone, cfg.layer, ev.data("fluency", "train", max(4, cfg.calib_prompts)))
        say(f"alpha unit: median token norm at layer {cfg.layer} = {scale:.2f}")

    def make_ivs(name: str, alpha: float) -> list[Intervention]:
        if interventions and name in interventions:
            return [interventions[name](alpha)]
        d: Direction = directions[name.split("@", 1)[0]]
        return Intervention.ensemble(d, alpha, scale, layer=cfg.layer)

    def run_members(group: str, split: str, n: int, ivs: list[Intervention]) -> list[GroupResult]:
        return [ev.run_group(group, split, n, iv) for iv in ivs]

    # calibration on validation
    obj_group = METRICS[cfg.objective].group
    calibrations: dict[str, Calibration] = {}
    nc = cfg.calib_prompts

    def measure(name: str):
        def m(alpha: float) -> tuple[float, float]:
            ivs = make_ivs(name, alpha)
            s = float(np.mean([np.mean(r.items[cfg.objective]) for r in run_members(obj_group, "train", nc, ivs)]))
            f = float(np.mean([np.mean(r.items["fluency"]) for r in run_members("fluency", "train", nc, ivs)]))
            return s, f
        return m

    def grid(name: str) -> list[float]:
        return list(cfg.lambdas) if interventions and name in interventions else list(cfg.alphas)

    base_val: tuple[float, float] | None = None
    for name in names:
        g = grid(name)
        if name == "random" or not (cfg.calibrate and len(g) > 1):
            continue
        if base_val is None:
            if obj_group not in ev.groups_for([cfg.objective]):
                raise SafesteerError(f"calibration objective '{cfg.objective}' cannot run here (its probe is missing)")
            base_val = (float(np.mean(ev.run_group(obj_group, "train", nc, None).items[cfg.objective])),
                        float(np.mean(ev.run_group("fluency", "train", nc, None).items["fluency"])))
        say(f"calibrating {name} on validation ({len(g)} values)")
        calibrations[name] = calibrate(name, g, measure(name), cfg.budget, base_val, say)
    for name in names:
        if name in calibrations or name == "random":
            continue
        calibrations[name] = Calibration(name, float(grid(name)[0]), cfg.budget, [], "fixed value (no calibration)")
    if "random" in names:
        chosen = [c.alpha for n, c in calibrations.items() if c.alpha != 0.0 and not (interventions and n in interventions)]
        fallback = float(max(cfg.alphas, key=abs) if len(cfg.alphas) > 1 else cfg.alphas[0])
        if isinstance(cfg.random_alpha, (int, float)):
            calibrations["random"] = Calibration("random", float(cfg.random_alpha), cfg.budget, [], "control: alpha given")
        elif cfg.random_alpha == "each" and len(set(chosen)) > 1:
            names.remove("random")
            for a in sorted(set(chosen), key=lambda x: (abs(x), x)):
                key = f"random@{a:g}"
                names.append(key)
                calibrations[key] = Calibration(key, a, cfg.budget, [], "control at an alpha chosen for another strategy")
        elif chosen:
            calibrations["random"] = Calibration("random", max(chosen, key=abs), cfg.budget, [],
                                                 "control: the largest |alpha| chosen for any other strategy")
        else:
            calibrations["random"] = Calibration("random", fallback, cfg.budget, [], "control: the grid's largest |alpha|")

    # test split: baseline, then each strategy
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {"strategies": {}}
    base_results: dict[str, GroupResult] = {}
    say("scoring the unsteered model on the test split")
    for g in groups:
        base_results[g] = ev.run_group(g, "test", n_for(g), None)
    baseline: dict[str, Any] = {"groups": {g: _jsonable_extra(r.extra) for g, r in base_results.items()}}
    for g, r in base_results.items():
        items = ev.data(g, "test", n_for(g))
        for metric in r.items:
            if metric not in cfg.metrics:
                continue
            row = ev.compare(metric, r, r, items)
            rows.append({"strategy": "unsteered", "alpha": 0.0, "alpha_raw": 0.0, **row})
    for name in names:
        cal = calibrations[name]
        ivs = make_ivs(name, cal.alpha)
        raw = ivs[0].alpha
        say(f"evaluating {name} at alpha={cal.alpha:g} on the test split" + (f" ({len(ivs)} directions)" if len(ivs) > 1 else ""))
        extras["strategies"][name] = {"alpha": cal.alpha, "alpha_raw": raw, "members": len(ivs), "groups": {}}
        for g in groups:
            res = run_members(g, "test", n_for(g), ivs) if cal.alpha != 0.0 else [base_results[g]]
            items = ev.data(g, "test", n_for(g))
            extras["strategies"][name]["groups"][g] = _merge_extras([r.extra for r in res])
            for metric in res[0].items:
                if metric not in cfg.metrics:
                    continue
                row = ev.compare(metric, base_results[g], res, items)
                rows.append({"strategy": name, "alpha": cal.alpha, "alpha_raw": raw, **row})
    conf = asdict(cfg)
    conf.update({"model_kind": backbone.kind, "model": getattr(backbone, "name", "?"), "alpha_scale": scale})
    return SuiteResult(rows, calibrations, baseline, extras, conf, scale)


def _merge_extras(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """One member: its extras; an ensemble: per-member extras, answers concatenated."""
    if len(extras) == 1:
        return _jsonable_extra(extras[0])
    out: dict[str, Any] = {"members": [_jsonable_extra({k: v for k, v in e.items() if k not in ("answers", "prompts")}) for e in extras]}
    if all("answers" in e for e in extras):
        out["answers"] = [a for e in extras for a in e["answers"]]
        out["prompts"] = [p for e in extras for p in e["prompts"]]
    return out


def _jsonable_extra(extra: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in extra.items():
        if k in ("scores", "p_yes"):
            continue  # per-item arrays stay out of the JSON summary
        out[k] = v
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def write_outputs(result: SuiteResult, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """results.csv (long), table.csv (strategy × metric, "value [lo, hi]" and Δ), results.json,
    entanglement.csv, calibration.json, generation samples, and the plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = result.table()
    paths: dict[str, Path] = {}
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    paths["results_csv"] = out / "results.csv"

    wide = {}
    for _, r in df.iterrows():
        row = wide.setdefault(r["strategy"], {"strategy": r["strategy"], "alpha": r["alpha"]})
        row[r["metric"]] = format_ci(r["value"], r["ci_low"], r["ci_high"])
        if r["strategy"] != "unsteered":
            row[f"{r['metric']}_delta"] = format_ci(r["delta"], r["delta_low"], r["delta_high"], signed=True) + f" p={r['p_value']:.3g}"
    import pandas as pd

    with atomic_path(out / "table.csv") as tmp:
        pd.DataFrame(list(wide.values())).to_csv(tmp, index=False)
    paths["table_csv"] = out / "table.csv"

    ent = result.entanglement("z")
    with atomic_path(out / "entanglement.csv") as tmp:
        ent.to_csv(tmp)
    paths["entanglement_csv"] = out / "entanglement.csv"

    samples = {}
    for name, info in result.extras.get("strategies", {}).items():
        for g, extra in info.get("groups", {}).items():
            if "answers" in extra:
                samples.setdefault(name, []).extend(
                    {"group": g, "prompt": p, "answer": a} for p, a in zip(extra["prompts"], extra["answers"]))
    for g, extra in result.baseline.get("groups", {}).items():
        if "answers" in extra:
            samples.setdefault("unsteered", []).extend(
                {"group": g, "prompt": p, "answer": a} for p, a in zip(extra["prompts"], extra["answers"]))
    if samples:
        sdir = out / "samples"
        sdir.mkdir(exist_ok=True)
        for name, rows in samples.items():
            fname = sdir / f"generations_{name.replace('+', '_plus_')}.jsonl"
            with atomic_path(fname) as tmp:
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths["samples"] = sdir

    def strip_answers(d: dict) -> dict:
        return {k: ({gk: {kk: vv for kk, vv in gv.items() if kk not in ("answers", "prompts")} for gk, gv in v.items()}
                    if k == "groups" else v) for k, v in d.items()}

    payload = {
        "config": result.config,
        "alpha_scale": result.scale,
        "rows": result.rows,
        "calibration": {k: v.as_dict() for k, v in result.calibrations.items()},
        "baseline": strip_answers(result.baseline),
        "strategies": {k: strip_answers(v) for k, v in result.extras.get("strategies", {}).items()},
        "entanglement_z": {s: {m: v for m, v in row.items()} for s, row in ent.to_dict(orient="index").items()},
    }
    write_json(out / "results.json", _clean(payload))
    write_json(out / "calibration.json", _clean(payload["calibration"]))
    paths["results_json"] = out / "results.json"
    if plots:
        from safesteer.evaluate.plots import plot_all

        paths.update(plot_all(result, out / "plots"))
    return paths
