"""The OpenAI wire format on plain dicts: request payloads, bodies, SSE chunks, errors
(no Ray, no FastAPI: the front door and the pyfunc model both answer in these shapes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from thinkforge.serve.openai import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    Overloaded,
    chat_chunks,
    chat_completion,
    completion_chunks,
    text_completion,
)

THINKING = {"tokens": 7, "waits_inserted": 1, "forced_end": True}
FINAL = {
    "type": "final",
    "version": "3",
    "finish_reason": "stop",
    "reasoning": "hmm",
    "content": "42",
    "prompt_tokens": 5,
    "completion_tokens": 9,
    "reasoning_tokens": 7,
    "thinking": THINKING,
}
USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 9,
    "total_tokens": 14,
    "completion_tokens_details": {"reasoning_tokens": 7},
}


def test_chat_payload_and_its_rejections() -> None:
    body = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_tokens": 30,
            "stop": "END",
            "thinking": {"max_tokens": 8},
            "logit_bias": {"1": 2},  # unknown fields are ignored
        }
    )
    payload = body.payload()
    assert payload["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert payload["max_completion_tokens"] == 30 and payload["stop"] == ["END"]
    assert payload["thinking"]["max_tokens"] == 8 and not body.include_usage
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    for bad, param in [
        ({"messages": [image]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": list("abcde")}, "stop"),
    ]:
        with pytest.raises(BadRequest) as caught:
            ChatRequest.model_validate({"model": "m"} | bad).payload()
        assert caught.value.param == param and caught.value.status == 400
    with pytest.raises(BadRequest, match="one prompt"):
        CompletionRequest(model="m", prompt=["a", "b"]).payload()
    assert CompletionRequest(model="m", prompt=["a"]).payload()["prompt"] == "a"


def test_bodies_from_a_final_event() -> None:
    chat = chat_completion("chatcmpl-1", "m", FINAL)
    assert chat["object"] == "chat.completion" and chat["model"] == "m"
    assert chat["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "42",
                "reasoning_content": "hmm",
                "reasoning": "hmm",  # vLLM's newer name: the same text under both
            },
            "finish_reason": "stop",
        }
    ]
    assert chat["usage"] == USAGE and chat["thinking"] == THINKING
    text = text_completion("cmpl-1", "m", FINAL)
    assert text["object"] == "text_completion" and text["usage"] == USAGE
    assert text["choices"][0]["text"] == "42" and text["choices"][0]["reasoning_content"] == "hmm"
    assert text["choices"][0]["reasoning"] == "hmm"


async def _events(*, fail: bool) -> AsyncIterator[dict[str, Any]]:
    yield {"type": "delta", "reasoning": "hm", "content": ""}
    yield {"type": "delta", "reasoning": "", "content": "4"}
    if fail:
        raise Overloaded("gone")
    yield FINAL


def _read(chunks: AsyncIterator[str]) -> list[Any]:
    async def collect() -> list[str]:
        return [c async for c in chunks]

    out = []
    for chunk in asyncio.run(collect()):
        assert chunk.startswith("data: ") and chunk.endswith("\n\n")
        data = chunk[len("data: ") : -2]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_chunks_send_reasoning_and_content_apart() -> None:
    role, reasoning, content, finish, usage, done = _read(
        chat_chunks("chatcmpl-1", "m", _events(fail=False), include_usage=True)
    )
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert reasoning["choices"][0]["delta"] == {"reasoning_content": "hm", "reasoning": "hm"}
    assert content["choices"][0]["delta"] == {"content": "4"}
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["thinking"] == THINKING
    assert usage["choices"] == [] and usage["usage"] == USAGE and done == "[DONE]"
    assert {c["id"] for c in (role, content, usage)} == {"chatcmpl-1"}


def test_an_error_after_the_stream_started_is_an_event() -> None:
    *_, error, done = _read(chat_chunks("c", "m", _events(fail=True), include_usage=False))
    assert error["error"]["code"] == "overloaded" and done == "[DONE]"
    chunks = _read(completion_chunks("c", "m", _events(fail=False), include_usage=False))
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["", "4", ""]
    assert "usage" not in chunks[-2] and chunks[-2]["choices"][0]["finish_reason"] == "stop"
