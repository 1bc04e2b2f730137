"""The service's own endpoints as module-level routers; handlers read the server from ``request.app.state``.

``steering``: ``POST /v1/score``, ``/v1/choice``, ``/v1/generate``; ``policies``: ``GET /v1/policies``,
``GET/PUT/DELETE /v1/policies/{name}``; ``status``: ``GET /healthz``; ``metrics``: ``GET /metrics``
(see :mod:`safesteer.serve.app` for what each answers).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Optional

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from safesteer import __version__
from safesteer.errors import ContextTooLong, SafesteerError
from safesteer.serve import state, vllm_api
from safesteer.serve.http import _ERRORS, API_KEY_HEADER, ApiError, _clean_errors, _first_message
from safesteer.serve.policies import Policy, PolicyBody, PolicyStorageError, valid_name
from safesteer.serve.schemas import (
    ChoiceRequest,
    ChoiceResponse,
    Deleted,
    GenerateRequest,
    GenerateResponse,
    PolicyList,
    PolicyOut,
    ScoreRequest,
    ScoreResponse,
)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

steering = APIRouter()
policies = APIRouter()
status = APIRouter()
metrics = APIRouter()

key_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="Needed for PUT/DELETE when the server has an API key.",
)


# -------------------------------------------------------------------------------------- helpers
def check_texts(request: Request, texts: list[str], what: str) -> list[str]:
    """``texts`` within the server's limits (count, length, non-empty, valid Unicode), else 422."""
    limits = state.limits(request)
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


def batched(
    compute: Callable[[list[str]], dict[str, Any]],
    check: Callable[[list[str]], None] | None = None,
) -> Callable[[list[list[str]]], list[Any]]:
    """A worker job computing several requests' texts as one batch (coalesced /v1/score jobs).
    ``check`` runs on each request's texts first, on the worker (the tokenizer is not shared across
    threads); a request it refuses gets its error back as its result (:func:`_result`) and is left out of
    the batch, so it does not fail its neighbours."""

    def fn(payloads: list[list[str]]) -> list[Any]:
        errors: dict[int, ContextTooLong] = {}
        for i, p in enumerate(payloads):
            try:
                if check is not None:
                    check(p)
            except ContextTooLong as exc:
                errors[i] = exc
        todo = [p for i, p in enumerate(payloads) if i not in errors]
        if len(todo) == 1:
            done = [compute(todo[0])]
        elif todo:
            done = _split(compute([t for p in todo for t in p]), [len(p) for p in todo])
        else:
            done = []
        it = iter(done)
        return [errors[i] if i in errors else next(it) for i in range(len(payloads))]

    return fn


def _result(got: Any) -> dict[str, Any]:
    """A batched job's result for one request, or its error raised (see :func:`batched`)."""
    if isinstance(got, ContextTooLong):
        raise got
    return got


def hf_only(request: Request, route: str) -> None:
    """400 for a route the vLLM engine does not serve (it reads no probe vectors or answer logits)."""
    if vllm_api.vllm(request) is not None:
        raise ApiError(400, "not_on_vllm", f"{route} is served by the HF engine only; serve with --engine hf")


# ------------------------------------------------------------------------------------- steering
@steering.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, tags=["steering"])
async def score(req: ScoreRequest, request: Request) -> dict[str, Any]:
    """Probe probabilities for each text; with a policy, the probes read the pooled vector computed under
    steering."""
    engine = state.engine(request)
    texts = check_texts(request, req.texts, "texts")
    hf_only(request, "/v1/score")
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
    plan = state.make_plan(request, req.policy, req.alpha)
    result = _result(
        await state.run_job(
            request,
            batched(lambda t: engine.score(t, names, plan), engine.check_inputs),
            texts,
            ("score", plan.key(), tuple(names)),
            len(texts),
        )
    )
    state.metrics(request).observe_texts("/v1/score", len(texts))
    return {"model": state.model_name(request), **plan.describe(), **result}


@steering.post("/v1/choice", response_model=ChoiceResponse, responses=_ERRORS, tags=["steering"])
async def choice(req: ChoiceRequest, request: Request) -> dict[str, Any]:
    """Forced-choice P(Yes) / P(No) for a question about each text (safesteer.evaluate.choice)."""
    engine = state.engine(request)
    texts = check_texts(request, req.texts, "texts")
    hf_only(request, "/v1/choice")
    if not engine.can_choose:
        raise ApiError(
            400,
            "choice_unavailable",
            "forced choice is unavailable: the tokenizer has no single-token Yes/No",
        )
    plan = state.make_plan(request, req.policy, req.alpha)
    result = _result(
        await state.run_job(
            request,
            batched(
                lambda t: engine.choice(t, req.prompt_type, plan),
                lambda t: engine.check_inputs(t, req.prompt_type),
            ),
            texts,
            ("choice", plan.key(), req.prompt_type),
            len(texts),
        )
    )
    state.metrics(request).observe_texts("/v1/choice", len(texts))
    return {"model": state.model_name(request), **plan.describe(), **result}


@steering.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS, tags=["steering"])
async def generate(req: GenerateRequest, request: Request) -> dict[str, Any]:
    """Steered completions (causal models): greedy, or sampled with ``seed``; ``max_new_tokens`` is
    bounded."""
    engine, limits = state.engine(request), state.limits(request)
    prompts = check_texts(request, req.prompts, "prompts")
    if engine.backbone.kind != "causal":
        raise ApiError(400, "not_causal", "generation needs a causal LM; this server runs a masked LM")
    if req.max_new_tokens > limits.max_new_tokens:
        raise ApiError(
            422,
            "too_many_tokens",
            f"max_new_tokens {req.max_new_tokens} exceeds the limit of {limits.max_new_tokens}",
        )
    if not req.do_sample and (req.temperature is not None or req.top_p is not None):
        raise ApiError(422, "sampling_options_without_sampling", "temperature/top_p need do_sample: true")
    plan = state.make_plan(request, req.policy, req.alpha)
    if vllm_api.vllm(request) is not None:
        result = await vllm_api.generate(request, req, plan)
        state.metrics(request).observe_texts("/v1/generate", len(prompts))
        return {"model": state.model_name(request), **plan.describe(), **result}

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

    result = await state.run_job(request, fn, prompts, None, len(prompts))
    state.metrics(request).observe_texts("/v1/generate", len(prompts))
    return {"model": state.model_name(request), **plan.describe(), **result}


# ------------------------------------------------------------------------------------- policies
@policies.get("/v1/policies", response_model=PolicyList, tags=["policies"])
async def list_policies(request: Request) -> dict[str, Any]:
    """Every policy with its current version."""
    store = state.store(request)
    snap = store.snapshot()
    return {"policies": [snap[n].to_dict() for n in sorted(snap)], "version": store.version}


@policies.get("/v1/policies/{name}", response_model=PolicyOut, responses=_ERRORS, tags=["policies"])
async def get_policy(name: str, request: Request) -> dict[str, Any]:
    store = state.store(request)
    record = store.get(name)
    if record is None:
        raise state.unknown_policy(store, name)
    return record.to_dict()


@policies.put(
    "/v1/policies/{name}",
    response_model=PolicyOut,
    responses={**_ERRORS, 201: {"model": PolicyOut}},
    tags=["policies"],
)
async def put_policy(
    name: str,
    body: PolicyBody,
    response: Response,
    request: Request,
    _key: Optional[str] = Security(key_scheme),
) -> dict[str, Any]:
    """Create or replace a policy; validated against the loaded directions/probes/SAE, then swapped in
    atomically."""
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
        record, created = await run_in_threadpool(state.store(request).put, policy)
    except PolicyStorageError as exc:  # the server's disk, not the client's policy
        raise ApiError(500, "storage_error", exc.message) from None
    except SafesteerError as exc:
        raise ApiError(422, "invalid_policy", exc.message) from None
    state.metrics(request).observe_swap("put")
    response.status_code = 201 if created else 200
    return record.to_dict()


@policies.delete("/v1/policies/{name}", response_model=Deleted, responses=_ERRORS, tags=["policies"])
async def delete_policy(
    name: str, request: Request, _key: Optional[str] = Security(key_scheme)
) -> dict[str, Any]:
    """Remove a policy (requests already running keep the snapshot they started with)."""
    store = state.store(request)
    try:
        record = await run_in_threadpool(store.delete, name)
    except PolicyStorageError as exc:
        raise ApiError(500, "storage_error", exc.message) from None
    if record is None:
        raise ApiError(404, "unknown_policy", f"unknown policy '{name}'")
    state.metrics(request).observe_swap("delete")
    return {"deleted": name, "version": store.version}


# --------------------------------------------------------------------------------------- status
@status.get("/healthz", tags=["status"])
async def healthz(request: Request) -> dict[str, Any]:
    """Liveness plus what is loaded and the request limits."""
    engine = state.engine(request)
    backbone = engine.backbone
    return {
        "status": "ok",
        "version": __version__,
        "model": state.model_name(request),
        "kind": backbone.kind,
        "n_layers": backbone.n_layers,
        "d_model": backbone.d_model,
        "directions": {n: d.layer for n, d in engine.directions.items()},
        "probes": {n: p.layer for n, p in engine.probes.items()},
        "sae": engine.sae is not None,
        "sae_layer": engine.sae_layer,
        "policies": state.store(request).names(),
        "auth": bool(request.app.state.api_key),
        "queue": state.worker(request).queued,
        "engine": "hf" if vllm_api.vllm(request) is None else "vllm",
        "running": 0 if vllm_api.vllm(request) is None else vllm_api.vllm(request).running,
        "limits": asdict(state.limits(request)),
    }


@metrics.get("/metrics", response_class=PlainTextResponse, tags=["status"])
async def prometheus(request: Request) -> PlainTextResponse:
    """Prometheus text format: requests by endpoint/status, latency histograms, policy swaps, memory."""
    text = state.metrics(request).render(
        {
            "safesteer_policies": ("Policies currently served.", float(len(state.store(request)))),
            "safesteer_queue_depth": ("Jobs waiting for the model.", float(state.worker(request).queued)),
            "safesteer_engine_running": (
                "Requests running on the vLLM engine (0 on the HF engine).",
                float(0 if vllm_api.vllm(request) is None else vllm_api.vllm(request).running),
            ),
        }
    )
    return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)


def route_of(scope: dict) -> str | None:
    """The path template of the service route ``scope`` matches, for the metrics of a request the guard
    middleware answers before routing (401, 413). The OpenAI-compatible routes are not searched: such a
    request to them counts as ``unmatched``, as it did when these routes were registered on the app."""
    for router in (steering, policies, status, metrics):
        for route in router.routes:
            if isinstance(route, APIRoute) and route.matches(scope)[0] != Match.NONE:
                return route.path
    return None
