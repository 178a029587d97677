"""A registered version as an MLflow pyfunc model: the same engine and budget forcing as
Ray Serve, in the calling process, for notebooks, batch jobs and MLflow's own tools.

Every version a job registers carries an ``MLmodel`` (task ``llm/v1/chat``) whose
``python_function`` flavor names this module as its loader, next to the Hugging Face
files (``thinkforge.jobs.tracking.register_model``; the loader is named in
``thinkforge.contract.PYFUNC_LOADER``)::

    model = mlflow.pyfunc.load_model("models:/sums@production")
    [answer] = model.predict({"messages": [{"role": "user", "content": "Sum: 3 5 2"}],
                              "thinking": {"max_tokens": 16, "num_waits": 1}})
    answer["choices"][0]["message"]["content"], answer["thinking"]["tokens"]

The input is one request or a list of them, each shaped like the body of
``/v1/chat/completions`` (``messages``, ``thinking``, ``reasoning_effort``,
``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``); each answer
is a ``chat.completion`` object (``thinkforge.serve.openai``) with ``reasoning_content``
and the ``thinking`` summary.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from thinkforge.contract import MANIFEST_FILE, check_manifest
from thinkforge.serve.openai import chat_completion, new_id


class ChatModel:
    """What ``mlflow.pyfunc.load_model`` wraps: one engine, requests run one at a time."""

    def __init__(self, path: str, model_config: dict[str, Any]) -> None:
        from thinkforge.serve.replica import ModelServer

        if (Path(path) / MANIFEST_FILE).is_file():
            problems = check_manifest(path)
            if problems:
                raise ValueError(f"{path} does not match its manifest: {'; '.join(problems[:3])}")
        self.name = str(model_config.get("name", "thinkforge"))
        config = {"model_path": path, "max_batch_size": 1, **model_config, "name": self.name}
        self.server = ModelServer(config)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        requests = model_input if isinstance(model_input, list) else [model_input]
        return [self._answer(dict(request), params or {}) for request in requests]

    def _answer(self, request: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(request.get("messages"), list):
            raise ValueError('each request needs "messages": a list of {"role", "content"}')
        final = asyncio.run(self.server.complete({**params, **request}))
        return chat_completion(new_id("chatcmpl"), self.name, final)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> ChatModel:
    """MLflow's entry point for the ``python_function`` flavor (``loader_module``)."""
    return ChatModel(path, model_config or {})
