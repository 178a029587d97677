"""Budget forcing: a pure, per-sequence state machine over token ids.

The engine keeps one ``BudgetState`` per sequence and, at every decode step, hands it the
token it sampled; the state answers with the token to append instead (the sampled one, or
a forced one) plus the phase that token belongs to. Forced tokens wait in a queue and come
out one per step, so the engine feeds them as ordinary next inputs with its KV cache kept:
an extension costs only the tokens it adds, never a new prefill.

    state = BudgetState(spec, budget, prompt_opened_thinking=True)
    while not state.done:
        tok = state.advance(sample(logits))     # sampled id in, id to append out
        append(tok.token_id)                    # tok.forced, tok.phase, tok.done
    state.summary()                             # tokens, waits_inserted, forced_end

An engine that cannot swap tokens after sampling (a vLLM logits processor) asks
``next_forced()`` before sampling and masks everything else, and ``peek(candidate)`` to
learn what a candidate would be replaced with.

Rules (the contract in DESIGN.md):
- Sampling the FIRST token of the end delimiter, or a stop id, while thinking is an
  attempt to end. A plain-text end delimiter (``DelimiterSpec.end_text``: Qwen2.5's
  ``</think>`` is ``</``, ``think``, ``>``) is matched as a whole string on the decoded
  thinking instead (see "Plain-text delimiters" below). Below ``min_tokens``, or with fewer than ``num_waits`` waits inserted,
  it is replaced by the wait tokens. Otherwise the end delimiter is completed (a stop id
  is replaced by it), so an answer always follows a closed thinking block.
- Thinking tokens (sampled and forced waits, not delimiters) never exceed ``max_tokens``:
  at the cap the end delimiter and the final answer prefix are forced. ``max_tokens``
  wins: a wait that would not fit lets the model end instead.
- Without ``prompt_opened_thinking`` the model opens thinking itself: sampling the first
  token of the start delimiter completes it. Tokens before it are answer tokens.
- A stop id outside thinking ends the sequence.

Plain-text delimiters: its first token (``</``) is ordinary text, so it cannot mark an
attempt. Matching is on text, not ids, because the model may tokenize the delimiter
differently in context (``\n</``, ``>\n\n``) than ``encode("</think>")`` does. Thinking
tokens whose text may begin the delimiter are appended but *held* (``TokenStep.held``):
no phase and no count yet. A later step settles them (``TokenStep.settled``, oldest
first): thinking when the text goes on otherwise (``</div``), control when they complete
the delimiter and thinking ends. When more thinking is wanted instead, they are rolled
back (``TokenStep.rollback``: the engine drops them from the sequence and its KV cache)
and the wait tokens take their place, so the output holds no part of the delimiter. Text
that shares a held token with the delimiter (the newline of ``\n</``) goes with it.
``max_tokens`` counts held tokens as thinking: at the cap they settle as thinking and
the delimiter is forced.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

__all__ = [
    "BudgetState",
    "DelimiterSpec",
    "Phase",
    "ThinkingBudget",
    "ThinkingSummary",
    "TokenStep",
]

Decode = Callable[[Sequence[int]], str]


class Phase(StrEnum):
    """What a token is part of: thinking, the answer, or a delimiter / stop token."""

    THINKING = "thinking"
    ANSWER = "answer"
    CONTROL = "control"


class _Mode(StrEnum):
    BEFORE = "before"  # thinking not opened yet
    THINKING = "thinking"
    ANSWER = "answer"  # thinking closed
    DONE = "done"


@dataclass(frozen=True, slots=True)
class DelimiterSpec:
    """Token ids of a template family's thinking delimiters and of its stop tokens.

    ``end_text`` is set when the end delimiter is plain text (its first token is not an
    atomic token): an end attempt is then that whole string in the decoded thinking."""

    start: tuple[int, ...]
    end: tuple[int, ...]
    stop_ids: frozenset[int]
    end_text: str = ""

    def __post_init__(self) -> None:
        if not self.start or not self.end:
            raise ValueError("thinking start and end delimiters need at least one token each")
        if self.start[0] in self.stop_ids or self.end[0] in self.stop_ids:
            raise ValueError("a delimiter may not begin with a stop token")


@dataclass(frozen=True, slots=True)
class ThinkingBudget:
    """A thinking budget in tokens: ``ThinkingParams`` after tokenization."""

    max_tokens: int | None = None
    min_tokens: int = 0
    num_waits: int = 0
    wait_ids: tuple[int, ...] = ()
    answer_prefix_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if min(self.max_tokens or 0, self.min_tokens, self.num_waits) < 0:
            raise ValueError("thinking budgets must be non-negative")
        if not self.wait_ids and (self.min_tokens or self.num_waits):
            raise ValueError("min_tokens and num_waits need a wait string of at least one token")


@dataclass(frozen=True, slots=True)
class TokenStep:
    """The token to append at this step and what it is."""

    token_id: int
    forced: bool
    phase: Phase
    done: bool = False  # a stop token: the sequence ends here
    held: bool = False  # may begin a plain-text end delimiter: settled by a later step
    settled: tuple[Phase, ...] = ()  # phases of the oldest held tokens, settled now
    rollback: int = 0  # held tokens to drop from the sequence before this one


@dataclass(frozen=True, slots=True)
class ThinkingSummary:
    tokens: int
    waits_inserted: int
    forced_end: bool
    closed: bool  # the thinking block was opened and closed


class _Plan(NamedTuple):
    step: TokenStep
    queue: tuple[tuple[int, Phase], ...] = ()
    mode: _Mode | None = None  # mode for the tokens after this step and the queue
    wait: bool = False
    held: tuple[int, ...] | None = None  # the held tokens after this step; None: unchanged


class BudgetState:
    """Budget forcing for one sequence; see the module docstring for the rules."""

    def __init__(
        self,
        spec: DelimiterSpec,
        budget: ThinkingBudget,
        *,
        prompt_opened_thinking: bool,
        decode: Decode | None = None,
    ) -> None:
        if spec.end_text and decode is None:
            raise ValueError("a plain-text end delimiter needs decode (token ids -> text)")
        self.spec = spec
        self.budget = budget
        self._decode = decode
        self._held: tuple[int, ...] = ()  # appended thinking tokens that may begin end_text
        self._settle_next: tuple[Phase, ...] = ()  # held tokens the cap settled as thinking
        self.thinking_tokens = 0
        self.waits_inserted = 0
        self.forced_end = False
        self._forced: deque[tuple[int, Phase]] = deque()
        self._mode = _Mode.BEFORE
        self._opened = False
        if prompt_opened_thinking:
            self._open()

    @property
    def done(self) -> bool:
        return self._mode is _Mode.DONE

    @property
    def thinking(self) -> bool:
        """True while sampled tokens would be thinking tokens."""
        return self._mode is _Mode.THINKING

    def next_forced(self) -> int | None:
        """The token that must come next whatever is sampled, or None for a free choice."""
        return self._forced[0][0] if self._forced else None

    def peek(self, sampled_id: int) -> int:
        """The token ``advance(sampled_id)`` would append, without changing the state."""
        if self._forced:
            return self._forced[0][0]
        return self._plan(sampled_id).step.token_id

    def advance(self, sampled_id: int) -> TokenStep:
        """Take the sampled token; return the token to append (sampled or forced)."""
        if self.done:
            raise RuntimeError("the sequence has ended; no more tokens can be appended")
        if self._forced:
            token_id, phase = self._forced.popleft()
            step = TokenStep(token_id, forced=True, phase=phase, settled=self._settle_next)
            self._settle_next = ()
        else:
            plan = self._plan(sampled_id)
            step = plan.step
            self._forced.extend(plan.queue)
            self.waits_inserted += plan.wait
            if plan.held is not None:
                self._held = plan.held
            if plan.mode is not None:
                self._mode = plan.mode
                self._opened |= plan.mode is _Mode.THINKING
            self.thinking_tokens += step.settled.count(Phase.THINKING)
        self.thinking_tokens += step.phase is Phase.THINKING
        if step.done:
            self._mode = _Mode.DONE
        elif self._mode is _Mode.THINKING and not self._forced:
            self._force_end_if_capped()
        return step

    def summary(self) -> ThinkingSummary:
        """Held tokens count as thinking: a sequence cut while holding ends on them."""
        closed = self._opened and self._mode is not _Mode.THINKING
        tokens = self.thinking_tokens + len(self._held)
        return ThinkingSummary(tokens, self.waits_inserted, self.forced_end, closed)

    def _plan(self, token_id: int) -> _Plan:
        spec, mode = self.spec, self._mode
        if mode is _Mode.THINKING:
            if token_id in spec.stop_ids or (not spec.end_text and token_id == spec.end[0]):
                return self._plan_end_attempt(token_id)
            if spec.end_text:
                return self._plan_text(token_id)
        if token_id in spec.stop_ids:
            return _Plan(TokenStep(token_id, forced=False, phase=Phase.CONTROL, done=True))
        if mode is _Mode.BEFORE and token_id == spec.start[0]:
            rest = tuple((t, Phase.CONTROL) for t in spec.start[1:])
            return _Plan(TokenStep(token_id, False, Phase.CONTROL), rest, _Mode.THINKING)
        phase = Phase.THINKING if mode is _Mode.THINKING else Phase.ANSWER
        return _Plan(TokenStep(token_id, forced=False, phase=phase))

    def _plan_text(self, token_id: int) -> _Plan:
        """A thinking token under a plain-text end delimiter: an attempt when the held
        tokens and it spell the whole delimiter, else held while they may begin it."""
        assert self._decode is not None
        tokens, end = (*self._held, token_id), self.spec.end_text
        if end in self._decode(tokens):
            return self._plan_end_attempt(token_id)
        keep = _held_suffix(tokens, end, self._decode)
        settled = (Phase.THINKING,) * (len(tokens) - max(keep, 1))
        if keep == 0:
            return _Plan(TokenStep(token_id, False, Phase.THINKING, settled=settled), held=())
        step = TokenStep(token_id, False, Phase.CONTROL, held=True, settled=settled)
        return _Plan(step, held=tokens[-keep:])

    def _plan_end_attempt(self, token_id: int) -> _Plan:
        budget, spec, held = self.budget, self.spec, self._held
        stop = token_id in spec.stop_ids
        # Before a stop id, held tokens were not the delimiter: they are thinking.
        settled = (Phase.THINKING,) * len(held) if stop else ()
        thought = self.thinking_tokens + len(settled)
        wants_more = thought < budget.min_tokens or self.waits_inserted < budget.num_waits
        # max_tokens wins: a wait that would overshoot the cap lets the model end.
        fits = budget.max_tokens is None or thought + len(budget.wait_ids) <= budget.max_tokens
        if wants_more and fits:
            first, *rest = budget.wait_ids
            queue = tuple((t, Phase.THINKING) for t in rest)
            rollback = 0 if stop else len(held)  # a plain-text delimiter gives way to the wait
            step = TokenStep(first, True, Phase.THINKING, settled=settled, rollback=rollback)
            return _Plan(step, queue, wait=True, held=())
        if spec.end_text and not stop:  # the plain-text delimiter is complete: keep it
            step = TokenStep(token_id, False, Phase.CONTROL, settled=(Phase.CONTROL,) * len(held))
            return _Plan(step, mode=_Mode.ANSWER, held=())
        forced = token_id != spec.end[0]  # a stop id is replaced by the end delimiter
        queue = tuple((t, Phase.CONTROL) for t in spec.end[1:])
        step = TokenStep(spec.end[0], forced, Phase.CONTROL, settled=settled)
        return _Plan(step, queue, _Mode.ANSWER, held=())

    def _open(self) -> None:
        self._mode = _Mode.THINKING
        self._opened = True
        self._force_end_if_capped()

    def _force_end_if_capped(self) -> None:
        cap = self.budget.max_tokens
        if cap is None or self.thinking_tokens + len(self._held) < cap:
            return
        # Held tokens are within the cap as thinking; the forced delimiter settles them.
        self._settle_next = (Phase.THINKING,) * len(self._held)
        self.thinking_tokens += len(self._held)
        self._held = ()
        self._forced.extend((t, Phase.CONTROL) for t in self.spec.end)
        self._forced.extend((t, Phase.ANSWER) for t in self.budget.answer_prefix_ids)
        self._mode = _Mode.ANSWER
        self.forced_end = True


def _held_suffix(tokens: Sequence[int], end: str, decode: Decode) -> int:
    """How many of the last ``tokens`` to hold: the fewest whose text still ends with the
    longest proper prefix of ``end`` that the whole text ends with (0: none)."""
    text = decode(tokens)
    longest = next((k for k in range(len(end) - 1, 0, -1) if text.endswith(end[:k])), 0)
    if longest == 0:
        return 0
    return next(
        keep for keep in range(1, len(tokens) + 1) if decode(tokens[-keep:]).endswith(end[:longest])
    )
