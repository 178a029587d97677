"""One request's decoding state, shared by the engines: its budget state, text and result.

An engine makes a ``Row`` per request and hands it every appended token as the budget
state's ``TokenStep``; the row routes the token's text to reasoning or content (released
by ``Detokenizer`` whole characters at a time, the answer cut at ``StopStrings``), sets
the finish reason and builds the ``GenerationResult``:

    row = Row(request, BudgetState(spec, budget), Detokenizer(tok), StopStrings(stops), None)
    event = row.take(state.advance(sampled))        # a TokenEvent with the text deltas
    if row.finish is not None:
        result = row.result()

No torch import: the transformers engine gives each seeded row a ``torch.Generator``, the
vLLM engine samples in vLLM and gives none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from thinkforge.serve.budget import BudgetState, DelimiterSpec, Phase, TokenStep
from thinkforge.serve.engine import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
    TokenPhase,
    Usage,
)

if TYPE_CHECKING:
    import torch

__all__ = ["Detokenizer", "Row", "StopStrings", "prompt_opens_thinking"]


def prompt_opens_thinking(prompt_ids: Sequence[int], spec: DelimiterSpec) -> bool:
    """Whether the prompt ends with the start delimiter (a chat template opened thinking)."""
    prompt, start = tuple(prompt_ids), spec.start
    return len(prompt) >= len(start) and prompt[-len(start) :] == start


class Detokenizer:
    """Incremental detokenization: text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # a few tokens of left context: decoding alone may drop spaces
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Release what is held back (an incomplete character) and start a new segment."""
        text = self._delta(final=True)
        self._ids, self._prefix, self._read = [], 0, 0
        return text

    def _delta(self, *, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text: str = self._tok.decode(ids, skip_special_tokens=True)
        return text


class StopStrings:
    """Cuts the answer text at the first stop string, holding back a possible prefix."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text to release, whether a stop string was hit)."""
        self._buf += text
        hits = [i for s in self._stops if (i := self._buf.find(s)) >= 0]
        if hits:
            out, self._buf = self._buf[: min(hits)], ""
            return out, True
        cut = max(len(self._buf) - self._hold, 0)
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


@dataclass
class Row:
    request: GenerationRequest
    state: BudgetState
    detok: Detokenizer
    stops: StopStrings
    generator: torch.Generator | None  # for seeded sampling
    tokens: list[int] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    finish: FinishReason | None = None
    _last_phase: Phase | None = None
    _stop_hit: bool = False
    _out: list[str] = field(default_factory=lambda: ["", ""])
    _held: list[int] = field(default_factory=list)  # appended, text kept until settled

    def take(self, step: TokenStep) -> TokenEvent:
        """Append a token: route its text, apply stop strings, set the finish reason.

        Held tokens (a possible plain-text end delimiter) release their text when a later
        step settles them; a rollback drops them before this token is appended."""
        self._out = ["", ""]
        for settled in step.settled:
            self._push(settled, self._held.pop(0))
        if step.rollback:
            del self.tokens[len(self.tokens) - step.rollback :]
            del self._held[len(self._held) - step.rollback :]
        self.tokens.append(step.token_id)
        if step.held:
            self._held.append(step.token_id)
        else:
            self._push(step.phase, step.token_id)
        if step.done:
            self.finish = FinishReason.STOP
        elif (
            self.finish is None and len(self.tokens) >= self.request.sampling.max_completion_tokens
        ):
            self.finish = FinishReason.LENGTH
        if self.finish is not None:
            while self._held:  # cut while holding: it was thinking (BudgetState.summary)
                self._push(Phase.THINKING, self._held.pop(0))
            if self._last_phase is not None:
                self._route(self._last_phase, self.detok.flush())
            self._route(Phase.ANSWER, self.stops.flush(), filtered=False)
        reasoning, content = self._out
        self.reasoning.append(reasoning)
        self.content.append(content)
        phase = TokenPhase.of(step.phase)
        return TokenEvent(
            self.request.request_id,
            step.token_id,
            phase,
            step.forced,
            reasoning,
            content,
            rollback=step.rollback,
        )

    def _push(self, phase: Phase, token_id: int) -> None:
        if self._last_phase not in (None, phase):
            self._route(self._last_phase, self.detok.flush())  # a segment ended
        self._last_phase = phase
        self._route(phase, self.detok.push(token_id))

    def _route(self, phase: Phase, text: str, *, filtered: bool = True) -> None:
        # Control tokens carry no text, and nothing after a stop string is released.
        if not text or phase is Phase.CONTROL or self._stop_hit:
            return
        if phase is Phase.THINKING:
            self._out[0] += text
            return
        if filtered:
            text, self._stop_hit = self.stops.push(text)
            if self._stop_hit:
                self.finish = FinishReason.STOP
        self._out[1] += text

    def result(self) -> GenerationResult:
        assert self.finish is not None
        summary = self.state.summary()
        usage = Usage(len(self.request.prompt_ids), len(self.tokens), summary.tokens)
        return GenerationResult(
            request_id=self.request.request_id,
            finish_reason=self.finish,
            usage=usage,
            thinking=summary,
            token_ids=list(self.tokens),
            reasoning_text="".join(self.reasoning),
            content_text="".join(self.content),
        )
