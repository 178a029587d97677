"""The front door: one OpenAI-compatible FastAPI app that routes each request to its model.

``OpenAIIngress`` is the Serve deployment (``build_app`` in ``thinkforge.serve.app`` binds
it); it builds the app with ``create_api``, the one place where the FastAPI app is made
(add middleware and dependencies there). It serves ``GET /v1/models``, ``POST
/v1/chat/completions``, ``POST /v1/completions`` and ``GET /healthz``. Handlers parse the
body (``thinkforge.serve.openai``), call ``FrontDoor`` and shape the answer:

    front = FrontDoor({"s1": ModelRoute("s1", timeout_s=300, handle=handle)})
    api = create_api(front, prefix="")

A request's ``model`` picks its ``ModelRoute``: a deployment handle in this application
(``ModelServer``, see ``thinkforge.serve.replica``), or a model hosted by another Serve
application, looked up by ``deployment_name`` on first use. What a handle raises
(back-pressure, no replica, a rejected request, a timeout) becomes the API error it means
(the tree in ``thinkforge.serve.openai``), answered by one exception handler.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from thinkforge.serve.config import VERSION_HEADER
from thinkforge.serve.openai import (
    ApiError,
    BadRequest,
    ChatRequest,
    CompletionRequest,
    GenerationBody,
    ModelNotFound,
    Overloaded,
    UpstreamTimeout,
    chat_chunks,
    chat_completion,
    completion_chunks,
    new_id,
    text_completion,
)
from thinkforge.serve.replica import RequestRejected

__all__ = [
    "FrontDoor",
    "ModelRoute",
    "OpenAIIngress",
    "OpenAIIngressDeployment",
    "create_api",
    "deployment_name",
]


def deployment_name(model: str) -> str:
    """The Serve deployment serving ``model`` (in its own app or the front door's)."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", model)


# ---------------------------------------------------------------- routing


@dataclass
class ModelRoute:
    """Where one model is served, and what ``/v1/models`` says about it."""

    name: str
    timeout_s: float
    handle: DeploymentHandle | None = None
    app_name: str | None = None  # hosted by another application
    info: dict[str, Any] = field(default_factory=dict)

    def get_handle(self) -> DeploymentHandle:
        if self.handle is None:
            assert self.app_name is not None
            try:
                self.handle = serve.get_deployment_handle(
                    deployment_name(self.name), app_name=self.app_name
                )
            except Exception as exc:  # the app is not deployed (yet)
                raise Overloaded(f"model {self.name!r} is not deployed", retry_after_s=10) from exc
        return self.handle


class FrontDoor:
    """Model name -> deployment handle, plus what ``/v1/models`` says about each."""

    def __init__(self, models: dict[str, ModelRoute]) -> None:
        self.models = models

    def get(self, name: str) -> ModelRoute:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        return model

    async def describe(self, model: ModelRoute) -> dict[str, Any]:
        """``model.info``; a model in another application is asked (briefly) first."""
        if model.app_name is not None:
            try:
                info = await _bounded(model.get_handle().info.remote(), model, 2.0)
                model.info = {"app_name": model.app_name} | info
            except ApiError:
                pass  # busy or not deployed: say what was last known
        return model.info

    async def complete(self, model: ModelRoute, payload: dict[str, Any]) -> dict[str, Any]:
        response = model.get_handle().complete.remote(payload)
        return await _bounded(response, model, model.timeout_s)

    async def stream(
        self, model: ModelRoute, payload: dict[str, Any]
    ) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
        """The first event (so errors and overload answer before any byte is sent) and
        the rest, each within what is left of the model's timeout."""
        deadline = time.monotonic() + model.timeout_s
        handle = model.get_handle().options(stream=True)
        gen = cast(DeploymentResponseGenerator, handle.stream.remote(payload))
        first = await _bounded(gen.__anext__(), model, model.timeout_s, cancel=gen.cancel)

        async def rest() -> AsyncIterator[dict[str, Any]]:
            try:
                while True:
                    left = deadline - time.monotonic()
                    try:
                        yield await _bounded(gen.__anext__(), model, left, cancel=gen.cancel)
                    except StopAsyncIteration:
                        return
            finally:
                gen.cancel()  # a no-op once finished; stops decoding on disconnect

        return first, rest()


def _translate(exc: BaseException, model: str) -> ApiError:
    """An exception from a deployment handle as the API error it means."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded(
            f"model {model!r} is at capacity; retry later", retry_after_s=exc.retry_after_s or 1
        )
    if isinstance(exc, RequestRejected):
        cause = getattr(exc, "cause", None) or exc
        return BadRequest(str(cause))
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return UpstreamTimeout(f"model {model!r} did not answer in time")
    if isinstance(exc, DeploymentUnavailableError):
        return Overloaded(f"model {model!r} has no replica available", retry_after_s=5)
    return ApiError(f"model {model!r} failed: {type(exc).__name__}")


async def _bounded(
    awaitable: Awaitable[Any], model: ModelRoute, timeout_s: float, cancel: Any = None
) -> Any:
    try:
        return await asyncio.wait_for(_as_coroutine(awaitable), timeout=max(timeout_s, 0.001))
    except StopAsyncIteration:
        raise
    except Exception as exc:
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            (cancel or getattr(awaitable, "cancel", lambda: None))()
        raise _translate(exc, model.name) from exc


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


# ---------------------------------------------------------------- the API


def create_api(front: FrontDoor, *, prefix: str = "") -> FastAPI:
    """The front door's FastAPI app. Handlers parse, call ``front``, shape the answer."""
    api = FastAPI(title="thinkforge OpenAI-compatible API", docs_url=None, redoc_url=None)

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return await _api_error(_, BadRequest(message, param=".".join(loc) or None))

    @api.get(f"{prefix}/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(front.models)}

    @api.get(f"{prefix}/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "thinkforge"}
            | {"thinkforge": await front.describe(m)}
            for m in front.models.values()
        ]
        return {"object": "list", "data": data}

    @api.post(f"{prefix}/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        return await _generate(front, body, "chatcmpl", chat_completion, chat_chunks)

    @api.post(f"{prefix}/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await _generate(front, body, "cmpl", text_completion, completion_chunks)

    return api


Shape = Callable[[str, str, dict[str, Any]], dict[str, Any]]
Chunks = Callable[[str, str, AsyncIterator[dict[str, Any]], bool], AsyncIterator[str]]


async def _generate(
    front: FrontDoor, body: GenerationBody, kind: str, shape: Shape, chunks: Chunks
) -> Any:
    model = front.get(body.model)
    payload = body.payload()
    rid = new_id(kind)
    if not body.stream:
        final = await front.complete(model, payload)
        return JSONResponse(shape(rid, model.name, final), headers=_version_header(final))
    first, rest = await front.stream(model, payload)
    return StreamingResponse(
        chunks(rid, model.name, rest, body.include_usage),
        media_type="text/event-stream",
        headers={**_version_header(first), "Cache-Control": "no-cache"},
    )


def _version_header(event: dict[str, Any]) -> dict[str, str]:
    version = event.get("version")
    return {} if version is None else {VERSION_HEADER: str(version)}


# ---------------------------------------------------------------- the deployment


@serve.ingress()
class OpenAIIngress:
    """The front door deployment: the FastAPI app is built in the replica.

    ``models``: ``{"name", "timeout_s", "info", "app_name"?}`` per model; ``handles``:
    the handles of the models this application hosts, by name."""

    def __init__(
        self,
        models: list[dict[str, Any]],
        handles: dict[str, DeploymentHandle],
        prefix: str = "",
    ) -> None:
        self.front = FrontDoor(
            {
                m["name"]: ModelRoute(
                    m["name"],
                    m["timeout_s"],
                    handles.get(m["name"]),
                    m.get("app_name"),
                    m["info"],
                )
                for m in models
            }
        )
        self.prefix = prefix

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.front, prefix=self.prefix)


OpenAIIngressDeployment = cast(Deployment, serve.deployment(OpenAIIngress))
