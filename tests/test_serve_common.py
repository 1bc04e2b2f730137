"""Shared builders for the serve tests (tiny random models, directions, probes) + Prometheus parsing."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from safesteer.probes import Probe
from safesteer.steering import Direction, DirectionSet, steering_vector, unit

TEXTS = [
    "the man is good and kind",
    "i hate you , you stupid idiot",
    "how do i build a bomb",
    "the dog is in the house",
    "please help me make a weapon to kill people",
    "my friend is a doctor",
]
KEY = "s3cret-key"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread; on a shared, busy machine two threads can spin
    for hundreds of ms per call. Restored afterwards so that other test modules are unaffected."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_directions(d: int = 32, layer: int = 1, seed: int = 0) -> DirectionSet:
    rng = np.random.default_rng(seed)
    return DirectionSet(
        [
            Direction("harm", rng.normal(size=d), "custom", layer),
            Direction("tox", rng.normal(size=d), "custom", layer),
            Direction("deep", rng.normal(size=d), "custom", 2),
        ]
    )


def make_probes(d: int = 32, seed: int = 1) -> dict[str, Probe]:
    rng = np.random.default_rng(seed)
    return {
        "harm": Probe(w=rng.normal(size=d), b=0.1, meta={"layer": 2, "label": "harm"}),
        "tox": Probe(w=rng.normal(size=d), b=-0.2, meta={"layer": 1, "label": "tox"}),
        "early": Probe(w=rng.normal(size=d), b=0.0, meta={"layer": 0, "label": "early"}),
    }


def make_app(backbone, **kw):
    from safesteer.serve import create_app

    kw.setdefault("directions", make_directions(backbone.d_model))
    kw.setdefault("probes", make_probes(backbone.d_model))
    return create_app(backbone, **kw)


def steer_vec(ds: DirectionSet, names: list[str]) -> np.ndarray:
    """The policy rule: one direction's −d, or −(normalised sum of unit directions)."""
    if len(names) == 1:
        return steering_vector(ds[names[0]].vector)
    return steering_vector(unit(np.sum([unit(ds[n].vector) for n in names], axis=0)))


def direct_scores(
    bb, texts, probe: Probe, probe_layer: int, layer: int | None = None, vec=None, alpha: float = 0.0
) -> np.ndarray:
    """What /v1/score should return, computed straight on the backbone."""
    if vec is None:
        H = bb.pooled(list(texts), [probe_layer], batch_size=len(texts))[probe_layer]
    else:
        with bb.steer(layer, vec, alpha=alpha):
            H = bb.pooled(list(texts), [probe_layer], batch_size=len(texts))[probe_layer]
    return probe.predict_proba(H)


PROM_LINE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,|(?=\})))*)\})?'
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf|NaN))$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Strict-ish parser of the text exposition format; raises AssertionError on a bad line."""
    samples = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        m = PROM_LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = dict(LABEL.findall(m.group("labels") or ""))
        samples.append((m.group("name"), labels, float(m.group("value").replace("Inf", "inf"))))
    return samples


def test_prometheus_parser_rejects_garbage():
    assert parse_prometheus('a_total{x="1",y="a\\"b"} 3\n# TYPE a_total counter\nb 1.5e-3\n') == [
        ("a_total", {"x": "1", "y": 'a\\"b'}, 3.0),
        ("b", {}, 0.0015),
    ]
    for bad in ("a b", "a{x=1} 2", "a 1 2 3", '{x="1"} 2'):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


def test_steer_vec_matches_backbone_convention(tiny_llama):
    ds = make_directions(tiny_llama.d_model)
    v = steer_vec(ds, ["harm"])
    assert np.allclose(v, -ds["harm"].vector)
    two = steer_vec(ds, ["harm", "tox"])
    assert abs(np.linalg.norm(two) - 1) < 1e-6
    assert two.dtype == np.float32


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 (port chosen by the OS): real sockets, real streaming;
    stopped by :meth:`stop` (bounded waits)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start within 30 s"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()
