"""The Serve application: one OpenAI-compatible front door and one deployment per model.

Used by import path, from a Serve config file or a RayService's ``serveConfigV2``:

    applications:
      - name: thinkforge
        route_prefix: /
        import_path: thinkforge.serve.app:build_app
        args: {models: [{name: s1-tiny, model_uri: "models:/s1-tiny@production"}],
               mlflow_tracking_uri: "http://mlflow:5000"}

or from Python: ``serve.run(build_app(args), name="thinkforge", route_prefix="/")``.
``args`` is ``AppArgs`` (below). The front door (``OpenAIIngress``, a FastAPI app behind
``@serve.ingress``) serves ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST
/v1/completions`` and ``GET /healthz``; a request's ``model`` picks the model's
deployment handle (``ModelServer``, see ``thinkforge.serve.replica``). ``routes`` maps
model names to other Serve applications that host them (built with ``ingress.enabled:
false``), so each model can be deployed and rolled as its own application.

A registry URI is pinned to a version here, at build time: promoting an alias and
redeploying the same args changes the deployment's arguments, and Serve rolls it.

Errors, translated to OpenAI's ``{"error": {message, type, param, code}}`` in one handler::

    ApiError                 (status, type, code)
    +-- BadRequest           400  request validation, replica's RequestRejected
    +-- ModelNotFound        404  unknown ``model``
    +-- Overloaded           503  max_queued_requests exceeded, no replica (Retry-After)
    +-- UpstreamTimeout      504  the model's request_timeout_s passed
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from thinkforge.serve.config import (
    VERSION_HEADER,
    ModelServeConfig,
    ReasoningEffort,
    ThinkingParams,
)
from thinkforge.serve.loader import parse_model_uri, resolve
from thinkforge.serve.replica import ModelServerDeployment, RequestRejected

__all__ = [
    "AppArgs",
    "IngressOptions",
    "ServedModel",
    "build_app",
    "create_api",
    "deployment_name",
]


# ---------------------------------------------------------------- build_app arguments


class ServedModel(ModelServeConfig):
    """``ModelServeConfig`` plus what the Serve application needs: a registry source and
    replica placement. (Candidates for ``ModelServeConfig`` itself.)"""

    model_path: str = Field(default="", description="local directory; or give model_uri")
    model_uri: str | None = Field(
        default=None, description="models:/name@alias, models:/name/N or name/N"
    )
    num_cpus: float = Field(default=1, ge=0, description="CPUs per replica")
    max_surge_percent: int = Field(
        default=100, ge=0, le=100, description="extra replicas while a new version starts"
    )
    max_constructor_retry_count: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> ServedModel:
        if bool(self.model_path) == bool(self.model_uri):
            raise ValueError(f"model {self.name!r}: give exactly one of model_path, model_uri")
        if self.model_uri:
            parse_model_uri(self.model_uri)
        return self

    def serve_config(self) -> dict[str, Any]:
        """The plain ``ModelServeConfig`` the replica reads (the URI stands in for the
        path until the replica has fetched the files)."""
        data = self.model_dump(mode="json", include=set(ModelServeConfig.model_fields))
        data["model_path"] = self.model_path or self.model_uri
        return data

    def deployment_options(self) -> dict[str, Any]:
        options = super().deployment_options()
        options["name"] = deployment_name(self.name)
        options["ray_actor_options"]["num_cpus"] = self.num_cpus
        bundles = options.get("placement_group_bundles")
        if bundles and self.num_cpus > 0:  # the replica runs in the first bundle
            bundles[0] = {"CPU": self.num_cpus}
        return options | {
            "health_check_period_s": 10,
            "health_check_timeout_s": 30,
            # On a rollout an old replica drains: let its requests finish.
            "graceful_shutdown_timeout_s": self.request_timeout_s,
            "max_surge_percent": self.max_surge_percent,
            "max_constructor_retry_count": self.max_constructor_retry_count,
            "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        }


class IngressOptions(BaseModel):
    """The front door's deployment. It only forwards: many ongoing requests, few CPUs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=1024, ge=1)
    max_queued_requests: int = Field(default=1024, ge=-1, description="-1: unbounded")
    num_cpus: float = Field(default=0.1, ge=0)


class AppArgs(BaseModel):
    """``build_app``'s ``args``."""

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(default_factory=list)
    routes: dict[str, str] = Field(
        default_factory=dict, description="model name -> Serve application hosting it"
    )
    mlflow_tracking_uri: str | None = None
    model_cache_dir: str | None = None
    route_prefix: str = Field(
        default="", pattern=r"^(/[A-Za-z0-9._~-]+)*$", description="API path prefix in the app"
    )
    request_timeout_s: float = Field(default=300, gt=0, description="for routed models")
    ingress: IngressOptions = Field(default_factory=IngressOptions)

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        names = [m.name for m in self.models] + list(self.routes)
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique across models and routes")
        deployments = {deployment_name(m.name) for m in self.models}
        if len(deployments) != len(self.models):
            raise ValueError("model names must stay unique after replacing '/', ':' and '@'")
        if not self.ingress.enabled and (len(self.models) != 1 or self.routes):
            raise ValueError("without the front door, an application serves exactly one model")
        # An empty front door is valid: the control plane keeps one up (answering 404 for
        # every model) while it has no deployments, so removing the last one is one roll.
        return self


def deployment_name(model: str) -> str:
    """The Serve deployment serving ``model`` (in its own app or the front door's)."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", model)


# ---------------------------------------------------------------- OpenAI request shapes


class _Request(BaseModel):
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


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)

    def payload(self) -> dict[str, Any]:
        # Earlier assistant turns go in without their reasoning, as Qwen3 templates do.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
        return super().payload() | {"messages": messages}


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(min_length=1)

    def payload(self) -> dict[str, Any]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("send one prompt per request", param="prompt")
            prompt = prompt[0]
        return super().payload() | {"prompt": prompt}


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


# ---------------------------------------------------------------- routing


@dataclass
class _Model:
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

    def __init__(self, models: dict[str, _Model]) -> None:
        self.models = models

    def get(self, name: str) -> _Model:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        return model

    async def describe(self, model: _Model) -> dict[str, Any]:
        """``model.info``; a model in another application is asked (briefly) first."""
        if model.app_name is not None:
            try:
                info = await _bounded(model.get_handle().info.remote(), model, 2.0)
                model.info = {"app_name": model.app_name} | info
            except ApiError:
                pass  # busy or not deployed: say what was last known
        return model.info

    async def complete(self, model: _Model, payload: dict[str, Any]) -> dict[str, Any]:
        response = model.get_handle().complete.remote(payload)
        return await _bounded(response, model, model.timeout_s)

    async def stream(
        self, model: _Model, payload: dict[str, Any]
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


async def _bounded(
    awaitable: Awaitable[Any], model: _Model, timeout_s: float, cancel: Any = None
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


# ---------------------------------------------------------------- responses


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
    vLLM before 0.10) and ``reasoning`` (vLLM since its rename)."""
    return {"reasoning_content": text, "reasoning": text}


def _chat_body(rid: str, model: str, final: dict[str, Any]) -> dict[str, Any]:
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


def _completion_body(rid: str, model: str, final: dict[str, Any]) -> dict[str, Any]:
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


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _chat_chunks(
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


async def _completion_chunks(
    rid: str, model: str, events: AsyncIterator[dict[str, Any]], include_usage: bool
) -> AsyncIterator[str]:
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
        return await _generate(front, body, "chatcmpl", _chat_body, _chat_chunks)

    @api.post(f"{prefix}/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await _generate(front, body, "cmpl", _completion_body, _completion_chunks)

    return api


async def _generate(front: FrontDoor, body: _Request, kind: str, shape: Any, chunks: Any) -> Any:
    model = front.get(body.model)
    payload = body.payload()
    rid = f"{kind}-{uuid.uuid4().hex}"
    if not body.stream:
        final = await front.complete(model, payload)
        return JSONResponse(shape(rid, model.name, final), headers=_version_header(final))
    first, rest = await front.stream(model, payload)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(
        chunks(rid, model.name, rest, include_usage),
        media_type="text/event-stream",
        headers={**_version_header(first), "Cache-Control": "no-cache"},
    )


def _version_header(event: dict[str, Any]) -> dict[str, str]:
    version = event.get("version")
    return {} if version is None else {VERSION_HEADER: str(version)}


@serve.ingress()
class OpenAIIngress:
    """The front door deployment: the FastAPI app is built in the replica."""

    def __init__(
        self,
        models: list[dict[str, Any]],
        handles: dict[str, DeploymentHandle],
        prefix: str = "",
    ) -> None:
        self.front = FrontDoor(
            {
                m["name"]: _Model(
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


# ---------------------------------------------------------------- build_app


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application ``args`` (``AppArgs``) describe; registry URIs pinned to versions."""
    parsed = AppArgs.model_validate(args)
    handles, models = {}, []
    for served in parsed.models:
        bound, info = _bind_model(served, parsed)
        if not parsed.ingress.enabled:
            return bound
        handles[served.name] = bound
        models.append({"name": served.name, "timeout_s": served.request_timeout_s, "info": info})
    for name, app_name in parsed.routes.items():
        info = {"app_name": app_name}
        models.append(
            {"name": name, "timeout_s": parsed.request_timeout_s, "app_name": app_name}
            | {"info": info}
        )
    ingress = parsed.ingress
    return OpenAIIngressDeployment.options(
        name="openai-ingress",
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        max_queued_requests=ingress.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_surge_percent=100,
    ).bind(models, handles, parsed.route_prefix)


def _bind_model(served: ServedModel, args: AppArgs) -> tuple[serve.Application, dict[str, Any]]:
    ref = None
    if served.model_uri:
        ref = resolve(served.model_uri, tracking_uri=args.mlflow_tracking_uri)
    info = {
        "version": ref.version if ref else None,
        "model_uri": ref.model_uri if ref else None,
        "alias": ref.alias if ref else None,
        "template": served.template.value,
    }
    bound = ModelServerDeployment.options(**served.deployment_options()).bind(
        served.serve_config(),
        asdict(ref) if ref else None,
        args.model_cache_dir,
        args.mlflow_tracking_uri,
    )
    return bound, info
