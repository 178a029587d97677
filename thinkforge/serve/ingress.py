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

With ``access`` (what the control plane always deploys) the door is a ``Gate``: every
route but ``/healthz`` needs a key (``thinkforge.serve.access``); the models are the
deployments of the pulled directory, so adding or deleting one never redeploys the door;
a caller sees its own project's deployments and public ones (others answer 404, as if
absent); each key is held to its quota (``thinkforge.serve.quotas``, 429 with
``Retry-After`` and the ``x-ratelimit-*`` headers on every answer); usage goes to the
control plane in batches (``thinkforge.serve.usage``); ``/metrics`` (an admin key) has
the per-deployment metrics (``thinkforge.serve.metrics``). Without ``access`` (a Serve
config of its own, for local use) the door is open and serves its ``models`` and ``routes``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thinkforge.serve.access import AccessOptions, Caller, DirectorySource, DirectoryUnavailable
from thinkforge.serve.config import REPLICA_HEADER, VERSION_HEADER
from thinkforge.serve.metrics import FrontDoorMetrics
from thinkforge.serve.openai import (
    ApiError,
    BadRequest,
    ChatRequest,
    CompletionRequest,
    Forbidden,
    GenerationBody,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    UpstreamTimeout,
    chat_chunks,
    chat_completion,
    completion_chunks,
    new_id,
    text_completion,
)
from thinkforge.serve.quotas import Decision, Limiter, make_limiter
from thinkforge.serve.replica import RequestRejected
from thinkforge.serve.usage import UsageBuffer

__all__ = [
    "FrontDoor",
    "Gate",
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
    """Model name -> deployment handle, plus what ``/v1/models`` says about each. With a
    gate, the models are the directory's deployments the caller may see."""

    def __init__(self, models: dict[str, ModelRoute], gate: Gate | None = None) -> None:
        self.models = models
        self.gate = gate

    def route(self, name: str, caller: Caller | None = None) -> tuple[ModelRoute, str | None]:
        """The model a request names, and the LoRA adapter it picks: ``DEPLOYMENT:ADAPTER``
        names an adapter served by a deployment (a model named so itself comes first)."""
        try:
            return self.get(name, caller), None
        except ModelNotFound:
            deployment, sep, adapter = name.rpartition(":")
            if not sep or not deployment or not adapter:
                raise
        try:
            return self.get(deployment, caller), adapter
        except ModelNotFound:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model") from None

    def get(self, name: str, caller: Caller | None = None) -> ModelRoute:
        if self.gate is not None and caller is not None:
            return self._routed(name, caller)
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        return model

    def visible(self, caller: Caller | None) -> list[ModelRoute]:
        if self.gate is None or caller is None:
            return list(self.models.values())
        return [self._routed(n, caller) for n in self.gate.directory.visible_models(caller)]

    def _routed(self, name: str, caller: Caller) -> ModelRoute:
        assert self.gate is not None
        directory = self.gate.directory
        owner = directory.deployments.get(name)
        if owner is None or not directory.visible(caller, name):
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        model = self.models.get(name)
        if model is None or model.app_name != owner.app or model.timeout_s != owner.timeout_s:
            model = ModelRoute(name, owner.timeout_s, app_name=owner.app)
            model.info = {"app_name": owner.app}
            self.models[name] = model
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


# ---------------------------------------------------------------- keys, quotas, usage


class Gate:
    """The front door's checks: keys from the pulled directory, quotas, usage, metrics."""

    def __init__(self, options: AccessOptions, *, limiter: Limiter | None = None) -> None:
        self.source = DirectorySource(options)
        self.limiter = limiter or make_limiter(options.redis_url)
        self.usage = UsageBuffer(self.source.http)
        self.flush_s = options.usage_flush_s
        self._flusher: asyncio.Task[None] | None = None

    @property
    def directory(self) -> Any:
        return self.source.directory

    async def caller(self, authorization: str | None) -> Caller:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>' with a key of your "
                "project (thinkforge keys create --role inference)"
            )
        try:
            directory = await self.source.current()
        except DirectoryUnavailable:
            raise Overloaded("the front door cannot check keys yet", retry_after_s=5) from None
        caller = directory.caller(self.source.secret, token.strip())
        if caller is None:  # perhaps a key made since the last pull: ask again (4/s at most)
            directory = await self.source.current(max_age_s=0.25)
            caller = directory.caller(self.source.secret, token.strip())
        if caller is None:
            raise Unauthorized("invalid API key: check the key, or create a new one")
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self.usage.flush_forever(self.flush_s)
            )
        return caller

    async def admit(self, caller: Caller) -> Decision:
        decision = await self.limiter.admit(caller.key_id, self.directory.quota(caller))
        if not decision.allowed:
            raise RateLimited(
                f"rate limit reached: {decision.which()} per minute of this key; retry after "
                f"{decision.headers()['Retry-After']} s",
                headers=decision.headers(),
            )
        return decision

    async def answered(self, caller: Caller, model: str, final: dict[str, Any]) -> None:
        """A final event: its tokens count against the quota, and as usage."""
        prompt, completion = int(final["prompt_tokens"]), int(final["completion_tokens"])
        version = final.get("version")
        await self.limiter.add_tokens(caller.key_id, prompt + completion)
        self.usage.add(
            caller, model, None if version is None else f"{model}/{version}",
            prompt=prompt, completion=completion, reasoning=int(final["reasoning_tokens"]),
        )  # fmt: skip


class _TooLarge(BaseException):
    """Not an Exception: FastAPI's body parsing must not turn it into a 400."""


class _BodyLimit:
    """413 for a body over the limit: by Content-Length at once, else while it streams in."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body is larger than the {self.limit}-byte limit")
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            await _send_error(send, too_large)
            return
        received, started = 0, False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _TooLarge:
            if not started:
                await _send_error(send, too_large)


async def _send_error(send: Send, exc: ApiError) -> None:
    response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    await send(
        {"type": "http.response.start", "status": exc.status, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


# ---------------------------------------------------------------- the API


def create_api(
    front: FrontDoor,
    *,
    prefix: str = "",
    metrics: FrontDoorMetrics | None = None,
    max_body_bytes: int = 4 * 1024 * 1024,
) -> FastAPI:
    """The front door's FastAPI app. Handlers parse, call ``front``, shape the answer."""
    api = FastAPI(title="thinkforge OpenAI-compatible API", docs_url=None, redoc_url=None)
    api.add_middleware(_BodyLimit, limit=max_body_bytes)
    metrics = metrics or FrontDoorMetrics()
    gate = front.gate

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.status(getattr(request.state, "deployment", "unknown"), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return await _api_error(request, BadRequest(message, param=".".join(loc) or None))

    async def caller(authorization: str | None = Header(default=None)) -> Caller | None:
        return None if gate is None else await gate.caller(authorization)

    CallerDep = Depends(caller)

    @api.get(f"{prefix}/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @api.get(f"{prefix}/metrics")
    async def prometheus(who: Caller | None = CallerDep) -> Response:
        if who is not None and who.role != "admin":
            raise Forbidden("the front door's metrics need an admin key")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get(f"{prefix}/v1/models")
    async def list_models(who: Caller | None = CallerDep) -> dict[str, Any]:
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "thinkforge"}
            | {"thinkforge": await front.describe(m)}
            for m in front.visible(who)
        ]
        return {"object": "list", "data": data}

    @api.post(f"{prefix}/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest, who: Caller | None = CallerDep) -> Any:
        call = _Call(front, metrics, request, who)
        return await call.generate(body, "chatcmpl", chat_completion, chat_chunks)

    @api.post(f"{prefix}/v1/completions")
    async def completions(
        request: Request, body: CompletionRequest, who: Caller | None = CallerDep
    ) -> Any:
        call = _Call(front, metrics, request, who)
        return await call.generate(body, "cmpl", text_completion, completion_chunks)

    return api


Shape = Callable[[str, str, dict[str, Any]], dict[str, Any]]
Chunks = Callable[[str, str, AsyncIterator[dict[str, Any]], bool], AsyncIterator[str]]


class _Call:
    """One generation request through the door: route, quota, answer, then account for it
    (metrics, quota tokens, usage) when its final event comes."""

    def __init__(
        self, front: FrontDoor, metrics: FrontDoorMetrics, request: Request, who: Caller | None
    ) -> None:
        self.front, self.metrics, self.request, self.who = front, metrics, request, who
        self.started = time.monotonic()

    async def generate(self, body: GenerationBody, kind: str, shape: Shape, chunks: Chunks) -> Any:
        model, adapter = self.front.route(body.model, self.who)
        self.request.state.deployment = model.name
        headers: dict[str, str] = {}
        gate = self.front.gate
        if gate is not None and self.who is not None:
            headers = (await gate.admit(self.who)).headers()
        payload = body.payload() | ({"adapter": adapter} if adapter else {})
        rid = new_id(kind)
        ongoing = self.metrics.ongoing.labels(model.name)
        if not body.stream:
            ongoing.inc()
            try:
                final = await self.front.complete(model, payload)
            finally:
                ongoing.dec()
            await self._answered(model.name, final, first_token_at=None)
            headers |= _version_header(final)
            return JSONResponse(shape(rid, body.model, final), headers=headers)
        first, rest = await self.front.stream(model, payload)
        events = self._observed(model.name, rest)
        return StreamingResponse(
            chunks(rid, body.model, events, body.include_usage),
            media_type="text/event-stream",
            headers={**headers, **_version_header(first), "Cache-Control": "no-cache"},
        )

    async def _observed(
        self, model: str, events: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        ongoing = self.metrics.ongoing.labels(model)
        ongoing.inc()
        first_token_at = None
        try:
            async for event in events:
                if event["type"] == "delta" and first_token_at is None:
                    first_token_at = time.monotonic()
                elif event["type"] == "final":
                    await self._answered(model, event, first_token_at=first_token_at)
                yield event
        finally:
            ongoing.dec()

    async def _answered(
        self, model: str, final: dict[str, Any], *, first_token_at: float | None
    ) -> None:
        self.metrics.status(model, 200)
        self.metrics.answered(
            model, final, started=self.started, first_token_at=first_token_at,
            finished=time.monotonic(),
        )  # fmt: skip
        gate = self.front.gate
        if gate is not None and self.who is not None:
            await gate.answered(self.who, model, final)


def _version_header(event: dict[str, Any]) -> dict[str, str]:
    """Which version (and which replica) answered: from the first or the final event."""
    version, replica = event.get("version"), event.get("replica")
    if isinstance(replica, dict):
        replica = replica.get("id")
    headers = {} if version is None else {VERSION_HEADER: str(version)}
    return headers | ({} if replica is None else {REPLICA_HEADER: str(replica)})


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
        access: dict[str, Any] | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        gate = Gate(AccessOptions.model_validate(access)) if access is not None else None
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
            },
            gate,
        )
        self.prefix = prefix
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.front, prefix=self.prefix, max_body_bytes=self.max_body_bytes)


OpenAIIngressDeployment = cast(Deployment, serve.deployment(OpenAIIngress))
