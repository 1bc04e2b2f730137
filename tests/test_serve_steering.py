"""Concurrency and policy semantics: hot swap under load, steering isolation, conditional steering,
coalescing."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serve_common import (  # noqa: F401 - one_torch_thread is an autouse fixture
    TEXTS,
    direct_scores,
    make_app,
    make_directions,
    make_probes,
    one_torch_thread,
    parse_prometheus,
    steer_vec,
)

from safesteer.serve import Limits


def test_hot_swap_under_concurrent_load(tiny_llama):
    """Readers never fail and every response equals the direct computation for the version it reports."""
    ds, pr = make_directions(), make_probes()["harm"]
    # each version changes direction AND alpha together: a mixed policy would match no config
    configs = [("harm", 0.5), ("tox", 2.0), ("harm", 3.5), ("tox", -1.0), ("harm", 5.0), ("tox", 4.0)]
    subsets = [TEXTS[:3], TEXTS[2:]]
    expected = {
        (s, c): direct_scores(
            tiny_llama, subsets[s], pr, 2, layer=1, vec=steer_vec(ds, [c[0]]), alpha=c[1]
        ).tolist()
        for s in range(len(subsets))
        for c in configs
    }
    version_cfg: dict[int, tuple[str, float]] = {}
    with TestClient(make_app(tiny_llama)) as c:
        r = c.put("/v1/policies/live", json={"directions": [configs[0][0]], "alpha": configs[0][1]})
        version_cfg[r.json()["version"]] = configs[0]
        stop = threading.Event()
        errors: list[str] = []

        def writer():
            k = 1
            while not stop.is_set() and k < 200:
                cfg = configs[k % len(configs)]
                r = c.put(
                    "/v1/policies/live",
                    json={"directions": [cfg[0]], "alpha": cfg[1], "description": f"v{k}"},
                )
                if r.status_code != 200:
                    errors.append(f"PUT {r.status_code} {r.text}")
                version_cfg[r.json()["version"]] = cfg
                k += 1
                time.sleep(0.002)

        def reader(i: int):
            out = []
            for j in range(25):
                s = (i + j) % len(subsets)
                r = c.post("/v1/score", json={"texts": subsets[s], "policy": "live", "probes": ["harm"]})
                out.append((s, r.status_code, r.json()))
            return out

        w = threading.Thread(target=writer)
        w.start()
        with ThreadPoolExecutor(4) as pool:
            results = [x for chunk in pool.map(reader, range(4)) for x in chunk]
        stop.set()
        w.join()
    assert not errors
    assert len(version_cfg) > 5, "the writer did not get to swap during the load"
    seen = set()
    for s, status, body in results:
        assert status == 200, body
        cfg = version_cfg[body["policy_version"]]
        assert body["alpha"] == cfg[1]
        assert body["probabilities"]["harm"] == expected[(s, cfg)], (body["policy_version"], cfg)
        seen.add(body["policy_version"])
    assert len(seen) >= 2, "every request saw the same version; the swap was not exercised"


REQUESTS = [
    ("/v1/score", {"texts": TEXTS[:4], "policy": "A"}),
    ("/v1/score", {"texts": TEXTS[:4], "policy": "B"}),
    ("/v1/score", {"texts": TEXTS[:4]}),
    ("/v1/score", {"texts": TEXTS[3:], "policy": "A", "alpha": 1.0}),
    ("/v1/choice", {"texts": TEXTS[1:4], "policy": "A"}),
    ("/v1/choice", {"texts": TEXTS[1:4], "policy": "B", "prompt_type": "toxic"}),
    ("/v1/choice", {"texts": TEXTS[1:4]}),
    ("/v1/generate", {"prompts": TEXTS[:2], "policy": "A", "max_new_tokens": 5}),
    ("/v1/generate", {"prompts": TEXTS[:2], "policy": "B", "max_new_tokens": 5}),
    ("/v1/generate", {"prompts": TEXTS[:2], "max_new_tokens": 5}),
]


def _setup_ab(c):
    assert c.put("/v1/policies/A", json={"directions": ["harm"], "alpha": 8.0}).status_code == 201
    assert (
        c.put("/v1/policies/B", json={"directions": ["deep", "tox"], "layer": 0, "alpha": -6.0}).status_code
        == 201
    )


def _strip(body):
    return {k: v for k, v in body.items() if k not in ("policy_version",)}


def test_steering_isolation_interleaved_equals_sequential(tiny_llama):
    with TestClient(make_app(tiny_llama)) as c:
        _setup_ab(c)
        alone = []
        for path, body in REQUESTS:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            alone.append(_strip(r.json()))
        # the policies really differ from each other and from no policy
        assert alone[0]["probabilities"] != alone[1]["probabilities"] != alone[2]["probabilities"]
        assert (
            alone[7]["completions"] != alone[9]["completions"]
            or alone[8]["completions"] != alone[9]["completions"]
        )
        order = [i for i in range(len(REQUESTS)) for _ in range(4)]
        random.Random(0).shuffle(order)

        def call(i):
            path, body = REQUESTS[i]
            r = c.post(path, json=body)
            return i, r.status_code, r.json()

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(call, order))
    for i, status, body in got:
        assert status == 200
        assert _strip(body) == alone[i], REQUESTS[i]


def test_no_hook_left_behind(tiny_llama):
    with TestClient(make_app(tiny_llama)) as c:
        _setup_ab(c)
        before = tiny_llama.pooled(TEXTS, [2])[2]
        for path, body in REQUESTS:
            c.post(path, json=body)
    from conftest import foreign_hooks

    assert foreign_hooks(tiny_llama.layers) == 0
    assert np.array_equal(before, tiny_llama.pooled(TEXTS, [2])[2])


def _condition_setup(bb):
    """A threshold that splits TEXTS by the unsteered harm probe."""
    pr = make_probes()["harm"]
    p0 = direct_scores(bb, TEXTS, pr, 2)
    srt = np.sort(p0)
    thr = float((srt[2] + srt[3]) / 2)
    above = p0 > thr
    assert 0 < above.sum() < len(TEXTS)
    return pr, p0, thr, above


def test_conditional_steering_leaves_low_prompts_bit_for_bit(tiny_llama):
    pr, p0, thr, above = _condition_setup(tiny_llama)
    with TestClient(make_app(tiny_llama)) as c:
        cond = {"directions": ["tox"], "alpha": 9.0, "condition": {"probe": "harm", "threshold": thr}}
        assert c.put("/v1/policies/cond", json=cond).status_code == 201
        assert c.put("/v1/policies/always", json={"directions": ["tox"], "alpha": 9.0}).status_code == 201
        for path, body, fields in (
            ("/v1/score", {"texts": TEXTS}, ("probabilities",)),
            ("/v1/choice", {"texts": TEXTS}, ("p_yes", "p_no", "answer_mass")),
            ("/v1/generate", {"prompts": TEXTS, "max_new_tokens": 6}, ("completions",)),
        ):
            none = c.post(path, json=body).json()
            always = c.post(path, json={**body, "policy": "always"}).json()
            got = c.post(path, json={**body, "policy": "cond"}).json()
            assert got["steered"] == above.tolist()
            assert got["condition_probability"] == p0.tolist()
            for f in fields:
                g, n, a = got[f], none[f], always[f]
                if isinstance(g, dict):
                    g, n, a = [list(zip(*x.values())) for x in (g, n, a)]
                for i in range(len(TEXTS)):
                    if above[i]:
                        assert (
                            g[i] == pytest.approx(a[i], rel=0, abs=1e-12)
                            if not isinstance(g[i], str)
                            else g[i] == a[i]
                        )
                    else:
                        assert g[i] == n[i], (path, f, i)  # bit-for-bit unsteered
            if path == "/v1/score":
                assert got["probabilities"] != none["probabilities"]  # the high prompts were steered
        # all below threshold → the whole response is the unsteered one
        assert (
            c.put(
                "/v1/policies/never", json={**cond, "condition": {"probe": "harm", "threshold": 1.0}}
            ).status_code
            == 201
        )
        none = c.post("/v1/choice", json={"texts": TEXTS}).json()
        never = c.post("/v1/choice", json={"texts": TEXTS, "policy": "never"}).json()
        assert never["p_yes"] == none["p_yes"] and never["steered"] == [False] * len(TEXTS)


def test_coalesced_score_batches_match_alone_and_do_not_leak(tiny_llama):
    app = make_app(tiny_llama, limits=Limits(batch_window_ms=20))
    engine, worker = app.state.engine, app.state.worker
    bodies = [{"texts": TEXTS[i % 3 : i % 3 + 2 + i % 2], "policy": "A"} for i in range(6)] + [
        {"texts": TEXTS[i % 3 : i % 3 + 2 + i % 2]} for i in range(6)
    ]
    with TestClient(app) as c:
        _setup_ab(c)
        alone = [c.post("/v1/score", json=b).json() for b in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            with engine.lock:  # hold the model so that the requests queue up, then release them together
                futures = [pool.submit(c.post, "/v1/score", json=b) for b in bodies]
                deadline = time.time() + 10
                while worker.queued < len(bodies) // 2 - 1 and time.time() < deadline:
                    time.sleep(0.01)
            got = [f.result().json() for f in futures]
        metrics = parse_prometheus(c.get("/metrics").text)
    for a, g in zip(alone, got):
        assert g["policy"] == a["policy"] and g["steered"] == a["steered"]
        for k in a["probabilities"]:
            # coalescing changes the padding of a batch: equal up to float rounding, not bit-for-bit
            assert np.allclose(g["probabilities"][k], a["probabilities"][k], rtol=0, atol=1e-6)
    # … while a leak of policy A into the unsteered requests (same texts) would be far larger than that
    gap = np.abs(np.array(alone[0]["probabilities"]["harm"]) - np.array(alone[6]["probabilities"]["harm"]))
    assert gap.min() > 1e-3
    multi = [v for n, lab, v in metrics if n == "safesteer_model_batch_requests_bucket" and lab["le"] == "1"]
    total = [v for n, lab, v in metrics if n == "safesteer_model_batch_requests_count"]
    assert total[0] > multi[0], "no job served more than one request"


def test_conditional_steering_across_chunks_matches_one_batch(tiny_llama):
    """The shared chunk → condition → steer loop: small chunks give the same rows, probabilities and
    answers."""
    pr, p0, thr, above = _condition_setup(tiny_llama)
    cond = {"directions": ["tox"], "alpha": 9.0, "condition": {"probe": "harm", "threshold": thr}}
    out = {}
    for size in (64, 3):
        with TestClient(make_app(tiny_llama, limits=Limits(max_batch_texts=size))) as c:
            assert c.put("/v1/policies/cond", json=cond).status_code == 201
            out[size] = {
                p: c.post(p, json={**b, "policy": "cond"}).json()
                for p, b in (("/v1/score", {"texts": TEXTS}), ("/v1/choice", {"texts": TEXTS}))
            }
    for path in ("/v1/score", "/v1/choice"):
        big, small = out[64][path], out[3][path]
        assert small["steered"] == big["steered"] == above.tolist()
        np.testing.assert_allclose(small["condition_probability"], p0, rtol=0, atol=1e-6)
    for name, vals in out[64]["/v1/score"]["probabilities"].items():
        np.testing.assert_allclose(out[3]["/v1/score"]["probabilities"][name], vals, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        out[3]["/v1/choice"]["p_yes"], out[64]["/v1/choice"]["p_yes"], rtol=0, atol=1e-5
    )


def test_a_linear_probes_compiled_gate_scores_its_logit_and_a_renamed_probe_keeps_layer_and_position(
    tiny_llama,
):
    """The gate the vLLM hooks score with (``CompiledPolicy.gate``) is the probe's ``w·h + b`` at the
    policy's logit threshold; a served probe listed under another name keeps its layer and position."""
    import math

    from safesteer.serve.engine import Engine, ServedProbe, served_probes
    from safesteer.serve.policies import Policy

    d = tiny_llama.d_model
    probes = make_probes(d)
    sp = served_probes({"alias": ServedProbe("harm", probes["harm"], 2, "last")}, tiny_llama)["alias"]
    assert (sp.name, sp.layer, sp.position) == ("alias", 2, "last")
    eng = Engine(tiny_llama, make_directions(d), served_probes(probes, tiny_llama))
    cp = eng.compile(
        Policy(name="p", directions=["harm"], alpha=1.0, condition={"probe": "harm", "threshold": 0.7})
    )
    gate = cp.gate()
    H = np.random.default_rng(0).normal(size=(5, d))
    assert gate.score(H) == pytest.approx(H @ probes["harm"].w + probes["harm"].b, abs=1e-9)
    assert gate.threshold == pytest.approx(math.log(0.7 / 0.3)) and gate.layer == 2
