"""The causal screen: exact same-layer effect, step rules, weak read-outs, steered later layers."""

from __future__ import annotations

import numpy as np
import pytest

from safesteer.cartography.screen import UNSAFE_FLAG, CausalScreen
from safesteer.errors import SafesteerError
from safesteer.probes import Probe


def test_old_import_path_is_the_same_objects():
    from safesteer.cartography import judges, screen

    for name in ("UNSAFE_FLAG", "CausalScreen", "ScreenResult", "pooled_by_length", "train_readouts"):
        assert getattr(judges, name) is getattr(screen, name), name


def _readout(bb, rng):
    w = rng.normal(size=bb.d_model)
    return Probe(w=w, b=0.0)


TEXTS = ["you are a cruel idiot", "the dog is happy", "what a good friend", "make a bomb please"]


def test_screen_same_layer_is_exact(tiny_llama):
    rng = np.random.default_rng(0)
    probe = _readout(tiny_llama, rng)
    scr = CausalScreen(tiny_llama, layer=1, read_layer=1, readouts={"toxicity": (probe, TEXTS)}, alpha=0.5)
    d = probe.w / np.linalg.norm(probe.w)
    dp, dl = scr.effect("toxicity", d)
    assert dl == pytest.approx(0.5 * np.linalg.norm(probe.w), rel=1e-5) and dp > 0
    good = scr.screen_one(3, "toxicity", r=0.3, r_heldout=0.2, direction=d)
    assert good.passes and good.replicates and good.flag == ""
    bad = scr.screen_one(4, "toxicity", r=0.3, r_heldout=0.2, direction=-d)
    assert not bad.passes and bad.flag.startswith(UNSAFE_FLAG)
    norep = scr.screen_one(5, "toxicity", r=0.3, r_heldout=-0.2, direction=d)
    assert not norep.passes and "replicate" in norep.flag
    weak = scr.screen_one(6, "toxicity", r=0.3, r_heldout=0.01, direction=d)
    assert not weak.replicates


def test_screen_step_and_weak_readouts(tiny_llama):
    rng = np.random.default_rng(2)
    probe = _readout(tiny_llama, rng)
    probe.metrics = {"auroc": 0.55}
    good = _readout(tiny_llama, rng)
    good.metrics = {"auroc": 0.95}
    scr = CausalScreen(
        tiny_llama,
        layer=1,
        read_layer=1,
        readouts={"weak": (probe, TEXTS), "good": (good, TEXTS)},
        alpha_scale=2.0,
    )
    assert scr.alpha_for(3.0) == 6.0 and scr.alpha_for(None) == pytest.approx(scr.alpha) and scr.alpha > 0
    d = good.w / np.linalg.norm(good.w)
    _, dl = scr.effect("good", d, alpha=scr.alpha_for(3.0))
    assert dl == pytest.approx(6.0 * np.linalg.norm(good.w), rel=1e-5)
    res = scr.screen_one(1, "weak", 0.3, 0.3, d)
    assert not res.passes and "too weak" in res.flag and np.isnan(res.effect)
    missing = scr.screen_one(1, "other", 0.3, 0.3, d)
    assert not missing.passes and "no read-out" in missing.flag


def test_screen_through_later_layers_runs_the_model(tiny_llama):
    rng = np.random.default_rng(1)
    probe = _readout(tiny_llama, rng)
    scr = CausalScreen(
        tiny_llama, layer=0, read_layer=2, readouts={"toxicity": (probe, TEXTS)}, alpha_scale=0.5
    )
    assert scr.alpha > 0
    d = rng.normal(size=tiny_llama.d_model)
    dp, dl = scr.effect("toxicity", d)
    dp2, dl2 = scr.effect("toxicity", -d)
    assert dl == pytest.approx(-dl2, rel=1e-4) and dl != 0  # central difference is odd in d
    res = scr.screen_one(1, "toxicity", 0.2 * np.sign(dl), 0.2 * np.sign(dl), d)
    assert res.passes
    with pytest.raises(SafesteerError):
        CausalScreen(tiny_llama, layer=2, read_layer=1, readouts={}, alpha=1.0)
