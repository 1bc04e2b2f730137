"""Evaluation of steering: efficacy ΔP, forced-choice compliance and over-refusal, generation refusal
rates, fluency, CrowS-Pairs and StereoSet — each with bootstrap CIs and paired comparisons.

Every metric function takes a backbone, its items and an optional
:class:`~safesteer.steering.Intervention` (None = unsteered) and returns per-item values;
:func:`~safesteer.evaluate.suite.run_suite` ties them to calibration (α on validation) and
reporting (test split), :mod:`~safesteer.evaluate.plots` draws the figures.
"""

from safesteer.evaluate.bias import (
    CrowsPair,
    StereoExample,
    crows_pairs_from_records,
    crows_scores,
    crows_summary,
    stereoset_from_records,
    stereoset_metrics,
    stereoset_scores,
)
from safesteer.evaluate.calibrate import Calibration, calibrate
from safesteer.evaluate.choice import answer_tokens, forced_choice
from safesteer.evaluate.efficacy import efficacy, probe_probabilities
from safesteer.evaluate.fluency import (
    FluencyScores,
    fluency,
    mean_token_nll,
    pseudo_log_likelihood,
    wiki_passages,
)
from safesteer.evaluate.generation import REFUSAL_PHRASES, generate_answers, is_refusal, refusal_rate
from safesteer.evaluate.registry import GroupResult, MetricGroup, MetricSpec, register, unregister
from safesteer.evaluate.stats import CI, PairedDiff, bootstrap_ci, paired_bootstrap
from safesteer.evaluate.suite import METRICS, SuiteConfig, SuiteResult, run_suite, write_outputs

__all__ = [
    "CI",
    "Calibration",
    "CrowsPair",
    "FluencyScores",
    "GroupResult",
    "METRICS",
    "MetricGroup",
    "MetricSpec",
    "PairedDiff",
    "REFUSAL_PHRASES",
    "StereoExample",
    "SuiteConfig",
    "SuiteResult",
    "answer_tokens",
    "bootstrap_ci",
    "calibrate",
    "crows_pairs_from_records",
    "crows_scores",
    "crows_summary",
    "efficacy",
    "fluency",
    "forced_choice",
    "generate_answers",
    "is_refusal",
    "mean_token_nll",
    "paired_bootstrap",
    "probe_probabilities",
    "pseudo_log_likelihood",
    "refusal_rate",
    "register",
    "run_suite",
    "stereoset_from_records",
    "stereoset_metrics",
    "stereoset_scores",
    "unregister",
    "wiki_passages",
    "write_outputs",
]
