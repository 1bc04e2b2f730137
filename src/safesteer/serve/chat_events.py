"""The bodies of ``/v1/chat/completions`` shared by the HF and the vLLM paths: the whole completion, one
``text/event-stream`` chunk, an error event."""

from __future__ import annotations

import json
from typing import Any


def completion(
    cid: str,
    created: int,
    model: str,
    info: dict[str, Any],
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A ``chat.completion`` (its ``object`` field comes from the response model)."""
    return {
        "id": cid,
        "created": created,
        "model": model,
        "safesteer": info,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None, info: Any) -> bytes:
    """One ``data: {chat.completion.chunk}`` event."""
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "safesteer": info,
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def error_event(code: str, message: str) -> bytes:
    """An error inside a started stream (the status line is already sent)."""
    return f"data: {json.dumps({'error': {'code': code, 'message': message}})}\n\n".encode()
