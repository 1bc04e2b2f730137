"""The FastAPI application of ``safesteer serve``.

Endpoints (JSON in, JSON out; errors are ``{"error": {"code", "message", "details"?}}`` with a 4xx
status for every client mistake):

``POST /v1/score``     probe probabilities for texts; with a policy the probes read the pooled
                       vector computed with steering active
``POST /v1/generate``  completions (causal models; greedy, or sampled with a seed)
``POST /v1/choice``    forced-choice P(Yes)/P(No) (:mod:`safesteer.evaluate.choice`)
``GET /v1/policies``, ``GET/PUT/DELETE /v1/policies/{name}``   policies, swapped atomically
``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /openapi.json``, ``GET /docs``

Every compute response names the policy snapshot it was served with (``policy``,
``policy_version``, ``alpha``) and which texts were steered (``steered``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import asdict
from typing import Any, Callable, Hashable, Literal, Mapping, Optional, Sequence

from fastapi import FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from safesteer import __version__
from safesteer.errors import SafesteerError
from safesteer.serve.engine import Engine, Limits, ModelWorker, Overloaded, Plan, ServedProbe, sae_layer_of, served_probes
from safesteer.serve.metrics import Metrics
from safesteer.serve.policies import Policy, PolicyBody, PolicyStorageError, PolicyStore, valid_name
from safesteer.steering import DirectionSet

API_KEY_HEADER = "X-API-Key"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ------------------------------------------------------------------------------------ schemas
class ErrorBody(BaseModel):
    code: str
    message: str
    details: Optional[list[dict[str, Any]]] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 503)
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Optional[str] = Field(None, max_length=128, description="Policy name (GET /v1/policies); none = unsteered.")
    alpha: Optional[float] = Field(None, allow_inf_nan=False,
                                   description="Override the policy's alpha within its bounds (needs a policy).")


class ScoreRequest(_Request):
    texts: list[str] = Field(min_length=1, description="Texts to score (see /healthz for the limits).")
    probes: Optional[list[str]] = Field(None, min_length=1, max_length=64, description="Probe names (default: all loaded).")


class ChoiceRequest(_Request):
    texts: list[str] = Field(min_length=1)
    prompt_type: Literal["harmful", "safe", "toxic"] = Field("harmful", description="Question asked about each text.")


class GenerateRequest(_Request):
    prompts: list[str] = Field(min_length=1, description="User messages (chat-templated when chat is true).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens to generate (bounded by the server's limit).")
    do_sample: bool = False
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Sampling seed (the same request gives the same output).")
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


# ------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error response with a status, a short code and a one-line message."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def _error_json(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                headers: Mapping[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          406: "not_acceptable", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
          422: "validation_error", 429: "too_many_requests", 503: "overloaded", 504: "timeout"}


def _clean_errors(errors: Sequence[Mapping[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    out = []
    for e in list(errors)[:limit]:
        out.append({"loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
                    "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", "value_error"))})
    return out


def _first_message(details: list[dict[str, Any]]) -> str:
    if not details:
        return "invalid request"
    d = details[0]
    loc = ".".join(str(x) for x in d["loc"] if x != "body") or "body"
    more = f" (+{len(details) - 1} more)" if len(details) > 1 else ""
    return f"{loc}: {d['msg']}{more}"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_json(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _clean_errors(exc.errors())
        if any(d["type"] == "json_invalid" for d in details):
            return _error_json(400, "malformed_json", "the request body is not valid JSON", details)
        if len(details) == 1 and details[0]["loc"] == ["body"] and details[0]["type"] in ("model_attributes_type", "dict_type",
                                                                                          "model_type"):
            return _error_json(422, "invalid_body", "the request body must be a JSON object (send Content-Type: application/json)",
                               details)
        return _error_json(422, "validation_error", _first_message(details), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        if exc.status_code == 400 and "parsing the body" in message:
            return _error_json(400, "malformed_json", "the request body cannot be parsed as JSON")
        return _error_json(exc.status_code, _CODES.get(exc.status_code, "http_error"), message, headers=exc.headers)

    @app.exception_handler(SafesteerError)
    async def _safesteer(_request: Request, exc: SafesteerError) -> JSONResponse:
        return _error_json(400, "bad_request", exc.message)

    @app.exception_handler(Overloaded)
    async def _overloaded(_request: Request, exc: Overloaded) -> JSONResponse:
        return _error_json(503, "overloaded", str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:  # a bug, never a client mistake
        return _error_json(500, "internal_error", f"internal server error ({type(exc).__name__})")


# --------------------------------------------------------------------------------- middleware
async def _send_json(send: Callable, status: int, payload: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Outermost app layer: metrics for every request, API-key check for policy writes, body size limit.

    The body is read here (at most ``max_body`` bytes; a larger Content-Length or a longer body is
    refused with 413 before any parsing) and replayed to the application.
    """

    WRITE_METHODS = frozenset({"PUT", "DELETE", "POST", "PATCH"})

    def __init__(self, app: Any, max_body: int, api_key: str | None, metrics: Metrics,
                 route_of: Callable[[dict], str | None] | None = None):
        self.app = app
        self.max_body = int(max_body)
        self.api_key = api_key
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            if not await self._handle(scope, receive, send_wrapper):
                status[0] = 499  # the client went away before sending its whole body
        finally:
            endpoint = getattr(scope.get("route"), "path", None)
            if endpoint is None and self.route_of is not None:  # answered here (401/413) before routing
                endpoint = self.route_of(scope)
            endpoint = endpoint or "unmatched"
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status[0], time.perf_counter() - start)

    def _authorised(self, scope: dict) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get(API_KEY_HEADER.lower())
        if given is None:
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        assert self.api_key is not None
        return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode("utf-8"))

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> bool:
        """False when the client disconnected before the body was read."""
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        if self.api_key and method in self.WRITE_METHODS and path.startswith("/v1/policies"):
            if not self._authorised(scope):
                await _send_json(send, 401, {"error": {"code": "unauthorized",
                                                       "message": f"missing or wrong API key; send it in the {API_KEY_HEADER} header"}},
                                 {"WWW-Authenticate": "Bearer"})
                return True
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    await _send_json(send, 400, {"error": {"code": "bad_request", "message": "Content-Length is not an integer"}})
                    return True
                if declared > self.max_body:
                    await _send_json(send, 413, {"error": {"code": "payload_too_large",
                                                           "message": f"request body of {declared} bytes exceeds the limit of {self.max_body} bytes"}})
                    return True
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_json(send, 413, {"error": {"code": "payload_too_large",
                                                       "message": f"request body exceeds the limit of {self.max_body} bytes"}})
                return True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
        return True


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
            return value[bounds[i]: bounds[i + 1]]
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
    engine = Engine(backbone, directions, served_probes(probes, backbone), sae,
                    sae_layer if sae_layer is not None else (sae_layer_of(sae) if sae is not None else None), limits)
    store = policy_store if policy_store is not None else PolicyStore()
    store.bind(engine.compile)
    metrics = Metrics()
    worker = ModelWorker(engine.lock, limits.max_queue, limits.batch_window_ms / 1000.0, limits.max_batch_texts,
                         on_batch=metrics.observe_batch)
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
    app.state.engine, app.state.store, app.state.worker, app.state.metrics, app.state.limits = engine, store, worker, metrics, limits
    _install_handlers(app)
    def route_of(scope: dict) -> str | None:
        for route in app.routes:
            if isinstance(route, APIRoute) and route.matches(scope)[0] != Match.NONE:
                return route.path
        return None

    app.add_middleware(GuardMiddleware, max_body=limits.max_body_bytes, api_key=api_key, metrics=metrics, route_of=route_of)
    key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Needed for PUT/DELETE when the server has an API key.")

    # ------------------------------------------------------------------ helpers
    def check_texts(texts: list[str], what: str) -> list[str]:
        if len(texts) > limits.max_texts:
            raise ApiError(422, "too_many_texts", f"{len(texts)} {what} exceed the limit of {limits.max_texts} per request")
        for i, t in enumerate(texts):
            if len(t) > limits.max_text_chars:
                raise ApiError(422, "text_too_long", f"{what}[{i}] has {len(t)} characters; the limit is {limits.max_text_chars}")
            if not t.strip():
                raise ApiError(422, "empty_text", f"{what}[{i}] is empty")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(422, "invalid_text", f"{what}[{i}] is not valid Unicode (lone surrogate)") from None
        return texts

    def make_plan(policy: str | None, alpha: float | None) -> Plan:
        if policy is None:
            if alpha is not None:
                raise ApiError(422, "alpha_without_policy", "alpha needs a policy; name one in 'policy'")
            return Plan()
        record = store.get(policy)  # the snapshot this request is served with
        if record is None:
            raise ApiError(404, "unknown_policy", f"unknown policy '{policy}'; known policies: {_names(store.names())}")
        try:
            return Plan(record, engine.resolve_alpha(record, alpha))
        except SafesteerError as exc:
            raise ApiError(422, "alpha_out_of_bounds", exc.message) from None

    async def run_job(fn: Callable[[list[Any]], list[Any]], payload: Any, key: Hashable | None, size: int) -> Any:
        future = worker.submit(fn, payload, key, size)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"the model did not answer within {limits.request_timeout_s:g} s") from None

    def batched(compute: Callable[[list[str]], dict[str, Any]]) -> Callable[[list[list[str]]], list[dict[str, Any]]]:
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
            raise ApiError(422, "unknown_probe", f"unknown probe '{unknown[0]}'; loaded probes: {', '.join(engine.probes)}")
        plan = make_plan(req.policy, req.alpha)
        result = await run_job(batched(lambda t: engine.score(t, names, plan)), texts,
                               ("score", plan.key(), tuple(names)), len(texts))
        metrics.observe_texts("/v1/score", len(texts))
        return {"model": model_name, **plan.describe(), **result}

    @app.post("/v1/choice", response_model=ChoiceResponse, responses=_ERRORS, tags=["steering"])
    async def choice(req: ChoiceRequest) -> dict[str, Any]:
        """Forced-choice P(Yes) / P(No) for a question about each text (safesteer.evaluate.choice)."""
        texts = check_texts(req.texts, "texts")
        if not engine.can_choose:
            raise ApiError(400, "choice_unavailable", "forced choice is unavailable: the tokenizer has no single-token Yes/No")
        plan = make_plan(req.policy, req.alpha)
        result = await run_job(batched(lambda t: engine.choice(t, req.prompt_type, plan)), texts,
                               ("choice", plan.key(), req.prompt_type), len(texts))
        metrics.observe_texts("/v1/choice", len(texts))
        return {"model": model_name, **plan.describe(), **result}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS, tags=["steering"])
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """Steered completions (causal models): greedy, or sampled with ``seed``; ``max_new_tokens`` is bounded."""
        prompts = check_texts(req.prompts, "prompts")
        if backbone.kind != "causal":
            raise ApiError(400, "not_causal", "generation needs a causal LM; this server runs a masked LM")
        if req.max_new_tokens > limits.max_new_tokens:
            raise ApiError(422, "too_many_tokens", f"max_new_tokens {req.max_new_tokens} exceeds the limit of {limits.max_new_tokens}")
        if not req.do_sample and (req.temperature is not None or req.top_p is not None):
            raise ApiError(422, "sampling_options_without_sampling", "temperature/top_p need do_sample: true")
        plan = make_plan(req.policy, req.alpha)

        def fn(payloads: list[list[str]]) -> list[dict[str, Any]]:
            return [engine.generate(payloads[0], plan, req.max_new_tokens, req.do_sample, req.seed, req.temperature,
                                    req.top_p, req.chat)]

        result = await run_job(fn, prompts, None, len(prompts))
        metrics.observe_texts("/v1/generate", len(prompts))
        return {"model": model_name, **plan.describe(), **result}

    # ---------------------------------------------------------------- policies
    def get_record(name: str):
        record = store.get(name)
        if record is None:
            raise ApiError(404, "unknown_policy", f"unknown policy '{name}'; known policies: {_names(store.names())}")
        return record

    @app.get("/v1/policies", response_model=PolicyList, tags=["policies"])
    async def list_policies() -> dict[str, Any]:
        """Every policy with its current version."""
        snap = store.snapshot()
        return {"policies": [snap[n].to_dict() for n in sorted(snap)], "version": store.version}

    @app.get("/v1/policies/{name}", response_model=PolicyOut, responses=_ERRORS, tags=["policies"])
    async def get_policy(name: str) -> dict[str, Any]:
        return get_record(name).to_dict()

    @app.put("/v1/policies/{name}", response_model=PolicyOut, responses={**_ERRORS, 201: {"model": PolicyOut}}, tags=["policies"])
    async def put_policy(name: str, body: PolicyBody, response: Response,
                         _key: Optional[str] = Security(key_scheme)) -> dict[str, Any]:
        """Create or replace a policy; validated against the loaded directions/probes/SAE, then swapped in atomically."""
        if not valid_name(name):
            raise ApiError(422, "invalid_policy_name", f"policy name {name!r} must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit")
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
            "status": "ok", "version": __version__, "model": model_name, "kind": backbone.kind,
            "n_layers": backbone.n_layers, "d_model": backbone.d_model,
            "directions": {n: d.layer for n, d in engine.directions.items()},
            "probes": {n: p.layer for n, p in engine.probes.items()},
            "sae": engine.sae is not None, "sae_layer": engine.sae_layer,
            "policies": store.names(), "auth": bool(api_key), "queue": worker.queued, "limits": asdict(limits),
        }

    @app.get("/metrics", response_class=PlainTextResponse, tags=["status"])
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format: requests by endpoint/status, latency histograms, policy swaps, memory."""
        text = metrics.render({"safesteer_policies": ("Policies currently served.", float(len(store))),
                               "safesteer_queue_depth": ("Jobs waiting for the model.", float(worker.queued))})
        return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)

    return app
