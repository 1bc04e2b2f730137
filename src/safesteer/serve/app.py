"""The FastAPI application of ``safesteer serve``.

Endpoints (JSON in, JSON out; errors are ``{"error": {"code", "message", "details"?}}`` with a 4xx
status for every client mistake):

``POST /v1/score``     probe probabilities for texts; with a policy the probes read the pooled
                       vector computed with steering active
``POST /v1/generate``  completions (causal models; greedy, or sampled with a seed)
``POST /v1/choice``    forced-choice P(Yes)/P(No) (:mod:`safesteer.evaluate.choice`)
``GET /v1/policies``, ``GET/PUT/DELETE /v1/policies/{name}``   policies, swapped atomically
``POST /v1/chat/completions``, ``GET /v1/models``   OpenAI-compatible (:mod:`safesteer.serve.openai_api`)
``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /openapi.json``, ``GET /docs``

Every compute response names the policy snapshot it was served with (``policy``,
``policy_version``, ``alpha``) and which texts were steered (``steered``).

:func:`create_app` builds the server's objects, puts them on ``app.state`` and includes the
module-level routers of :mod:`~safesteer.serve.routes` and :mod:`~safesteer.serve.openai_api`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator, Mapping, Sequence

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from safesteer import __version__
from safesteer.serve import openai_api, routes, vllm_api
from safesteer.serve.engine import Engine, ServedProbe, served_probes
from safesteer.serve.http import GuardMiddleware, _install_handlers
from safesteer.serve.limits import Limits
from safesteer.serve.metrics import Metrics
from safesteer.serve.policies import PolicyStore
from safesteer.serve.sae_info import sae_layer_of
from safesteer.serve.worker import ModelWorker
from safesteer.steering import DirectionSet


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The model worker accepts jobs while the app is served and is closed at shutdown."""
    worker: ModelWorker = app.state.worker
    worker.reopen()
    yield
    await run_in_threadpool(worker.close)


def create_app(
    backbone: Any,
    directions: DirectionSet | None = None,
    probes: Mapping[str, Any] | Sequence[ServedProbe] | None = None,
    policy_store: PolicyStore | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    sae: Any = None,
    sae_layer: int | None = None,
    vllm: Any = None,
) -> FastAPI:
    """The steering service for one loaded ``backbone``.

    ``directions``: the :class:`DirectionSet` policies pick from. ``probes``: ``name → Probe``
    (layer from ``probe.meta["layer"]``), ``name → (probe, layer)`` or :class:`ServedProbe`s.
    ``policy_store``: where policies live (default: in memory); its policies are validated now.
    ``api_key``: required (``X-API-Key`` or ``Authorization: Bearer``) for PUT/DELETE of policies.
    ``sae`` (+ ``sae_layer``): enables atom clamps in policies. ``vllm``: a
    :class:`~safesteer.serve.vllm_engine.VllmEngine` that runs generation (``backbone`` is then its
    :class:`~safesteer.serve.vllm_engine.TokenizerBackbone`); policies are also checked against what it
    can serve (:func:`~safesteer.serve.vllm_api.check_policy`).
    """
    limits = limits or Limits()
    engine = Engine(
        backbone,
        directions,
        served_probes(probes, backbone),
        sae,
        sae_layer if sae_layer is not None else (sae_layer_of(sae) if sae is not None else None),
        limits,
    )
    store = policy_store if policy_store is not None else PolicyStore()
    store.bind(engine.compile if vllm is None else (lambda p: vllm_api.check_policy(engine.compile(p))))
    metrics = Metrics()
    worker = ModelWorker(
        engine.lock,
        limits.max_queue,
        limits.batch_window_ms / 1000.0,
        limits.max_batch_texts,
        on_batch=metrics.observe_batch,
    )
    model_name = str(getattr(backbone, "name", "model"))

    app = FastAPI(
        title="safesteer steering service",
        version=__version__,
        description=(
            "Inference-time safety steering of a frozen LM with policies that change at run time. "
            "A policy steers h' = h - alpha*d at a layer (d: unit direction toward unsafe; alpha >= 0 "
            "steers away), "
            "optionally clamps SAE atoms, and optionally only when a probe's probability on the prompt "
            "exceeds a threshold."
        ),
        lifespan=lifespan,
    )
    # what the routers read from request.app.state (safesteer.serve.state)
    app.state.engine, app.state.store, app.state.worker, app.state.metrics, app.state.limits = (
        engine,
        store,
        worker,
        metrics,
        limits,
    )
    app.state.vllm = vllm
    app.state.model_name, app.state.api_key, app.state.started = model_name, api_key, int(time.time())
    _install_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        max_body=limits.max_body_bytes,
        api_key=api_key,
        metrics=metrics,
        route_of=routes.route_of,
    )
    # in this order: it is the order of the paths in /openapi.json
    app.include_router(routes.steering)
    app.include_router(routes.policies)
    app.include_router(routes.status)
    app.include_router(openai_api.router)
    app.include_router(routes.metrics)
    return app
