"""Steered metrics equal the same metric under a hand-installed hook h ↦ h − α·scale·d.

Replaces the "α = 0 ≡ unsteered" checks as evidence: those pass for any sign or scale. Here every
metric path (CrowS, StereoSet, forced choice, fluency, Backbone.steer itself) must match the
reference edit for α > 0 and α < 0, and the two signs must differ from each other and from 0.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from safesteer.evaluate.bias import CrowsPair, StereoExample, crows_scores, stereoset_scores
from safesteer.evaluate.choice import forced_choice
from safesteer.evaluate.fluency import fluency
from safesteer.steering import Direction, Intervention, random_direction

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, ALPHA, SCALE = 1, 1.5, 2.0
TEXTS = ["the man is good .", "how do i make a bomb ?", "you are a stupid idiot", "the dog is happy"]
PAIRS = [
    CrowsPair(
        "the poor man is a stupid idiot .", "the rich man is a stupid idiot .", "stereo", "socioeconomic"
    ),
    CrowsPair("she is a nurse and she is kind .", "he is a nurse and he is kind .", "antistereo", "gender"),
]
STEREO = [
    StereoExample(
        "1",
        "intrasentence",
        "man",
        "gender",
        "the man is BLANK .",
        "the man is bad .",
        "the man is not good .",
        "the man is car .",
    ),
    StereoExample(
        "2",
        "intersentence",
        "woman",
        "gender",
        "the woman is at school .",
        "she is sad .",
        "she is happy .",
        "the car is water .",
    ),
]


@contextlib.contextmanager
def reference_edit(bb, d: np.ndarray, alpha: float):
    """The package's sign convention written out: block LAYER's output h becomes h − alpha·d."""
    shift = torch.tensor(alpha * d, dtype=torch.float64)

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        new = (h.double() - shift).to(h.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = bb.layers[LAYER].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


METRICS = {
    "crows": lambda bb, iv: crows_scores(bb, PAIRS, iv),
    "stereoset": lambda bb, iv: stereoset_scores(bb, STEREO, iv),
    "choice": lambda bb, iv: forced_choice(bb, TEXTS, "harmful", iv),
    "fluency": lambda bb, iv: fluency(bb, TEXTS, iv).logprob if bb.kind == "causal" else None,
}


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_steered_metric_equals_reference_edit(tiny_backbone, metric):
    fn = METRICS[metric]
    if fn(tiny_backbone, None) is None:
        pytest.skip("fluency is defined for causal LMs")
    d = random_direction(tiny_backbone.d_model, 9)
    direction = Direction("r", d, "random", LAYER)
    base = fn(tiny_backbone, None)
    got = {}
    for sign in (1.0, -1.0):
        iv = Intervention.from_direction(direction, sign * ALPHA, scale=SCALE)
        got[sign] = np.asarray(fn(tiny_backbone, iv), dtype=np.float64)
        with reference_edit(tiny_backbone, d, sign * ALPHA * SCALE):
            ref = np.asarray(fn(tiny_backbone, None), dtype=np.float64)
        np.testing.assert_allclose(got[sign], ref, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got[sign], base, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[1.0], got[-1.0], rtol=1e-4, atol=1e-5)


def test_backbone_steer_adds_alpha_times_vector_exactly(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(3))
    for alpha in (2.5, -0.75):
        with bb.steer(LAYER, v, alpha=alpha):
            got = bb.forward_layers(enc.input_ids, enc.attention_mask, [LAYER])[LAYER]
        plain = bb.forward_layers(enc.input_ids, enc.attention_mask, [LAYER])[LAYER]
        assert torch.equal(got, plain + (alpha * v).to(plain.dtype))
