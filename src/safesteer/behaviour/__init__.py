"""The behaviour study on a causal LM: a calibrated harm gate, refusal directions, a conditional
policy chosen on validation and judged on test by what the model answers.

``prompts`` (the gate's data and splits) → ``gate`` (fitting, cross-fitting, metrics) →
``directions`` (CAA, refusal_dim, ablation) → ``policy`` (candidates, selection) → ``study`` (the
named steps of :mod:`safesteer.behaviour.steps` in order); ``reframe`` and ``pairs`` test the
gate's phrasing robustness.
"""
