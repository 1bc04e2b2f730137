"""The server's shared objects on ``app.state``, and the helpers every route uses to read them.

:func:`safesteer.serve.app.create_app` sets ``engine``, ``store``, ``worker``, ``metrics``,
``limits``, ``model_name``, ``api_key`` and ``started`` on ``app.state``; the routers
(:mod:`~safesteer.serve.routes`, :mod:`~safesteer.serve.openai_api`) are module-level and read what
they need from ``request.app.state``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Hashable

from fastapi import Request

from safesteer.errors import SafesteerError
from safesteer.serve.engine import Engine
from safesteer.serve.http import ApiError
from safesteer.serve.limits import Limits
from safesteer.serve.metrics import Metrics
from safesteer.serve.plan import Plan
from safesteer.serve.policies import PolicyStore
from safesteer.serve.worker import ModelWorker


def engine(request: Request) -> Engine:
    """The loaded model with its directions, probes and SAE."""
    return request.app.state.engine


def store(request: Request) -> PolicyStore:
    """The served policies."""
    return request.app.state.store


def worker(request: Request) -> ModelWorker:
    """The thread that runs model jobs."""
    return request.app.state.worker


def metrics(request: Request) -> Metrics:
    """The Prometheus registry of ``/metrics``."""
    return request.app.state.metrics


def limits(request: Request) -> Limits:
    """The server's request limits."""
    return request.app.state.limits


def model_name(request: Request) -> str:
    """The served model's name (``model`` in every response)."""
    return request.app.state.model_name


def _names(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def unknown_policy(policies: PolicyStore, name: str) -> ApiError:
    """404 for a policy the store does not hold, naming the ones it does."""
    return ApiError(
        404, "unknown_policy", f"unknown policy '{name}'; known policies: {_names(policies.names())}"
    )


def make_plan(request: Request, policy: str | None, alpha: float | None) -> Plan:
    """The request's plan: the current snapshot of ``policy`` (none: unsteered) and its checked α."""
    if policy is None:
        if alpha is not None:
            raise ApiError(422, "alpha_without_policy", "alpha needs a policy; name one in 'policy'")
        return Plan()
    record = store(request).get(policy)  # the snapshot this request is served with
    if record is None:
        raise unknown_policy(store(request), policy)
    try:
        return Plan(record, engine(request).resolve_alpha(record, alpha))
    except SafesteerError as exc:
        raise ApiError(422, "alpha_out_of_bounds", exc.message) from None


async def run_job(
    request: Request, fn: Callable[[list[Any]], list[Any]], payload: Any, key: Hashable | None, size: int
) -> Any:
    """Queue ``fn`` on the model worker and wait for its result (504 after the request timeout)."""
    timeout = limits(request).request_timeout_s
    future = worker(request).submit(fn, payload, key, size)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, "timeout", f"the model did not answer within {timeout:g} s") from None
