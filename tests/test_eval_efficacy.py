"""Efficacy ΔP: the probe reads the pooled vector computed under steering (masked LM, last layer)."""

from __future__ import annotations

import numpy as np
import pytest

from safesteer.evaluate.efficacy import efficacy, probe_layer
from safesteer.steering import Direction, Intervention

pytestmark = pytest.mark.usefixtures("one_thread")


class LinProbe:
    def __init__(self, w, b, layer=None):
        self.w, self.b = np.asarray(w, dtype=np.float64), float(b)
        self.meta = {} if layer is None else {"layer": layer}

    @property
    def direction(self):
        return self.w / np.linalg.norm(self.w)

    def predict_proba(self, H):
        return 1 / (1 + np.exp(-(np.asarray(H, dtype=np.float64) @ self.w + self.b)))


TEXTS = ["you are a stupid idiot .", "i hate you and your friend .", "kill the man ."]


def test_last_layer_masked_probe_reads_steered_vector(tiny_roberta):
    L = tiny_roberta.n_layers - 1
    rng = np.random.default_rng(0)
    probe = LinProbe(rng.normal(size=tiny_roberta.d_model), 0.3, layer=L)
    d = Direction("probe", probe.direction, "probe", L)
    out = efficacy(tiny_roberta, TEXTS, probe, L, Intervention.from_direction(d, 1.5))
    H = tiny_roberta.pooled(TEXTS, [L])[L].astype(np.float64)
    z = H @ probe.w + probe.b
    expected = 1 / (1 + np.exp(-(z - 1.5 * np.linalg.norm(probe.w)))) - 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(out["delta"], expected, atol=1e-5)
    assert np.all(out["delta"] < 0)  # steering away lowers the unsafe probability
    zero = efficacy(tiny_roberta, TEXTS, probe, L, Intervention.from_direction(d, 0.0))
    np.testing.assert_array_equal(zero["delta"], np.zeros(3))


def test_probe_below_the_steering_layer_sees_nothing(tiny_llama):
    probe = LinProbe(np.ones(tiny_llama.d_model), 0.0, layer=0)
    d = Direction("p", probe.direction, "probe", 2)
    out = efficacy(tiny_llama, TEXTS, probe, probe_layer(probe, 2), Intervention.from_direction(d, 3.0))
    np.testing.assert_array_equal(out["delta"], np.zeros(3))
    assert probe_layer(LinProbe(np.ones(3), 0.0), 7) == 7
