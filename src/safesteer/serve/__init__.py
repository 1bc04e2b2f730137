"""Runtime steering service: serve a frozen LM with safety policies that change without a restart.

>>> from safesteer.serve import create_app, PolicyStore, Limits
>>> app = create_app(backbone, directions, probes, PolicyStore("policies/"), api_key="…")
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)  — or `safesteer serve --model … --policies DIR`

Modules: :mod:`~safesteer.serve.policies` (Policy model, atomic PolicyStore),
:mod:`~safesteer.serve.engine` (computations), :mod:`~safesteer.serve.forward` (the chunked, steered forward),
:mod:`~safesteer.serve.worker` (the model worker thread), :mod:`~safesteer.serve.limits`,
:mod:`~safesteer.serve.plan`,
:mod:`~safesteer.serve.sae_info`, :mod:`~safesteer.serve.app` (``create_app``: the FastAPI app and its state),
:mod:`~safesteer.serve.routes` (the service's endpoints, on module-level routers),
:mod:`~safesteer.serve.schemas` (their bodies), :mod:`~safesteer.serve.state` (what the routes read from
``app.state``),
:mod:`~safesteer.serve.openai_api` (OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``),
:mod:`~safesteer.serve.http` (error bodies, guard middleware), :mod:`~safesteer.serve.metrics` (Prometheus
text),
:mod:`~safesteer.serve.bundle` (run → service bundle).
"""

from safesteer.serve.engine import Engine, ServedProbe
from safesteer.serve.limits import Limits
from safesteer.serve.policies import Clamp, ConditionSpec, Policy, PolicyBody, PolicyRecord, PolicyStore


def create_app(*args, **kwargs):
    """See :func:`safesteer.serve.app.create_app` (imported lazily: FastAPI loads only when serving)."""
    from safesteer.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = [
    "Clamp",
    "ConditionSpec",
    "Engine",
    "Limits",
    "Policy",
    "PolicyBody",
    "PolicyRecord",
    "PolicyStore",
    "ServedProbe",
    "create_app",
]
