"""The model replica: one engine per replica, concurrent requests decoded together.

``ModelServer`` is the Serve deployment behind each served model (``build_app`` binds it).
Its constructor fetches and verifies the weights (``thinkforge.serve.loader``), loads the
engine once and starts a ``DecodeScheduler``: a thread that owns the engine's decode loop,
so requests that arrive while others decode join the running batch between steps
(continuous batching), and a request whose caller goes away (disconnect, timeout) leaves
it. Each request reads its events from an asyncio queue the thread fills once per step.

The front door calls it through a ``DeploymentHandle``; requests and events are plain
dicts, so the two sides share no classes but ``RequestRejected``:

    final = await handle.complete.remote(payload)                 # dict, see _final()
    async for event in handle.options(stream=True).stream.remote(payload): ...
    # events: {"type": "start"}, {"type": "delta", "reasoning", "content"}, final

payload: ``{"messages": [...]}`` (chat; the model's template renders it and opens
thinking) or ``{"prompt": "..."}`` (raw completion), plus ``thinking`` (a
``ThinkingParams`` dict or None), ``reasoning_effort``, ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError
from ray import serve
from ray.serve.deployment import Deployment

from thinkforge.serve.config import (
    LORA_ENGINE_HELP,
    EngineName,
    ModelServeConfig,
    ThinkingParams,
)
from thinkforge.serve.engine import (
    Engine,
    EngineEvent,
    EngineLoop,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
)
from thinkforge.serve.engines import create_engine
from thinkforge.serve.loader import LoaderError, ModelRef, fetch, lora_setup

__all__ = ["DecodeScheduler", "ModelServer", "RequestRejected"]

logger = logging.getLogger("ray.serve")


class RequestRejected(ValueError):
    """The request cannot be served as asked (the front door answers 400)."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[EngineEvent] | BaseException]


class DecodeScheduler:
    """A thread that owns the engine's decode loop (``Engine.open_loop``); coroutines
    submit and read events."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any, _Sink | None]] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._stop = threading.Event()
        self._active = 0
        self._thread = threading.Thread(target=self._run, name="thinkforge-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    async def events(
        self, request: GenerationRequest
    ) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Submit the request; yield its token events, then its ``GenerationResult``."""
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("submit", request, sink))
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                for event in item:
                    if isinstance(event, GenerationFailed):
                        finished = True
                        raise RuntimeError(f"decoding this request failed: {event.error}")
                    finished = isinstance(event, GenerationResult)
                    yield event
        finally:
            if not finished:  # cancelled or abandoned: stop decoding it
                self._inbox.put(("cancel", request.request_id, None))

    def occupancy(self, max_batch_size: int) -> dict[str, int]:
        """Sequences decoding and waiting for a slot, as of the last step."""
        active = self._active
        return {"batch": min(active, max_batch_size), "queued": max(0, active - max_batch_size)}

    def _run(self) -> None:
        loop = self._engine.open_loop()
        while not self._stop.is_set():
            self._drain(loop, block=loop.idle)
            self._active = loop.active
            if loop.idle:
                continue
            try:
                events = loop.step()
            except Exception as exc:  # a broken step fails its requests, not the replica
                logger.exception("decode step failed; failing %d requests", loop.active)
                for sink in self._sinks.values():
                    sink.loop.call_soon_threadsafe(sink.queue.put_nowait, exc)
                self._sinks.clear()
                loop = self._engine.open_loop()
                continue
            self._dispatch(events)

    def _drain(self, loop: EngineLoop, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload, sink = item
            if kind == "submit" and sink is not None:
                try:
                    loop.submit(payload)
                    self._sinks[payload.request_id] = sink
                except Exception as exc:  # this request's own problem: it fails alone (400)
                    rejected = RequestRejected(f"the request cannot be decoded: {exc}")
                    sink.loop.call_soon_threadsafe(sink.queue.put_nowait, rejected)
            elif kind == "cancel":
                loop.cancel(payload)
                self._sinks.pop(payload, None)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, events: list[EngineEvent]) -> None:
        # One hand-over per request per step: the event loop wakes once, not per token.
        grouped: dict[str, list[EngineEvent]] = {}
        for event in events:
            grouped.setdefault(event.request_id, []).append(event)
        for request_id, batch in grouped.items():
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            if isinstance(batch[-1], GenerationResult | GenerationFailed):
                del self._sinks[request_id]
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, batch)


class ModelServer:
    """One served model (the class ``build_app`` deploys once per model)."""

    def __init__(
        self,
        config: dict[str, Any],
        ref: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        tracking_uri: str | None = None,
        adapter_refs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        cfg = ModelServeConfig.model_validate(config)
        model_ref = ModelRef(**ref) if ref else None
        cache = cache_dir or str(Path.home() / ".cache" / "thinkforge" / "models")
        if model_ref is not None:
            path = fetch(model_ref, cache_dir=cache, tracking_uri=tracking_uri)
            cfg = cfg.model_copy(update={"model_path": str(path)})
        # Adapters from the registry are fetched and checked like the model itself.
        adapters = dict(cfg.adapters)
        for name, adapter in (adapter_refs or {}).items():
            fetched = fetch(ModelRef(**adapter), cache_dir=cache, tracking_uri=tracking_uri)
            adapters[name] = str(fetched)
        base, adapters, default = lora_setup(
            cfg.model_path, adapters, ref=model_ref, cache_dir=cache, tracking_uri=tracking_uri
        )
        if adapters and cfg.engine is not EngineName.TRANSFORMERS:
            raise LoaderError(LORA_ENGINE_HELP)
        self.cfg = cfg
        self.version = str(model_ref.version) if model_ref else None
        self.ref = model_ref
        self.engine: Engine = create_engine(
            cfg.model_copy(update={"model_path": base}), adapters, default
        )
        self.engine.load()
        self.context_limit = context_limit(base, self.engine.tokenizer)
        try:
            self.replica_id: str | None = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica_id = None
        self.scheduler = DecodeScheduler(self.engine)
        self.scheduler.start()
        logger.info("serving %s version %s from %s", cfg.name, self.version, cfg.model_path)

    def check_health(self) -> None:
        if not self.scheduler.alive or not self.engine.health():
            raise RuntimeError(f"model {self.cfg.name}: the decode thread or engine is down")

    def info(self) -> dict[str, Any]:
        ref = self.ref
        return {
            "version": self.version,
            "model_uri": ref.model_uri if ref else None,
            "alias": ref.alias if ref else None,
            "template": self.cfg.template.value,
            "replica": {"id": self.replica_id, **self.scheduler.occupancy(self.cfg.max_batch_size)},
        }

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        request = self._request(payload)
        async for event in self.scheduler.events(request):
            if isinstance(event, GenerationResult):
                return self._final(event)
        raise RuntimeError("the decode loop ended a request without a result")

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        request = self._request(payload)
        yield {"type": "start", "version": self.version, "replica": self.replica_id}
        async for event in self.scheduler.events(request):
            if isinstance(event, GenerationResult):
                yield self._final(event)
            elif event.reasoning or event.content:
                yield {"type": "delta", "reasoning": event.reasoning, "content": event.content}

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()

    def _final(self, result: GenerationResult) -> dict[str, Any]:
        usage, summary = result.usage, result.thinking
        return {
            "type": "final",
            "version": self.version,
            "finish_reason": result.finish_reason.value,
            "reasoning": result.reasoning_text,
            "content": result.content_text,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "thinking": {
                "tokens": summary.tokens,
                "waits_inserted": summary.waits_inserted,
                "forced_end": summary.forced_end,
            },
            "replica": {"id": self.replica_id, **self.scheduler.occupancy(self.cfg.max_batch_size)},
        }

    def _request(self, payload: dict[str, Any]) -> GenerationRequest:
        try:
            raw = payload.get("thinking")
            thinking = ThinkingParams.model_validate(raw) if raw is not None else None
            params = self.cfg.thinking_for(thinking, payload.get("reasoning_effort"))
            sampling = self._sampling(payload)
        except (ValidationError, ValueError) as exc:
            raise RequestRejected(str(exc)) from None
        if "messages" in payload:
            prompt = self._chat_prompt(payload["messages"])
        else:
            prompt = self._encode(payload.get("prompt") or "")
        limit = self.context_limit
        if not prompt or limit < len(prompt) + sampling.max_completion_tokens:
            raise RequestRejected(
                f"the prompt has {len(prompt)} tokens; with max_completion_tokens "
                f"{sampling.max_completion_tokens} it must fit in {limit} tokens"
            )
        adapter = payload.get("adapter") or None
        return GenerationRequest(uuid.uuid4().hex, prompt, sampling, params, adapter)

    def _sampling(self, payload: dict[str, Any]) -> SamplingParams:
        cap = self.cfg.max_completion_tokens
        wanted = payload.get("max_completion_tokens") or cap
        if wanted > cap:
            raise ValueError(f"max_completion_tokens may be at most {cap} for this model")
        return SamplingParams(
            temperature=payload.get("temperature", 1.0),
            top_p=payload.get("top_p", 1.0),
            seed=payload.get("seed"),
            stop=tuple(payload.get("stop") or ()),
            max_completion_tokens=wanted,
        )

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render with the model's template, generation prompt included, and open
        thinking in the template family's way when the template did not."""
        start = self.cfg.template.delimiters[0]
        try:
            text: str = self.engine.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
                thinking_family=self.cfg.template.value,
            )
        except Exception as exc:  # a template's own raise_exception() lands here
            raise RequestRejected(
                f"the model's chat template rejected the messages: {exc}"
            ) from None
        if not text.endswith(start):
            text += start
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self.engine.tokenizer.encode(text, add_special_tokens=False)
        return ids


def context_limit(model_path: str, tokenizer: Any) -> int:
    """The most tokens a sequence may hold: the tokenizer's ``model_max_length`` when it is
    set (Hugging Face puts 1e30 there when unknown), else the model config's
    ``max_position_embeddings``, else 32768: the prompt-length check always runs."""
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < 10**9:
        return length
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        positions = config.get("max_position_embeddings") or config.get("text_config", {}).get(
            "max_position_embeddings"
        )
        if isinstance(positions, int) and positions > 0:
            return positions
    except (OSError, ValueError):
        pass
    logger.warning("%s: no context length in its tokenizer or config; assuming 32768", model_path)
    return 32768


ModelServerDeployment = cast(Deployment, serve.deployment(ModelServer))
