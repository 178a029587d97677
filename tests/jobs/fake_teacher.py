"""An in-repo fake teacher: an OpenAI-compatible chat endpoint (real HTTP, in a thread)
that answers running-sum questions ("Sum: 1 2 3") the way the Serve front door answers,
right or wrong on demand, and fails on demand.

Question markers choose the answer: ``[wrong]`` a wrong sum, ``[malformed]`` no thinking,
``[unfinished]`` thinking ended by the budget (``thinking.forced_end``). The thinking is
one line per partial sum, so a longer question has a longer trace."""

from __future__ import annotations

import re
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.conftest import LiveServer


class FakeTeacher:
    def __init__(self, *, fail_after: int | None = None, flaky: int = 0) -> None:
        """``fail_after``: answer 503 to every request after that many answers;
        ``flaky``: answer 503 to the first ``flaky`` tries of each question."""
        self.fail_after, self.flaky = fail_after, flaky
        self.answered = 0
        self.tries: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self._lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.server: LiveServer | None = None

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        question = body["messages"][-1]["content"]
        with self._lock:
            self.requests.append(body)
            self.auth.append(request.headers.get("authorization"))
            self.tries[question] = self.tries.get(question, 0) + 1
            if self.tries[question] <= self.flaky:
                return JSONResponse({"error": {"message": "busy"}}, status_code=503)
            if self.fail_after is not None and self.answered >= self.fail_after:
                return JSONResponse({"error": {"message": "teacher down"}}, status_code=503)
            self.answered += 1
        return JSONResponse(answer(question))

    def __enter__(self) -> FakeTeacher:
        self.server = LiveServer(self.app).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.__exit__(*exc)

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"{self.server.url}/v1"


def answer(question: str) -> dict[str, Any]:
    numbers = [int(n) for n in re.findall(r"-?\d+", question)]
    steps, total = [], 0
    for n in numbers:
        total += n
        steps.append(f"add {n}: {total}")
    result = total + 1 if "[wrong]" in question else total
    thinking = "" if "[malformed]" in question else "\n".join(steps)
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "choices": [{
            "index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": f"Answer: {result}",
                        "reasoning_content": thinking},
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3 * len(steps) + 2,
                  "completion_tokens_details": {"reasoning_tokens": 3 * len(steps)}},
        "thinking": {"tokens": 3 * len(steps), "waits_inserted": 0,
                     "forced_end": "[unfinished]" in question},
    }  # fmt: skip
