"""Evaluation of steering: efficacy ΔP, forced-choice compliance and over-refusal, generation refusal
rates, fluency, CrowS-Pairs and StereoSet — each with bootstrap CIs and paired comparisons.

Every metric function takes a backbone, its items and an optional
:class:`~safesteer.steering.Intervention` (None = unsteered) and returns per-item values;
:func:`~safesteer.evaluate.suite.run_suite` ties them to calibration (α on validation) and
reporting (test split), :mod:`~safesteer.evaluate.plots` draws the figures.
"""

from __future__ import annotations

from safesteer.lazy import lazy_exports

# public names, loaded on first use (importing one submodule, e.g. a config section, stays light)
_EXPORTS = {
    "CrowsPair": "safesteer.evaluate.bias",
    "StereoExample": "safesteer.evaluate.bias",
    "crows_pairs_from_records": "safesteer.evaluate.bias",
    "crows_scores": "safesteer.evaluate.bias",
    "crows_summary": "safesteer.evaluate.bias",
    "stereoset_from_records": "safesteer.evaluate.bias",
    "stereoset_metrics": "safesteer.evaluate.bias",
    "stereoset_scores": "safesteer.evaluate.bias",
    "Calibration": "safesteer.evaluate.calibrate",
    "calibrate": "safesteer.evaluate.calibrate",
    "answer_tokens": "safesteer.evaluate.choice",
    "forced_choice": "safesteer.evaluate.choice",
    "efficacy": "safesteer.evaluate.efficacy",
    "probe_probabilities": "safesteer.evaluate.efficacy",
    "FluencyScores": "safesteer.evaluate.fluency",
    "fluency": "safesteer.evaluate.fluency",
    "mean_token_nll": "safesteer.evaluate.fluency",
    "pseudo_log_likelihood": "safesteer.evaluate.fluency",
    "wiki_passages": "safesteer.evaluate.fluency",
    "REFUSAL_PHRASES": "safesteer.evaluate.generation",
    "generate_answers": "safesteer.evaluate.generation",
    "is_refusal": "safesteer.evaluate.generation",
    "refusal_rate": "safesteer.evaluate.generation",
    "GroupResult": "safesteer.evaluate.registry",
    "MetricGroup": "safesteer.evaluate.registry",
    "MetricSpec": "safesteer.evaluate.registry",
    "register": "safesteer.evaluate.registry",
    "unregister": "safesteer.evaluate.registry",
    "CI": "safesteer.evaluate.stats",
    "PairedDiff": "safesteer.evaluate.stats",
    "bootstrap_ci": "safesteer.evaluate.stats",
    "paired_bootstrap": "safesteer.evaluate.stats",
    "METRICS": "safesteer.evaluate.suite",
    "SuiteConfig": "safesteer.evaluate.suite",
    "SuiteResult": "safesteer.evaluate.suite",
    "run_suite": "safesteer.evaluate.suite",
    "write_outputs": "safesteer.evaluate.suite",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
