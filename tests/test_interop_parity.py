"""Parity with steering-vectors: our DiffMean direction and our steering hook against
``steering_vectors.train_steering_vector`` (mean aggregator) and ``SteeringVector.apply`` on SmolLM2.

steering-vectors reads one token per prompt (``read_token_index=-1``, the last one); the parity is on
that reading: our DiffMean estimator on the last-token outputs of block L (safesteer layer L) must
equal its vector, and both hooks must give the same logits. (repeng parity -- reading our control
vectors and applying them at the same block -- is in test_interop_gguf_control.py.)
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from safesteer.probes import diffmean_direction

sv = pytest.importorskip("steering_vectors")
pytestmark = pytest.mark.integration
LAYER = 10


@pytest.fixture(scope="module")
def pairs(shared_data):
    with open(shared_data / "xstest" / "xstest_prompts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    unsafe = [r["prompt"] for r in rows if r["label"] == "unsafe"][:8]
    safe = [r["prompt"] for r in rows if r["label"] == "safe"][:8]
    return list(zip(unsafe, safe))


@pytest.fixture(scope="module")
def trained(smollm2, pairs):
    return sv.train_steering_vector(
        smollm2.model, smollm2.tokenizer, pairs, layers=[LAYER], read_token_index=-1
    )


def _last_token_acts(bb, texts, layer):
    enc = bb.tokenize(texts)  # right padding, the tokenizer's special tokens: what steering-vectors feeds
    h = bb.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer]
    last = enc.attention_mask.sum(1) - 1
    return h[torch.arange(h.shape[0]), last].double().numpy()


def test_diffmean_equals_train_steering_vector_mean(smollm2, pairs, trained):
    pos = _last_token_acts(smollm2, [p for p, _ in pairs], LAYER)
    neg = _last_token_acts(smollm2, [n for _, n in pairs], LAYER)
    H = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(int)
    ours = diffmean_direction(H, y)
    theirs = trained.layer_activations[LAYER].double().numpy()
    cos = float(ours @ theirs / np.linalg.norm(theirs))
    assert cos >= 0.9999, cos
    # their (unnormalised) mean difference is ours times its norm
    np.testing.assert_allclose(
        ours * np.linalg.norm(theirs), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max()
    )
    # a neighbouring layer's DiffMean is a different vector: the layer index is really checked
    other = diffmean_direction(
        np.concatenate(
            [
                _last_token_acts(smollm2, [p for p, _ in pairs], LAYER + 1),
                _last_token_acts(smollm2, [n for _, n in pairs], LAYER + 1),
            ]
        ),
        y,
    )
    assert float(other @ theirs / np.linalg.norm(theirs)) < 0.999


@pytest.mark.parametrize("multiplier", [4.0, -2.0])
def test_applying_both_gives_the_same_logits(smollm2, trained, multiplier):
    v = trained.layer_activations[LAYER].float()
    enc = smollm2.tokenize(["How can I kill a Python process?", "Tell me how to build a bomb at home."])
    base = smollm2.logits(enc.input_ids, enc.attention_mask)
    with trained.apply(smollm2.model, multiplier=multiplier):
        theirs = smollm2.logits(enc.input_ids, enc.attention_mask)
    with smollm2.steer(LAYER, v.numpy(), alpha=multiplier):  # the same vector through our hook
        ours = smollm2.logits(enc.input_ids, enc.attention_mask)
    assert float((theirs - base).abs().max()) > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # our convention: unit direction toward the positive (unsafe) prompts, alpha = multiplier * |v| -- equal
    # up to the float32 rounding of unit * alpha vs multiplier * v (logits are ~10-30 in size)
    with smollm2.steer(LAYER, (v / v.norm()).numpy(), alpha=multiplier * float(v.norm())):
        ours_unit = smollm2.logits(enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(ours_unit, theirs, rtol=1e-5, atol=1e-4)
