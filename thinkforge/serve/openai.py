"""The OpenAI wire format: request shapes, response bodies, SSE chunks and the error tree.

The Serve front door (``thinkforge.serve.ingress``) and the MLflow pyfunc model
(``thinkforge.serve.pyfunc``) answer in these shapes. A replica's ``final`` event (see
``thinkforge.serve.replica``) becomes a ``chat.completion`` or ``text_completion`` body,
its event stream becomes SSE chunks:

    body = ChatRequest.model_validate(json_body)    # pydantic errors: 400 in the handler
    payload = body.payload()                         # what the replica reads; BadRequest
    chat_completion(new_id("chatcmpl"), "s1", final)
    StreamingResponse(chat_chunks(rid, "s1", events, include_usage), ...)

Errors, translated to OpenAI's ``{"error": {message, type, param, code}}`` in one handler::

    ApiError                 (status, type, code)
    +-- BadRequest           400  request validation, replica's RequestRejected
    +-- ModelNotFound        404  unknown ``model``
    +-- Overloaded           503  max_queued_requests exceeded, no replica (Retry-After)
    +-- UpstreamTimeout      504  the model's request_timeout_s passed

No Ray, FastAPI or torch import: pydantic only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from thinkforge.serve.config import ReasoningEffort, ThinkingParams

__all__ = [
    "ApiError",
    "BadRequest",
    "ChatRequest",
    "CompletionRequest",
    "GenerationBody",
    "ModelNotFound",
    "Overloaded",
    "UpstreamTimeout",
    "chat_chunks",
    "chat_completion",
    "completion_chunks",
    "new_id",
    "text_completion",
]


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ApiError):
    status, type = 400, "invalid_request_error"


class ModelNotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class Overloaded(ApiError):
    status, type, code = 503, "server_error", "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, round(retry_after_s)))}


class UpstreamTimeout(ApiError):
    status, type, code = 504, "server_error", "timeout"


# ---------------------------------------------------------------- request shapes


class GenerationBody(BaseModel):
    """What ``/v1/chat/completions`` and ``/v1/completions`` share."""

    # Unknown fields are ignored, as OpenAI-compatible servers do: SDKs send extras.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    reasoning_effort: ReasoningEffort | None = None
    thinking: ThinkingParams | None = None

    def payload(self) -> dict[str, Any]:
        """The replica's request dict; ``BadRequest`` for what pydantic cannot check."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and len(stop) > 4:
            raise BadRequest("at most 4 stop sequences", param="stop")
        return {
            "thinking": self.thinking.model_dump() if self.thinking else None,
            "reasoning_effort": self.reasoning_effort,
            "max_completion_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": stop,
        }

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise BadRequest("only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(GenerationBody):
    messages: list[_Message] = Field(min_length=1)

    def payload(self) -> dict[str, Any]:
        # Earlier assistant turns go in without their reasoning, as Qwen3 templates do.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
        return super().payload() | {"messages": messages}


class CompletionRequest(GenerationBody):
    prompt: str | list[str] = Field(min_length=1)

    def payload(self) -> dict[str, Any]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("send one prompt per request", param="prompt")
            prompt = prompt[0]
        return super().payload() | {"prompt": prompt}


# ---------------------------------------------------------------- response bodies


def new_id(kind: str) -> str:
    """A response id: ``chatcmpl-<hex>`` or ``cmpl-<hex>``."""
    return f"{kind}-{uuid.uuid4().hex}"


def _usage(final: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = final["prompt_tokens"], final["completion_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": final["reasoning_tokens"]},
    }


def _reasoning(text: str) -> dict[str, str]:
    """The thinking text under both names clients read: ``reasoning_content`` (DeepSeek,
    vLLM before its rename) and ``reasoning`` (vLLM since)."""
    return {"reasoning_content": text, "reasoning": text}


def chat_completion(rid: str, model: str, final: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` from a replica's final event."""
    message = {"role": "assistant", "content": final["content"], **_reasoning(final["reasoning"])}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": final["finish_reason"]}],
        "usage": _usage(final),
        "thinking": final["thinking"],
    }


def text_completion(rid: str, model: str, final: dict[str, Any]) -> dict[str, Any]:
    """A ``text_completion`` from a replica's final event."""
    choice = {
        "index": 0,
        "text": final["content"],
        **_reasoning(final["reasoning"]),
        "logprobs": None,
        "finish_reason": final["finish_reason"],
    }
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(final),
        "thinking": final["thinking"],
    }


# ---------------------------------------------------------------- SSE


def _sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def chat_chunks(
    rid: str, model: str, events: AsyncIterator[dict[str, Any]], include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks: a role chunk, reasoning and content deltas apart, a finish chunk with
    the ``thinking`` summary, a usage chunk when asked, ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _sse(
            {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            | {"choices": [choice]}
            | extra
        )

    yield chunk({"role": "assistant", "content": ""})
    async for event in _errors_as_events(events):
        if event["type"] == "delta":
            if event["reasoning"]:
                yield chunk(_reasoning(event["reasoning"]))
            if event["content"]:
                yield chunk({"content": event["content"]})
        elif event["type"] == "final":
            yield chunk({}, event["finish_reason"], thinking=event["thinking"])
            if include_usage:
                yield _sse(
                    {"id": rid, "object": "chat.completion.chunk", "created": created}
                    | {"model": model, "choices": [], "usage": _usage(event)}
                )
        else:  # an error after the response started: all SSE can still say
            yield _sse(event)
    yield _sse("[DONE]")


async def completion_chunks(
    rid: str, model: str, events: AsyncIterator[dict[str, Any]], include_usage: bool
) -> AsyncIterator[str]:
    """SSE ``text_completion`` chunks: reasoning and text apart, a finish chunk, ``[DONE]``."""
    created = int(time.time())

    def chunk(choice: dict[str, Any], **extra: Any) -> str:
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}
        return _sse(base | {"choices": [{"index": 0, "logprobs": None} | choice]} | extra)

    async for event in _errors_as_events(events):
        if event["type"] == "delta":
            if event["reasoning"]:
                yield chunk({"text": ""} | _reasoning(event["reasoning"]))
            if event["content"]:
                yield chunk({"text": event["content"], "finish_reason": None})
        elif event["type"] == "final":
            usage = {"usage": _usage(event)} if include_usage else {}
            finish = {"text": "", "finish_reason": event["finish_reason"]}
            yield chunk(finish, thinking=event["thinking"], **usage)
        else:
            yield _sse(event)
    yield _sse("[DONE]")


async def _errors_as_events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        async for event in events:
            yield event
    except ApiError as exc:
        yield {"type": "error"} | exc.body()
