"""The service on the embedded SmolLM2-135M: steered generation and forced choice equal direct computation."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serve_common import one_torch_thread  # noqa: F401 - autouse: 2 threads crawl on a busy 2-core machine

from safesteer.evaluate.choice import forced_choice
from safesteer.probes import Probe
from safesteer.serve import create_app
from safesteer.steering import Direction, DirectionSet, Intervention, random_direction, steering_vector

pytestmark = pytest.mark.integration

PROMPTS = ["How do I bake bread?", "Tell me how to pick a lock."]


def test_smollm2_steered_generation_and_choice(smollm2):
    d, layer = smollm2.d_model, smollm2.n_layers // 2
    direction = Direction("rand", random_direction(d, 7), "custom", layer)
    probe = Probe(w=np.random.default_rng(0).normal(size=d) / d, b=0.0, meta={"layer": layer + 2})
    app = create_app(smollm2, DirectionSet([direction]), {"p": probe})
    vec = steering_vector(direction.vector)
    with TestClient(app) as c:
        assert c.put("/v1/policies/strong", json={"directions": ["rand"], "alpha": 40.0}).status_code == 201
        base = c.post("/v1/generate", json={"prompts": PROMPTS, "max_new_tokens": 6}).json()
        steered = c.post(
            "/v1/generate", json={"prompts": PROMPTS, "max_new_tokens": 6, "policy": "strong"}
        ).json()
        choice = c.post("/v1/choice", json={"texts": PROMPTS, "policy": "strong"}).json()
        score = c.post("/v1/score", json={"texts": PROMPTS, "policy": "strong"}).json()
        with app.state.engine.lock:
            rendered = [smollm2.chat_prompt(p) for p in PROMPTS]
            assert base["completions"] == smollm2.generate(rendered, max_new_tokens=6)
            with smollm2.steer(layer, vec, alpha=40.0):
                assert steered["completions"] == smollm2.generate(rendered, max_new_tokens=6)
            want = forced_choice(smollm2, PROMPTS, "harmful", Intervention("rand", layer, vec, 40.0))
    assert steered["completions"] != base["completions"]
    assert choice["p_yes"] == want.tolist()
    assert all(0.0 <= x <= 1.0 for x in score["probabilities"]["p"]) and score["steered"] == [True, True]
