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
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict
from typing import Any, Callable, Hashable, Literal, Mapping, Optional, Sequence

from fastapi import FastAPI, Response, Security
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from safesteer import __version__
from safesteer.errors import SafesteerError
from safesteer.serve.engine import Engine, ServedProbe, served_probes
from safesteer.serve.http import (
    _ERRORS,
    API_KEY_HEADER,
    ApiError,
    GuardMiddleware,
    _clean_errors,
    _first_message,
    _install_handlers,
)
from safesteer.serve.limits import Limits
from safesteer.serve.metrics import Metrics
from safesteer.serve.openai_api import mount_openai
from safesteer.serve.plan import Plan
from safesteer.serve.policies import Policy, PolicyBody, PolicyStorageError, PolicyStore, valid_name
from safesteer.serve.sae_info import sae_layer_of
from safesteer.serve.worker import ModelWorker
from safesteer.steering import DirectionSet

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ------------------------------------------------------------------------------------ schemas
class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Optional[str] = Field(
        None, max_length=128, description="Policy name (GET /v1/policies); none = unsteered."
    )
    alpha: Optional[float] = Field(
        None,
        allow_inf_nan=False,
        description="Override the policy's alpha within its bounds (needs a policy).",
    )


class ScoreRequest(_Request):
    texts: list[str] = Field(min_length=1, description="Texts to score (see /healthz for the limits).")
    probes: Optional[list[str]] = Field(
        None, min_length=1, max_length=64, description="Probe names (default: all loaded)."
    )


class ChoiceRequest(_Request):
    texts: list[str] = Field(min_length=1)
    prompt_type: Literal["harmful", "safe", "toxic"] = Field(
        "harmful", description="Question asked about each text."
    )


class GenerateRequest(_Request):
    prompts: list[str] = Field(min_length=1, description="User messages (chat-templated when chat is true).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens to generate (bounded by the server's limit).")
    do_sample: bool = False
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Sampling seed (the same request gives the same output)."
    )
    temperature: Optional[float] = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    chat: bool = Field(True, description="Render each prompt with the model's chat template.")


class _Served(BaseModel):
    model: str
    policy: Optional[str]
    policy_version: Optional[int]
    alpha: Optional[float]
    steered: list[bool]
    condition_probability: Optional[list[Optional[float]]] = None


# numbers are null where a computation gave a non-finite value (JSON has no NaN)
class ScoreResponse(_Served):
    probabilities: dict[str, list[Optional[float]]]


class ChoiceResponse(_Served):
    p_yes: list[Optional[float]]
    p_no: list[Optional[float]]
    answer_mass: list[Optional[float]]


class GenerateResponse(_Served):
    completions: list[str]


class PolicyOut(BaseModel):
    name: str
    version: int
    updated_at: float
    policy: dict[str, Any]


class PolicyList(BaseModel):
    policies: list[PolicyOut]
    version: int


class Deleted(BaseModel):
    deleted: str
    version: int


# ---------------------------------------------------------------------------------------- app
def _names(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _split(result: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """Slice every per-text list of a batched result back into per-request results."""
    out: list[dict[str, Any]] = [{} for _ in sizes]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)

    def cut(value: Any, i: int) -> Any:
        if isinstance(value, list):
            return value[bounds[i] : bounds[i + 1]]
        if isinstance(value, dict):
            return {k: cut(v, i) for k, v in value.items()}
        return value

    for i in range(len(sizes)):
        out[i] = {k: cut(v, i) for k, v in result.items()}
    return out


def create_app(
    backbone: Any,
    directions: DirectionSet | None = None,
    probes: Mapping[str, Any] | Sequence[ServedProbe] | None = None,
    policy_store: PolicyStore | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    sae: Any = None,
    sae_layer: int | None = None,
) -> FastAPI:
    """The steering service for one loaded ``backbone``.

    ``directions``: the :class:`DirectionSet` policies pick from. ``probes``: ``name → Probe``
    (layer from ``probe.meta["layer"]``), ``name → (probe, layer)`` or :class:`ServedProbe`s.
    ``policy_store``: where policies live (default: in memory); its policies are validated now.
    ``api_key``: required (``X-API-Key`` or ``Authorization: Bearer``) for PUT/DELETE of policies.
    ``sae`` (+ ``sae_layer``): enables atom clamps in policies.
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
    store.bind(engine.compile)
    metrics = Metrics()
    worker = ModelWorker(
        engine.lock,
        limits.max_queue,
        limits.batch_window_ms / 1000.0,
        limits.max_batch_texts,
        on_batch=metrics.observe_batch,
    )
    model_name = str(getattr(backbone, "name", "model"))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.reopen()
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(
        title="safesteer steering service",
        version=__version__,
        description=(
            "Inference-time safety steering of a frozen LM with policies that change at run time. "
            "A policy steers h' = h - alpha*d at a layer (d: unit direction toward unsafe; alpha >= 0 steers away), "
            "optionally clamps SAE atoms, and optionally only when a probe's probability on the prompt exceeds a threshold."
        ),
        lifespan=lifespan,
    )
    app.state.engine, app.state.store, app.state.worker, app.state.metrics, app.state.limits = (
        engine,
        store,
        worker,
        metrics,
        limits,
    )
    _install_handlers(app)

    def route_of(scope: dict) -> str | None:
        for route in app.routes:
            if isinstance(route, APIRoute) and route.matches(scope)[0] != Match.NONE:
                return route.path
        return None

    app.add_middleware(
        GuardMiddleware, max_body=limits.max_body_bytes, api_key=api_key, metrics=metrics, route_of=route_of
    )
    key_scheme = APIKeyHeader(
        name=API_KEY_HEADER,
        auto_error=False,
        description="Needed for PUT/DELETE when the server has an API key.",
    )

    # ------------------------------------------------------------------ helpers
    def check_texts(texts: list[str], what: str) -> list[str]:
        if len(texts) > limits.max_texts:
            raise ApiError(
                422,
                "too_many_texts",
                f"{len(texts)} {what} exceed the limit of {limits.max_texts} per request",
            )
        for i, t in enumerate(texts):
            if len(t) > limits.max_text_chars:
                raise ApiError(
                    422,
                    "text_too_long",
                    f"{what}[{i}] has {len(t)} characters; the limit is {limits.max_text_chars}",
                )
            if not t.strip():
                raise ApiError(422, "empty_text", f"{what}[{i}] is empty")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    422, "invalid_text", f"{what}[{i}] is not valid Unicode (lone surrogate)"
                ) from None
        return texts

    def make_plan(policy: str | None, alpha: float | None) -> Plan:
        if policy is None:
            if alpha is not None:
                raise ApiError(422, "alpha_without_policy", "alpha needs a policy; name one in 'policy'")
            return Plan()
        record = store.get(policy)  # the snapshot this request is served with
        if record is None:
            raise ApiError(
                404, "unknown_policy", f"unknown policy '{policy}'; known policies: {_names(store.names())}"
            )
        try:
            return Plan(record, engine.resolve_alpha(record, alpha))
        except SafesteerError as exc:
            raise ApiError(422, "alpha_out_of_bounds", exc.message) from None

    async def run_job(
        fn: Callable[[list[Any]], list[Any]], payload: Any, key: Hashable | None, size: int
    ) -> Any:
        future = worker.submit(fn, payload, key, size)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                504, "timeout", f"the model did not answer within {limits.request_timeout_s:g} s"
            ) from None

    def batched(
        compute: Callable[[list[str]], dict[str, Any]],
    ) -> Callable[[list[list[str]]], list[dict[str, Any]]]:
        def fn(payloads: list[list[str]]) -> list[dict[str, Any]]:
            if len(payloads) == 1:
                return [compute(payloads[0])]
            flat = [t for p in payloads for t in p]
            return _split(compute(flat), [len(p) for p in payloads])

        return fn

    # --------------------------------------------------------------- endpoints
    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, tags=["steering"])
    async def score(req: ScoreRequest) -> dict[str, Any]:
        """Probe probabilities for each text; with a policy, the probes read the pooled vector computed under steering."""
        texts = check_texts(req.texts, "texts")
        if not engine.probes:
            raise ApiError(400, "no_probes", "the server has no probes; start it with --probes")
        names = list(dict.fromkeys(req.probes or engine.probes))
        unknown = [n for n in names if n not in engine.probes]
        if unknown:
            raise ApiError(
                422,
                "unknown_probe",
                f"unknown probe '{unknown[0]}'; loaded probes: {', '.join(engine.probes)}",
            )
        plan = make_plan(req.policy, req.alpha)
        result = await run_job(
            batched(lambda t: engine.score(t, names, plan)),
            texts,
            ("score", plan.key(), tuple(names)),
            len(texts),
        )
        metrics.observe_texts("/v1/score", len(texts))
        return {"model": model_name, **plan.describe(), **result}

    @app.post("/v1/choice", response_model=ChoiceResponse, responses=_ERRORS, tags=["steering"])
    async def choice(req: ChoiceRequest) -> dict[str, Any]:
        """Forced-choice P(Yes) / P(No) for a question about each text (safesteer.evaluate.choice)."""
        texts = check_texts(req.texts, "texts")
        if not engine.can_choose:
            raise ApiError(
                400,
                "choice_unavailable",
                "forced choice is unavailable: the tokenizer has no single-token Yes/No",
            )
        plan = make_plan(req.policy, req.alpha)
        result = await run_job(
            batched(lambda t: engine.choice(t, req.prompt_type, plan)),
            texts,
            ("choice", plan.key(), req.prompt_type),
            len(texts),
        )
        metrics.observe_texts("/v1/choice", len(texts))
        return {"model": model_name, **plan.describe(), **result}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS, tags=["steering"])
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """Steered completions (causal models): greedy, or sampled with ``seed``; ``max_new_tokens`` is bounded."""
        prompts = check_texts(req.prompts, "prompts")
        if backbone.kind != "causal":
            raise ApiError(400, "not_causal", "generation needs a causal LM; this server runs a masked LM")
        if req.max_new_tokens > limits.max_new_tokens:
            raise ApiError(
                422,
                "too_many_tokens",
                f"max_new_tokens {req.max_new_tokens} exceeds the limit of {limits.max_new_tokens}",
            )
        if not req.do_sample and (req.temperature is not None or req.top_p is not None):
            raise ApiError(422, "sampling_options_without_sampling", "temperature/top_p need do_sample: true")
        plan = make_plan(req.policy, req.alpha)

        def fn(payloads: list[list[str]]) -> list[dict[str, Any]]:
            return [
                engine.generate(
                    payloads[0],
                    plan,
                    req.max_new_tokens,
                    req.do_sample,
                    req.seed,
                    req.temperature,
                    req.top_p,
                    req.chat,
                )
            ]

        result = await run_job(fn, prompts, None, len(prompts))
        metrics.observe_texts("/v1/generate", len(prompts))
        return {"model": model_name, **plan.describe(), **result}

    # ---------------------------------------------------------------- policies
    def get_record(name: str):
        record = store.get(name)
        if record is None:
            raise ApiError(
                404, "unknown_policy", f"unknown policy '{name}'; known policies: {_names(store.names())}"
            )
        return record

    @app.get("/v1/policies", response_model=PolicyList, tags=["policies"])
    async def list_policies() -> dict[str, Any]:
        """Every policy with its current version."""
        snap = store.snapshot()
        return {"policies": [snap[n].to_dict() for n in sorted(snap)], "version": store.version}

    @app.get("/v1/policies/{name}", response_model=PolicyOut, responses=_ERRORS, tags=["policies"])
    async def get_policy(name: str) -> dict[str, Any]:
        return get_record(name).to_dict()

    @app.put(
        "/v1/policies/{name}",
        response_model=PolicyOut,
        responses={**_ERRORS, 201: {"model": PolicyOut}},
        tags=["policies"],
    )
    async def put_policy(
        name: str, body: PolicyBody, response: Response, _key: Optional[str] = Security(key_scheme)
    ) -> dict[str, Any]:
        """Create or replace a policy; validated against the loaded directions/probes/SAE, then swapped in atomically."""
        if not valid_name(name):
            raise ApiError(
                422,
                "invalid_policy_name",
                f"policy name {name!r} must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit",
            )
        try:
            policy = Policy.from_body(name, body)
        except ValidationError as exc:
            details = _clean_errors(exc.errors())
            raise ApiError(422, "invalid_policy", _first_message(details), details) from None
        except SafesteerError as exc:
            raise ApiError(422, "invalid_policy", exc.message) from None
        try:
            record, created = await run_in_threadpool(store.put, policy)
        except PolicyStorageError as exc:  # the server's disk, not the client's policy
            raise ApiError(500, "storage_error", exc.message) from None
        except SafesteerError as exc:
            raise ApiError(422, "invalid_policy", exc.message) from None
        metrics.observe_swap("put")
        response.status_code = 201 if created else 200
        return record.to_dict()

    @app.delete("/v1/policies/{name}", response_model=Deleted, responses=_ERRORS, tags=["policies"])
    async def delete_policy(name: str, _key: Optional[str] = Security(key_scheme)) -> dict[str, Any]:
        """Remove a policy (requests already running keep the snapshot they started with)."""
        try:
            record = await run_in_threadpool(store.delete, name)
        except PolicyStorageError as exc:
            raise ApiError(500, "storage_error", exc.message) from None
        if record is None:
            raise ApiError(404, "unknown_policy", f"unknown policy '{name}'")
        metrics.observe_swap("delete")
        return {"deleted": name, "version": store.version}

    # ------------------------------------------------------------------ status
    @app.get("/healthz", tags=["status"])
    async def healthz() -> dict[str, Any]:
        """Liveness plus what is loaded and the request limits."""
        return {
            "status": "ok",
            "version": __version__,
            "model": model_name,
            "kind": backbone.kind,
            "n_layers": backbone.n_layers,
            "d_model": backbone.d_model,
            "directions": {n: d.layer for n, d in engine.directions.items()},
            "probes": {n: p.layer for n, p in engine.probes.items()},
            "sae": engine.sae is not None,
            "sae_layer": engine.sae_layer,
            "policies": store.names(),
            "auth": bool(api_key),
            "queue": worker.queued,
            "limits": asdict(limits),
        }

    mount_openai(app, engine, store, worker, metrics, limits, model_name, make_plan)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["status"])
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format: requests by endpoint/status, latency histograms, policy swaps, memory."""
        text = metrics.render(
            {
                "safesteer_policies": ("Policies currently served.", float(len(store))),
                "safesteer_queue_depth": ("Jobs waiting for the model.", float(worker.queued)),
            }
        )
        return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)

    return app
