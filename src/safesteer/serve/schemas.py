"""Request and response bodies of the service's own endpoints (``/v1/score``, ``/v1/choice``,
``/v1/generate``, ``/v1/policies``); the OpenAI-compatible ones are in :mod:`safesteer.serve.openai_api`."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


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
