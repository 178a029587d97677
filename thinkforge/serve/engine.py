"""The engine Protocol and the request / event shapes every engine shares.

An engine loads one model and decodes batches of requests with budget forcing applied in
its decode loop (``thinkforge.serve.budget``). ``generate`` yields one ``TokenEvent`` per
appended token, then one ``GenerationResult`` per request when it finishes:

    engine.load()
    for event in engine.generate([GenerationRequest("r1", prompt_ids, thinking=params)]):
        if isinstance(event, TokenEvent):
            send(reasoning=event.reasoning, content=event.content)   # text deltas
        else:
            finish(event.finish_reason, event.usage, event.thinking)

A server keeps one ``EngineLoop`` instead (``open_loop``): requests join and leave it
between decode steps, and one thread owns it (``thinkforge.serve.replica.DecodeScheduler``):

    loop = engine.open_loop()
    loop.submit(request)                # joins at the next step
    while not loop.idle:
        events = loop.step()            # one token per decoding request, then results
    loop.cancel(request_id)             # leaves; no event is emitted for it

No torch import here: the OpenAI app and its tests depend on these shapes only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from thinkforge.jobs.config import TemplateFamily
from thinkforge.serve.budget import DelimiterSpec, Phase, ThinkingBudget, ThinkingSummary
from thinkforge.serve.config import ThinkingParams

__all__ = [
    "Engine",
    "EngineEvent",
    "EngineLoop",
    "FinishReason",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "TokenEvent",
    "TokenPhase",
    "Usage",
    "budget_from_params",
    "delimiters_for",
]

END_OF_TURN = "<|im_end|>"


class TokenPhase(StrEnum):
    """Where a token's text goes: ``reasoning_content``, ``content``, or nowhere."""

    REASONING = "reasoning"
    CONTENT = "content"
    CONTROL = "control"  # delimiters and stop tokens

    @classmethod
    def of(cls, phase: Phase) -> TokenPhase:
        return _PHASES[phase]


_PHASES = {
    Phase.THINKING: TokenPhase.REASONING,
    Phase.ANSWER: TokenPhase.CONTENT,
    Phase.CONTROL: TokenPhase.CONTROL,
}


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-turn / eos token or a stop string
    LENGTH = "length"  # max_completion_tokens reached


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """``temperature == 0`` is greedy. Stop strings apply to the answer text only."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_completion_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.max_completion_tokens < 1:
            raise ValueError("max_completion_tokens must be at least 1")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to decode. ``thinking=None`` tracks phases but forces nothing.
    ``adapter``: the LoRA adapter to decode with, by its name on the deployment (None:
    the deployment's own model)."""

    request_id: str
    prompt_ids: Sequence[int]
    sampling: SamplingParams = SamplingParams()
    thinking: ThinkingParams | None = None
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One appended token and the text it releases.

    Text may lag its token (an incomplete UTF-8 character, a possible stop string held
    back) and is released later, so a token can release reasoning and content text at
    once: send both deltas, whatever the token's own ``phase``.
    """

    request_id: str
    token_id: int
    phase: TokenPhase
    forced: bool
    reasoning: str = ""  # delta of message.reasoning_content
    content: str = ""  # delta of message.content
    # Tokens dropped from the end of the completion before this one: a plain-text end
    # delimiter the model wrote, replaced by a wait (their text was never released).
    rollback: int = 0

    @property
    def text(self) -> str:
        return self.reasoning + self.content


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationResult:
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    thinking: ThinkingSummary
    token_ids: list[int] = field(default_factory=list)  # completion, forced tokens included
    reasoning_text: str = ""
    content_text: str = ""


@dataclass(frozen=True, slots=True)
class GenerationFailed:
    """A request that broke while decoding: it leaves the batch alone, the others go on."""

    request_id: str
    error: str


EngineEvent = TokenEvent | GenerationResult | GenerationFailed


@runtime_checkable
class EngineLoop(Protocol):
    """Continuous batching: requests join (``submit``) and leave (``cancel``, or finishing)
    between decode steps. Not thread-safe: one thread owns it and calls ``step`` while it
    is not ``idle``."""

    @property
    def idle(self) -> bool:
        """Nothing is decoding or waiting to join."""
        ...

    @property
    def active(self) -> int:
        """Requests decoding or waiting to join."""
        ...

    def submit(self, request: GenerationRequest) -> None:
        """Queue the request; ``ValueError`` when it cannot be decoded (an empty prompt)."""
        ...

    def cancel(self, request_id: str) -> bool:
        """Drop a request wherever it is; no event is emitted for it. False: not found."""
        ...

    def step(self) -> list[EngineEvent]:
        """One decode step: a ``TokenEvent`` per token appended, then the
        ``GenerationResult`` of each request that finished; a request that broke (and
        only it) ends with ``GenerationFailed``."""
        ...


@runtime_checkable
class Engine(Protocol):
    """What a Serve replica needs from an inference engine (``thinkforge.serve.engines``)."""

    tokenizer: Any  # the model's Hugging Face tokenizer, set by load(): templates, encoding

    def load(self) -> None: ...

    def health(self) -> bool: ...

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[EngineEvent]:
        """Decode a fixed set of requests to the end (batch use, tests, benchmarks)."""
        ...

    def open_loop(self) -> EngineLoop:
        """A decode loop for a server: requests join and leave between steps."""
        ...


Encode = Callable[[str], list[int]]


def delimiters_for(
    family: TemplateFamily,
    encode: Encode,
    stop_ids: Sequence[int],
    *,
    atomic_ids: Collection[int],
) -> DelimiterSpec:
    """The family's thinking delimiters as token ids, with the end-of-turn/eos stop ids.

    ``atomic_ids``: the tokenizer's added tokens (special or not), which no text ever
    tokenizes into. An end delimiter that starts with one (``<|im_start|>``, Qwen3's
    ``</think>``) is recognised by that token; otherwise it is plain text (Qwen2.5's
    ``</think>`` is ``</``, ``think``, ``>``) and recognised as a whole string."""
    start, end = family.delimiters
    end_ids = tuple(encode(end))
    end_text = "" if end_ids[:1] and end_ids[0] in atomic_ids else end.strip()
    return DelimiterSpec(tuple(encode(start)), end_ids, frozenset(stop_ids), end_text)


def budget_from_params(params: ThinkingParams | None, encode: Encode) -> ThinkingBudget:
    if params is None:
        return ThinkingBudget()
    prefix = params.final_answer_prefix
    return ThinkingBudget(
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        num_waits=params.num_waits,
        wait_ids=tuple(encode(params.wait_string)),
        answer_prefix_ids=tuple(encode(prefix)) if prefix else (),
    )
