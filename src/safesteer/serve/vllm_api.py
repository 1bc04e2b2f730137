"""The compute routes' vLLM path: ``/v1/chat/completions`` (plain and SSE) and ``/v1/generate``.

The routes of :mod:`~safesteer.serve.openai_api` and :mod:`~safesteer.serve.routes` check and
resolve a request as for the HF engine (same errors, same plan: the policy snapshot taken once, at
admission), then hand it here when the app runs on :class:`~safesteer.serve.vllm_engine.VllmEngine`.
Each request becomes one vLLM request carrying its own :class:`~safesteer.serve.vllm_hooks.RequestSteer`
(gate span from its token ids, the snapshot's edit and threshold); a policy swapped or deleted
while it runs does not change it. A client that disconnects (or times out) aborts its vLLM request.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from safesteer.errors import ContextTooLong, SafesteerError
from safesteer.models.positions import prompt_end_length, user_header
from safesteer.serve import chat_events, state
from safesteer.serve.http import ApiError
from safesteer.serve.limits import check_fits
from safesteer.serve.plan import Plan
from safesteer.serve.vllm_engine import VllmEngine, cache_salt
from safesteer.serve.vllm_hooks import RequestSteer, gate_span
from safesteer.steering.conversation import gate_text
from safesteer.steering.segments import pieces

GATE_POSITIONS = ("prompt", "prompt_end")


def check_policy(cp: Any) -> Any:
    """Raise SafesteerError when the vLLM engine cannot serve compiled policy ``cp`` as the HF engine does."""
    if cp.condition is None:
        return cp
    if cp.position not in GATE_POSITIONS:
        raise SafesteerError(
            f"the vllm engine reads a gate in the request's own pass, on its chat prompt: condition "
            f"position must be one of {', '.join(GATE_POSITIONS)}, not '{cp.position}' (or serve with "
            "--engine hf)"
        )
    probe = cp.condition.probe
    if not hasattr(probe, "condition") and (
        getattr(probe, "w", None) is None or getattr(probe, "b", None) is None
    ):
        raise SafesteerError(
            f"probe '{cp.condition.name}' has no raw-space weights; the vllm engine gates with a linear "
            "probe (w, b) or a trained gate"
        )
    gate = cp.gate()
    if max(gate.layers) > cp.layer:
        raise SafesteerError(
            f"the gate reads layer {max(gate.layers)}, after the steering layer {cp.layer}; the vllm engine "
            "reads the gate in the same pass: gate at or before the steering layer (or --engine hf)"
        )
    return cp


def vllm(request: Request) -> VllmEngine | None:
    """The app's vLLM engine, or None (the HF engine serves)."""
    return getattr(request.app.state, "vllm", None)


def request_steer(
    backbone: Any,
    plan: Plan,
    ids: list[int],
    decided: dict[str, Any] | None = None,
    gate_only: bool = False,
    floor: float | None = None,
) -> tuple[RequestSteer | None, str | None]:
    """The request's hook state and prefix-cache salt (None, None: unsteered, shares the cache).

    ``decided``: the gate already decided in a pass of its own (:func:`gate_pass`): a flagged request
    is steered unconditionally, an unflagged one runs plain. ``gate_only``: read the gate, steer
    nothing (that pass's KV is unsteered and shares the cache). ``floor``: the in-pass gate's score is
    at least this (a segmented gate's pieces, read before)."""
    cp = plan.compiled
    if cp is None or (decided is not None and not decided["steered"]):
        return None, None
    kw: dict[str, Any] = {}
    if cp.condition is not None and decided is None:
        gate = cp.gate()
        n_end = prompt_end_length(backbone)
        header = user_header(backbone) if gate.position == "prompt" else ()
        kw = {
            "gate": gate.torch_scorer("cpu"),
            "gate_layers": tuple(gate.layers),
            "threshold": float(gate.threshold),
            "span": gate_span(ids, gate.position, n_end, header),
            "floor": floor,
        }
    if gate_only:
        return RequestSteer(-1, lambda h: h, "all", len(ids), **kw), None
    rs = RequestSteer(cp.layer, cp.edit(plan.alpha or 0.0), cp.where, len(ids), **kw)
    rec = plan.record
    salt = cache_salt(rec.name, rec.version, float(plan.alpha or 0.0), bool(kw), cp.where)
    return rs, salt


async def gate_pass(request: Request, plan: Plan, gate: Any, rendered: str) -> dict[str, Any] | None:
    """The gate's decision when the text the HF engine gates on — ``gate``: a chat's messages
    (:func:`~safesteer.steering.conversation.gate_text`) or a prompt, rendered alone — is not the
    request's own prompt (a conversation, a system message, surrounding spaces, ``chat: false``), or
    when the gate is segmented: one prefill of that text on vLLM (nothing steered, one token), and one
    per piece of it (:func:`~safesteer.steering.segments.pieces`, each rendered as its own user
    message), all at once; a segmented decision is the largest score of them (the HF engine's
    :func:`~safesteer.steering.segments.segment_max`). None when the request's own pass reads it (a
    single-turn chat of one piece) or the plan has no condition; ``{"floor": s}`` when the request's
    own pass reads the whole and ``s`` is its pieces' largest score."""
    cp = plan.compiled
    if cp is None or cp.condition is None:
        return None
    backbone = state.engine(request).backbone
    said = gate_text(gate, cp.window) if not isinstance(gate, str) else gate.strip()
    text = backbone.chat_prompt(said)
    parts = pieces(said) if cp.segments else []
    own = text == rendered  # the request's own pass reads the whole prompt
    if own and not parts:
        return None
    tok = backbone.tokenizer
    runs: list[Run] = []
    try:
        for t in [*([] if own else [text]), *(backbone.chat_prompt(p) for p in parts)]:
            ids = list(tok(t, add_special_tokens=False)["input_ids"])
            runs.append(Run(request, ids, {"max_tokens": 1, "temperature": 0.0}, plan, 1, gate_only=True))
        await asyncio.gather(*(collect(r) for r in runs))
    except BaseException:
        for r in runs:
            if not r.finished:
                r.engine.abort(r.rid)
        raise
    decisions = [r.decision for r in runs]
    if any(d is None or d.get("score") is None for d in decisions):  # answered without reading the gate
        raise ApiError(500, "internal_error", "a gate pass returned no decision")
    if own:
        return {"floor": max(d["score"] for d in decisions)}
    if len(decisions) == 1:
        return decisions[0]
    return {"steered": any(d["steered"] for d in decisions), "score": max(d["score"] for d in decisions)}


def sampling(max_new: int, temperature: float | None, top_p: float | None, seed: int | None) -> dict:
    """vLLM SamplingParams arguments: greedy without a temperature, else seeded sampling."""
    if not temperature:
        return {"max_tokens": int(max_new), "temperature": 0.0}
    out = {"max_tokens": int(max_new), "temperature": float(temperature), "seed": int(seed or 0)}
    if top_p is not None:
        out["top_p"] = float(top_p)
    return out


class Run:
    """One request on the vLLM engine, seen from the event loop: its events in an asyncio queue."""

    def __init__(
        self,
        request: Request,
        ids: list[int],
        params: dict,
        plan: Plan,
        max_new: int,
        decided: dict[str, Any] | None = None,
        gate_only: bool = False,
    ):
        floor = None
        if decided is not None and "floor" in decided:  # read in the request's own pass, at least this
            floor, decided = float(decided["floor"]), None
        self.request, self.engine, self.plan, self.decided = request, vllm(request), plan, decided
        self.decision: dict[str, Any] | None = None
        backbone = state.engine(request).backbone
        limit = self.engine.settings.max_model_len
        try:
            check_fits(len(ids), max_new, limit)
        except ContextTooLong as exc:
            raise ApiError(422, "context_length_exceeded", exc.message) from None
        steer, salt = request_steer(backbone, plan, ids, decided, gate_only, floor)
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.n_prompt = len(ids)
        self.finished = False
        self.info: dict[str, Any] | None = None

        def sink(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

        try:
            self.rid = self.engine.submit(ids, params, steer, salt, sink)
        except SafesteerError as exc:
            raise ApiError(503, "shutting_down", exc.message) from None

    def describe(self, decision: dict[str, Any]) -> dict[str, Any]:
        score = decision.get("score")
        p = None if score is None else 1.0 / (1.0 + math.exp(-max(min(score, 700.0), -700.0)))
        return {**self.plan.describe(), "steered": bool(decision["steered"]), "condition_probability": p}

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("info", info), ("tokens", ids)…, then ("done", finish_reason); raises ApiError on failure
        (504 after the request timeout; the vLLM request is aborted)."""
        timeout = state.limits(self.request).request_timeout_s
        loop = asyncio.get_running_loop()
        checked = loop.time()
        deadline = checked + timeout
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(self.queue.get(), 1.0)
                except asyncio.TimeoutError:
                    if loop.time() > deadline:
                        raise ApiError(
                            504, "timeout", f"the model did not answer within {timeout:g} s"
                        ) from None
                    if await self.request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if loop.time() - checked > 1.0:  # tokens keep coming: still look for a gone client
                    checked = loop.time()
                    if await self.request.is_disconnected():
                        raise asyncio.CancelledError
                if kind == "info":
                    self.decision = value
                    self.info = self.describe(self.decided if self.decided is not None else value)
                    yield kind, self.info
                elif kind == "tokens":
                    self.ids.extend(value)
                    yield kind, value
                elif kind == "done":
                    self.finished = True
                    yield kind, value
                    return
                elif kind == "error":
                    self.finished = True
                    raise ApiError(422, "rejected", f"the engine refused the request: {value}")
                else:  # aborted
                    self.finished = True
                    raise ApiError(499, "aborted", "the request was aborted")
        finally:
            if not self.finished:
                self.engine.abort(self.rid)

    def text(self) -> str:
        return state.engine(self.request).backbone.tokenizer.decode(self.ids, skip_special_tokens=True)


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def collect(run: Run) -> dict[str, Any]:
    reason = "stop"
    async for kind, value in run.events():
        if kind == "done":
            reason = finish(value)
    info = run.info or run.describe(run.decided or {"steered": False})
    return {"text": run.text(), "finish_reason": reason, "info": info, "completion_tokens": len(run.ids)}


async def chat(request: Request, req: Any, plan: Plan, rendered: str, max_new: int, cid: str, created: int):
    """The vLLM path of ``/v1/chat/completions`` (plain and ``stream: true``)."""
    tok = state.engine(request).backbone.tokenizer
    ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
    decided = await gate_pass(request, plan, req.messages, rendered)
    run = Run(request, ids, sampling(max_new, req.temperature, req.top_p, req.seed), plan, max_new, decided)
    if not req.stream:
        r = await collect(run)
        return chat_events.completion(
            cid,
            created,
            req.model,
            r["info"],
            r["text"],
            r["finish_reason"],
            len(ids),
            r["completion_tokens"],
        )
    return StreamingResponse(
        _stream(run, cid, created, req.model, tok),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _stream(run: Run, cid: str, created: int, model: str, tok: Any) -> AsyncIterator[bytes]:
    def chunk(delta: dict, finish_reason: str | None, info: dict | None) -> bytes:
        return chat_events.chunk(cid, created, model, delta, finish_reason, info)

    sent = ""
    try:
        async for kind, value in run.events():
            if kind == "info":
                yield chunk({"role": "assistant", "content": ""}, None, run.info)
            elif kind == "tokens":
                text = tok.decode(run.ids, skip_special_tokens=True)
                if text.endswith("\ufffd") or len(text) <= len(sent):
                    continue  # a multi-byte character is not complete yet
                yield chunk({"content": text[len(sent) :]}, None, run.info)
                sent = text
            else:
                text = run.text()
                if len(text) > len(sent):
                    yield chunk({"content": text[len(sent) :]}, None, run.info)
                yield chunk({}, finish(value), run.info)
                yield b"data: [DONE]\n\n"
    except ApiError as exc:
        yield chat_events.error_event(exc.code, exc.message)
    finally:  # the client went away while a chunk was being sent: abort the vLLM request too
        if not run.finished:
            run.engine.abort(run.rid)


async def generate(request: Request, req: Any, plan: Plan) -> dict[str, Any]:
    """The vLLM path of ``/v1/generate``: every prompt a vLLM request (batched by the engine)."""
    backbone = state.engine(request).backbone
    tok = backbone.tokenizer
    runs: list[Run] = []
    try:
        for i, p in enumerate(req.prompts):
            rendered = backbone.chat_prompt(p) if req.chat else p
            ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
            decided = await gate_pass(request, plan, p, rendered)
            temperature = (req.temperature or 1.0) if req.do_sample else None
            params = sampling(req.max_new_tokens, temperature, req.top_p, int(req.seed) + i)
            runs.append(Run(request, ids, params, plan, req.max_new_tokens, decided))
        results = await asyncio.gather(*(collect(r) for r in runs))
    except BaseException:
        for r in runs:
            if not r.finished:
                r.engine.abort(r.rid)
        raise
    out: dict[str, Any] = {
        "completions": [r["text"] for r in results],
        "steered": [bool(r["info"]["steered"]) for r in results],
    }
    if plan.compiled is not None and plan.compiled.condition is not None:
        out["condition_probability"] = [r["info"]["condition_probability"] for r in results]
    return out
