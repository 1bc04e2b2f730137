"""OpenAI-compatible endpoints of the steering service: ``POST /v1/chat/completions``, ``GET /v1/models``.

Any OpenAI client works against ``http://HOST:PORT/v1``::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m:recommended", messages=[...])

**Policy.** The model name is ``<model>`` (unsteered) or ``<model>:<policy>`` (steered by that
policy); ``GET /v1/models`` lists both forms for every current policy. The policy may instead be
named in the extra body field ``policy`` (``extra_body={"policy": ..., "alpha": ...}`` in the
client); naming two different policies is an error. The policy snapshot is taken once per request.

**Sampling.** ``temperature`` absent or 0: greedy (deterministic); > 0: sampling with ``top_p`` and
``seed`` (default 0, so the same request gives the same text). ``max_tokens`` (or
``max_completion_tokens``) is bounded by the server's ``max_new_tokens`` limit. ``n`` must be 1.

**Streaming.** ``stream: true`` answers ``text/event-stream``: ``data: {chat.completion.chunk}``
events as tokens are generated (a first chunk with the role, content deltas, a last chunk with
``finish_reason``), then ``data: [DONE]``.

**What was applied.** Every response (and every chunk) carries ``safesteer``: ``policy``,
``policy_version``, ``alpha``, ``steered`` (false without a policy, or when a conditional policy's
probe stayed at or below its threshold on the chat's requests — the last ``condition.window`` user
turns joined, :func:`~safesteer.steering.conversation.gate_text`, the rule the behaviour study
calibrates the gate with) and ``condition_probability``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from safesteer.errors import ContextTooLong
from safesteer.models.backbone import render_chat
from safesteer.serve import chat_events, state, vllm_api
from safesteer.serve.engine import Engine, check_context, n_tokens
from safesteer.serve.http import _ERRORS, ApiError
from safesteer.serve.limits import Limits
from safesteer.serve.plan import Plan
from safesteer.steering.conversation import gate_text

MAX_MESSAGES = 64
DEFAULT_MAX_TOKENS = 64


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients add name/tool fields we do not use
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1, max_length=256, description="'<model>' or '<model>:<policy>' (GET /v1/models)."
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    policy: Optional[str] = Field(
        None, max_length=128, description="safesteer: the policy (instead of '<model>:<policy>')."
    )
    alpha: Optional[float] = Field(
        None, allow_inf_nan=False, description="safesteer: override the policy's alpha within its bounds."
    )


class SteeringInfo(BaseModel):
    policy: Optional[str]
    policy_version: Optional[int]
    alpha: Optional[float]
    steered: bool
    condition_probability: Optional[float] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    safesteer: SteeringInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "safesteer"
    safesteer: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _Streamer:
    """transformers streamer: new token ids of row 0 go to an asyncio queue (the prompt's ids are skipped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("tokens", ids))

    def end(self) -> None:
        pass


def render_messages(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The chat rendered as the study and the evaluation render it
    (:func:`~safesteer.models.backbone.render_chat`: the tokenizer's template, ready for the
    assistant's turn; without one, a lone user message as is, a longer chat as a transcript)."""
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    return render_chat(tokenizer, plain)


router = APIRouter(tags=["openai"])
"""The OpenAI-compatible routes; handlers read the server from ``request.app.state``
(:mod:`~safesteer.serve.state`)."""


def _resolve(request: Request, req: ChatCompletionRequest) -> Plan:
    """The plan named by the model (``<model>:<policy>``) or the body's ``policy``."""
    model_name = state.model_name(request)
    base, sep, from_name = req.model.partition(":")
    if base != model_name:
        raise ApiError(
            404,
            "model_not_found",
            f"unknown model '{req.model}'; this server serves '{model_name}' and "
            f"'{model_name}:<policy>' (GET /v1/models)",
        )
    if sep and not from_name:
        raise ApiError(422, "invalid_model", f"model '{req.model}' names no policy after ':'")
    if from_name and req.policy and from_name != req.policy:
        raise ApiError(
            422,
            "conflicting_policy",
            f"the model names policy '{from_name}' but the body names '{req.policy}'; name one",
        )
    return state.make_plan(request, from_name or req.policy, req.alpha)


def _check(req: ChatCompletionRequest, backbone: Any, limits: Limits) -> tuple[str, int]:
    """(the rendered chat, max new tokens) after checking the request."""
    if backbone.kind != "causal":
        raise ApiError(400, "not_causal", "chat completion needs a causal LM; this server runs a masked LM")
    for i, m in enumerate(req.messages):
        if len(m.text()) > limits.max_text_chars:
            raise ApiError(
                422,
                "text_too_long",
                f"messages[{i}] has {len(m.text())} characters; the limit is {limits.max_text_chars}",
            )
    users = [m.text() for m in req.messages if m.role == "user"]
    if not users or not users[-1].strip():
        raise ApiError(422, "no_user_message", "messages need a non-empty user message")
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise ApiError(422, "conflicting_max_tokens", "max_tokens and max_completion_tokens differ; give one")
    max_new = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_new_tokens)
    if max_new > limits.max_new_tokens:
        raise ApiError(
            422, "too_many_tokens", f"max_tokens {max_new} exceeds the limit of {limits.max_new_tokens}"
        )
    if req.temperature in (None, 0.0) and req.top_p is not None:
        raise ApiError(
            422,
            "top_p_without_temperature",
            "top_p needs a temperature > 0 (temperature 0 or absent is greedy)",
        )
    return render_messages(backbone.tokenizer, req.messages), int(max_new)


def _generate(
    engine: Engine,
    plan: Plan,
    rendered: str,
    max_new: int,
    req: ChatCompletionRequest,
    streamer: _Streamer | None,
) -> dict[str, Any]:
    """Runs on the model worker: the policy's edit as a hook around ``model.generate``."""
    backbone = engine.backbone
    cp = plan.compiled
    cond_p = None
    steer = cp is not None
    if cp is not None and cp.condition is not None:
        # the service's one gate decision (position, logit threshold) on the chat's requests: the last
        # `window` user turns, the rule the behaviour study calibrated the gate with
        p, rows, _ = engine.condition_rows(cp, [gate_text(req.messages, cp.window)])
        cond_p, steer = float(p[0]), bool(rows[0])
    info = {**plan.describe(), "steered": bool(steer), "condition_probability": cond_p}
    n_prompt = n_tokens(backbone, rendered)
    try:  # counted uncut: a prompt past the served context is refused, never cut (its end is the request)
        check_context(backbone, n_prompt, max_new)
    except ContextTooLong as exc:
        raise ApiError(422, "context_length_exceeded", exc.message) from None
    enc = backbone.tokenize([rendered], add_special_tokens=False)
    if streamer is not None:
        streamer.loop.call_soon_threadsafe(streamer.queue.put_nowait, ("info", info))
    sampling = bool(req.temperature)
    kw: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        kw["temperature"] = float(req.temperature)
        if req.top_p is not None:
            kw["top_p"] = float(req.top_p)
        torch.manual_seed(int(req.seed or 0))
    tok = backbone.tokenizer
    ctx = backbone.steer(cp.layer, edit=cp.edit(plan.alpha or 0.0), where=cp.where) if steer else _null()
    with ctx, torch.inference_mode():
        out = backbone.model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=max_new,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            streamer=streamer,
            **kw,
        )
    new = out[0, n_prompt:].tolist()
    eos = {tok.eos_token_id} | set(_as_list(getattr(backbone.model.generation_config, "eos_token_id", None)))
    finished = bool(new) and new[-1] in eos
    text = tok.decode(new, skip_special_tokens=True)
    return {
        "text": text,
        "prompt_tokens": n_prompt,
        "completion_tokens": len(new),
        "finish_reason": "stop" if finished or len(new) < max_new else "length",
        "info": info,
    }


def _submit(request: Request, fn: Callable[[], dict[str, Any]]) -> Any:
    """Queue ``fn`` on the model worker; returns an awaitable bounded by the request timeout."""
    future = state.worker(request).submit(lambda payloads: [fn()], None, None, 1)
    return asyncio.wait_for(asyncio.wrap_future(future), state.limits(request).request_timeout_s)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    """OpenAI chat completion, optionally steered by a policy (model '<model>:<policy>' or body 'policy')."""
    engine, limits = state.engine(request), state.limits(request)
    plan = _resolve(request, req)
    rendered, max_new = _check(req, engine.backbone, limits)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    state.metrics(request).observe_texts("/v1/chat/completions", 1)
    if vllm_api.vllm(request) is not None:  # --engine vllm: one vLLM request, steered in its own rows
        return await vllm_api.chat(request, req, plan, rendered, max_new, cid, created)
    if not req.stream:
        try:
            r = await _submit(request, lambda: _generate(engine, plan, rendered, max_new, req, None))
        except asyncio.TimeoutError:
            raise ApiError(
                504, "timeout", f"the model did not answer within {limits.request_timeout_s:g} s"
            ) from None
        return chat_events.completion(
            cid,
            created,
            req.model,
            r["info"],
            r["text"],
            r["finish_reason"],
            r["prompt_tokens"],
            r["completion_tokens"],
        )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    streamer = _Streamer(loop, queue)
    done = _submit(request, lambda: _generate(engine, plan, rendered, max_new, req, streamer))
    return StreamingResponse(
        _events(cid, created, req.model, queue, done, engine.backbone.tokenizer, limits.request_timeout_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _events(
    cid: str, created: int, model: str, queue: asyncio.Queue, done: Any, tok: Any, timeout_s: float
) -> AsyncIterator[bytes]:
    """The ``text/event-stream`` of a streamed completion: role, content deltas, finish, ``[DONE]``."""
    task = asyncio.ensure_future(done)
    task.add_done_callback(lambda _t: queue.put_nowait(("end", None)))

    def chunk(delta: dict, finish: str | None, info: dict) -> bytes:
        return chat_events.chunk(cid, created, model, delta, finish, info)

    ids: list[int] = []
    sent = ""
    info0: dict | None = None
    while True:
        kind, value = await queue.get()
        if kind == "end":
            break
        if kind == "info":  # what is applied, known before the first token
            info0 = value
            yield chunk({"role": "assistant", "content": ""}, None, info0)
            continue
        ids.extend(value)
        text = tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is not complete yet
        if len(text) > len(sent):
            yield chunk({"content": text[len(sent) :]}, None, info0)
            sent = text
    try:
        r = task.result()
    except asyncio.TimeoutError:
        yield chat_events.error_event("timeout", f"the model did not answer within {timeout_s:g} s")
        return
    except ApiError as exc:
        yield chat_events.error_event(exc.code, exc.message)
        return
    if info0 is None:
        yield chunk({"role": "assistant", "content": ""}, None, r["info"])
    if len(r["text"]) > len(
        sent
    ):  # the full decode can differ at the very end (a trailing partial character)
        yield chunk({"content": r["text"][len(sent) :]}, None, r["info"])
    yield chunk({}, r["finish_reason"], r["info"])
    yield b"data: [DONE]\n\n"


def _cards(request: Request) -> list[dict[str, Any]]:
    """The model unsteered, then ``<model>:<policy>`` for every current policy."""
    model_name = state.model_name(request)
    out = [{"id": model_name, "created": request.app.state.started, "safesteer": {"policy": None}}]
    for name, rec in sorted(state.store(request).snapshot().items()):
        out.append(
            {
                "id": f"{model_name}:{name}",
                "created": int(rec.updated_at),
                "safesteer": {"policy": name, "policy_version": rec.version, "alpha": rec.policy.alpha},
            }
        )
    return out


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> dict[str, Any]:
    """The model unsteered, and '<model>:<policy>' for every current policy."""
    return {"object": "list", "data": _cards(request)}


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    for card in _cards(request):
        if card["id"] == model_id:
            return card
    raise ApiError(404, "model_not_found", f"unknown model '{model_id}' (GET /v1/models)")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]


__all__ = ["ChatCompletionRequest", "render_messages", "router"]
