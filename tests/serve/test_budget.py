"""The budget-forcing state machine, with plain token lists and random token streams."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from thinkforge.serve.budget import (
    BudgetState,
    DelimiterSpec,
    Phase,
    ThinkingBudget,
    TokenStep,
)

# Token ids: 1 = <|im_start|>, 2 = <|im_end|>, 3 = "\n", 4 = "think", 5 = "answer",
# 6/7 = "Wa" "it", 8 = "Final:", 10.. = ordinary text. s1 family: multi-token delimiters
# that share their first token.
S1 = DelimiterSpec(start=(1, 4, 3), end=(1, 5, 3), stop_ids=frozenset({2}))
R1 = DelimiterSpec(start=(20,), end=(21, 3), stop_ids=frozenset({2}))
WAIT = (6, 7)
OPEN = {"prompt_opened_thinking": True}


def run(state: BudgetState, sampled: list[int]) -> list[TokenStep]:
    steps = []
    for token in sampled:
        if state.done:
            break
        steps.append(state.advance(token))
    return steps


def ids(steps: list[TokenStep]) -> list[int]:
    return [s.token_id for s in steps]


def test_no_budget_passes_sampled_tokens_through() -> None:
    state = BudgetState(S1, ThinkingBudget(), **OPEN)
    steps = run(state, [10, 11, 1, 99, 99, 12, 2])
    assert ids(steps) == [10, 11, 1, 5, 3, 12, 2]  # the end delimiter is completed
    assert [s.forced for s in steps] == [False, False, False, True, True, False, False]
    assert [s.phase for s in steps] == [Phase.THINKING] * 2 + [Phase.CONTROL] * 3 + [
        Phase.ANSWER,
        Phase.CONTROL,
    ]
    assert steps[-1].done and state.done
    assert state.summary().tokens == 2 and state.summary().closed


def test_max_cap_forces_end_and_answer_prefix() -> None:
    budget = ThinkingBudget(max_tokens=3, answer_prefix_ids=(8,))
    state = BudgetState(S1, budget, **OPEN)
    steps = run(state, [10, 11, 12, 13, 13, 13, 13, 14, 2])
    assert ids(steps) == [10, 11, 12, 1, 5, 3, 8, 14, 2]
    assert [s.forced for s in steps[3:7]] == [True] * 4
    assert steps[6].phase is Phase.ANSWER
    summary = state.summary()
    assert (summary.tokens, summary.forced_end, summary.waits_inserted) == (3, True, 0)


def test_zero_max_tokens_closes_an_opened_block_at_once() -> None:
    state = BudgetState(R1, ThinkingBudget(max_tokens=0), **OPEN)
    assert state.next_forced() == 21
    assert ids(run(state, [10, 10, 11, 2])) == [21, 3, 11, 2]
    assert state.summary().tokens == 0 and state.summary().forced_end


def test_num_waits_replace_end_attempts() -> None:
    budget = ThinkingBudget(num_waits=2, wait_ids=WAIT)
    state = BudgetState(S1, budget, **OPEN)
    steps = run(state, [10, 1, 0, 11, 2, 0, 12, 1, 0, 0, 13, 2])
    assert ids(steps) == [10, 6, 7, 11, 6, 7, 12, 1, 5, 3, 13, 2]
    assert state.summary().waits_inserted == 2
    assert state.summary().tokens == 7  # waits count as thinking


def test_min_tokens_inserts_waits_until_reached() -> None:
    budget = ThinkingBudget(min_tokens=4, wait_ids=WAIT)
    state = BudgetState(R1, budget, **OPEN)
    steps = run(state, [21, 0, 21, 0, 21, 0, 11])
    assert ids(steps) == [6, 7, 6, 7, 21, 3, 11]
    assert state.summary().waits_inserted == 2


def test_max_wins_over_min_and_waits() -> None:
    budget = ThinkingBudget(max_tokens=3, min_tokens=10, num_waits=5, wait_ids=WAIT)
    state = BudgetState(S1, budget, **OPEN)
    # One wait fits (1 + 2 = 3 tokens), then the cap forces the end.
    steps = run(state, [10, 1, 0, 0, 0, 0, 11])
    assert ids(steps) == [10, 6, 7, 1, 5, 3, 11]
    assert state.summary().forced_end and state.summary().tokens == 3


def test_a_wait_that_would_overshoot_lets_the_model_end() -> None:
    budget = ThinkingBudget(max_tokens=3, num_waits=1, wait_ids=WAIT)
    state = BudgetState(S1, budget, **OPEN)
    steps = run(state, [10, 11, 1, 0, 0, 12])
    assert ids(steps) == [10, 11, 1, 5, 3, 12]
    assert not state.summary().forced_end and state.summary().waits_inserted == 0


def test_stop_token_while_thinking_is_an_end_attempt() -> None:
    state = BudgetState(S1, ThinkingBudget(num_waits=1, wait_ids=WAIT), **OPEN)
    steps = run(state, [2, 0, 2, 0, 0, 12, 2])
    assert ids(steps) == [6, 7, 1, 5, 3, 12, 2]
    assert steps[2].forced  # the stop token was replaced by the end delimiter


def test_model_opens_thinking_itself() -> None:
    state = BudgetState(S1, ThinkingBudget(max_tokens=2), prompt_opened_thinking=False)
    assert not state.thinking
    steps = run(state, [10, 1, 0, 0, 11, 12, 13, 0, 0, 14, 2])
    assert ids(steps) == [10, 1, 4, 3, 11, 12, 1, 5, 3, 14, 2]
    assert steps[0].phase is Phase.ANSWER
    assert [s.phase for s in steps[1:4]] == [Phase.CONTROL] * 3
    assert state.summary().tokens == 2 and state.summary().closed


def test_stop_before_thinking_ends_without_a_block() -> None:
    state = BudgetState(
        R1, ThinkingBudget(min_tokens=5, wait_ids=WAIT), prompt_opened_thinking=False
    )
    assert ids(run(state, [10, 2, 11])) == [10, 2]
    assert state.done and not state.summary().closed


def test_peek_and_next_forced_do_not_change_state() -> None:
    state = BudgetState(S1, ThinkingBudget(num_waits=1, wait_ids=WAIT), **OPEN)
    assert state.next_forced() is None
    assert state.peek(1) == 6 and state.peek(10) == 10
    assert state.advance(1).token_id == 6
    assert state.next_forced() == 7 and state.peek(10) == 7


def test_advance_after_done_raises() -> None:
    state = BudgetState(S1, ThinkingBudget(max_tokens=0), prompt_opened_thinking=False)
    state.advance(2)
    with pytest.raises(RuntimeError, match="ended"):
        state.advance(10)


# ------------------------------------------- plain-text end delimiter (LIMO on Qwen2.5)

# Qwen2.5 has no </think> token: it is text, here "</" "think" ">" (30 31 32), which the
# model may also write as "\n</" (35) or ">\n" (33). 6/7 = "Wa" "it" as above.
PLAIN_TEXT = {30: "</", 31: "think", 32: ">", 33: ">\n", 34: "div", 35: "\n</", 6: "Wa", 7: "it"}
PLAIN = DelimiterSpec(start=(20,), end=(30, 31, 33), stop_ids=frozenset({2}), end_text="</think>")


def plain_decode(tokens: list[int] | tuple[int, ...]) -> str:
    return "".join(PLAIN_TEXT.get(t, f"w{t} ") for t in tokens)


def output(steps: list[TokenStep]) -> list[int]:
    """The sequence the engine ends with: rolled-back tokens dropped."""
    out: list[int] = []
    for step in steps:
        del out[len(out) - step.rollback :]
        out.append(step.token_id)
    return out


def phases(steps: list[TokenStep]) -> list[Phase]:
    """Each output token's final phase: held tokens take the phase a later step settles."""
    out: list[Phase | None] = []
    for step in steps:
        held = [i for i, p in enumerate(out) if p is None]
        for i, phase in zip(held, step.settled, strict=False):
            out[i] = phase
        del out[len(out) - step.rollback :]
        out.append(None if step.held else step.phase)
    assert None not in out, "a held token was never settled"
    return [p for p in out if p is not None]


def test_plain_text_delimiter_needs_the_whole_string() -> None:
    state = BudgetState(PLAIN, ThinkingBudget(), **OPEN, decode=plain_decode)
    # "w10 </div>w11 </think>w12": the first "</" is thinking text, the second ends it.
    steps = run(state, [10, 30, 34, 32, 11, 30, 31, 32, 12, 2])
    assert output(steps) == [10, 30, 34, 32, 11, 30, 31, 32, 12, 2]
    assert [s.held for s in steps] == [False, True, False, False, False, True, True] + [False] * 3
    assert phases(steps) == [Phase.THINKING] * 5 + [Phase.CONTROL] * 3 + [
        Phase.ANSWER,
        Phase.CONTROL,
    ]
    assert not any(s.forced for s in steps)  # the model wrote the delimiter: nothing forced
    assert state.summary().tokens == 5 and state.summary().closed


def test_plain_text_end_attempt_is_rolled_back_for_a_wait() -> None:
    budget = ThinkingBudget(num_waits=1, wait_ids=WAIT)
    state = BudgetState(PLAIN, budget, **OPEN, decode=plain_decode)
    # Tokenized in context as "\n</" "think" ">\n": still the delimiter.
    steps = run(state, [10, 35, 31, 33, 0, 11, 30, 31, 32, 12, 2])
    assert steps[3].rollback == 2 and steps[3].token_id == 6 and steps[3].forced
    assert output(steps) == [10, 6, 7, 11, 30, 31, 32, 12, 2]
    assert "</" not in plain_decode(output(steps)[:4])  # no half delimiter left in thinking
    assert phases(steps) == [Phase.THINKING] * 4 + [Phase.CONTROL] * 3 + [
        Phase.ANSWER,
        Phase.CONTROL,
    ]
    summary = state.summary()
    assert (summary.tokens, summary.waits_inserted, summary.closed) == (4, 1, True)


def test_plain_text_min_tokens_count_only_what_stays() -> None:
    budget = ThinkingBudget(min_tokens=4, wait_ids=WAIT)
    state = BudgetState(PLAIN, budget, **OPEN, decode=plain_decode)
    steps = run(state, [10, 30, 31, 32, 0, 30, 31, 32, 0, 30, 31, 32, 12, 2])
    # 1 token, attempt -> wait (3 tokens), attempt -> 3 < 4 -> wait (5), attempt -> end.
    assert output(steps) == [10, 6, 7, 6, 7, 30, 31, 32, 12, 2]
    assert state.summary().tokens == 5 and state.summary().waits_inserted == 2


def test_plain_text_cap_settles_held_tokens_as_thinking() -> None:
    budget = ThinkingBudget(max_tokens=3, answer_prefix_ids=(8,))
    state = BudgetState(PLAIN, budget, **OPEN, decode=plain_decode)
    steps = run(state, [10, 11, 30, 99, 99, 99, 99, 12, 2])
    # "</" is held, but within the cap as thinking: the delimiter is forced after it.
    assert output(steps) == [10, 11, 30, 30, 31, 33, 8, 12, 2]
    assert steps[3].settled == (Phase.THINKING,) and steps[3].forced
    assert state.summary().tokens == 3 and state.summary().forced_end


def test_plain_text_stop_id_settles_held_tokens_as_thinking() -> None:
    state = BudgetState(PLAIN, ThinkingBudget(), **OPEN, decode=plain_decode)
    steps = run(state, [10, 30, 2, 99, 99, 12, 2])
    assert output(steps) == [10, 30, 30, 31, 33, 12, 2]
    assert steps[2].settled == (Phase.THINKING,) and steps[2].rollback == 0
    assert state.summary().tokens == 2


def test_plain_text_delimiter_needs_decode() -> None:
    with pytest.raises(ValueError, match="decode"):
        BudgetState(PLAIN, ThinkingBudget(), **OPEN)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": -1}, {"min_tokens": -1}, {"num_waits": 1}, {"min_tokens": 3}],
)
def test_invalid_budgets(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ThinkingBudget(**kwargs)


def test_invalid_delimiters() -> None:
    with pytest.raises(ValueError):
        DelimiterSpec(start=(), end=(1,), stop_ids=frozenset())
    with pytest.raises(ValueError):
        DelimiterSpec(start=(1,), end=(2,), stop_ids=frozenset({2}))


# --- property tests: a deterministic random "model" over a small vocabulary ---------------

VOCAB = [1, 2, 20, 21, *range(10, 16)]


def toy_model(seed: int, end_weight: int):
    """next token = a pure function of the whole context, like greedy decoding."""
    weights = [end_weight, end_weight, end_weight, end_weight] + [10] * 6

    def next_token(context: list[int]) -> int:
        rng = random.Random(hash((seed, *context)))
        return rng.choices(VOCAB, weights)[0]

    return next_token


def decode_loop(next_token, prompt, spec, budget, max_completion):
    """What an engine does: sample, let the state machine decide, append, repeat."""
    opened = list(prompt[-len(spec.start) :]) == list(spec.start)
    state = BudgetState(spec, budget, prompt_opened_thinking=opened)
    steps: list[TokenStep] = []
    while not state.done and len(steps) < max_completion:
        sampled = next_token(list(prompt) + ids(steps))
        steps.append(state.advance(sampled))
    return state, steps


def generate_with(next_token):
    def generate(context, n, stops):
        out: list[int] = []
        while len(out) < n:
            out.append(next_token(context + out))
            if out[-1] in stops:
                break
        return out

    return generate


budgets = st.builds(
    ThinkingBudget,
    max_tokens=st.one_of(st.none(), st.integers(0, 30)),
    min_tokens=st.integers(0, 25),
    num_waits=st.integers(0, 4),
    wait_ids=st.sampled_from([WAIT, (6,), (6, 7, 14)]),
    answer_prefix_ids=st.sampled_from([(), (8,), (8, 3)]),
)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    end_weight=st.integers(1, 8),
    budget=budgets,
    spec=st.sampled_from([S1, R1]),
    opened=st.booleans(),
    max_completion=st.integers(1, 120),
)
def test_state_machine_equals_s1_resubmission(
    reference, seed, end_weight, budget, spec, opened, max_completion
) -> None:
    model = toy_model(seed, end_weight)
    prompt = [10, 11, *spec.start] if opened else [10, 11]
    state, steps = decode_loop(model, prompt, spec, budget, max_completion)
    ref = reference(generate_with(model), prompt, spec, budget, max_completion)
    assert ids(steps) == ref.tokens
    summary = state.summary()
    event(f"waits={min(summary.waits_inserted, 2)} forced_end={summary.forced_end}")
    if summary.closed:
        assert (summary.tokens, summary.waits_inserted, summary.forced_end) == (
            ref.thinking,
            ref.waits,
            ref.forced_end,
        )
    check_invariants(state, steps, spec, budget, opened)


def check_invariants(state, steps, spec, budget, opened) -> None:
    summary = state.summary()
    assert summary.tokens == sum(s.phase is Phase.THINKING for s in steps)
    if budget.max_tokens is not None:
        assert summary.tokens <= budget.max_tokens
    if state.done:
        check_structure(steps, spec, opened)
    if not summary.closed:
        return
    no_room = (
        budget.max_tokens is not None and summary.tokens + len(budget.wait_ids) > budget.max_tokens
    )
    if not summary.forced_end and not no_room:
        # The model ended by itself: only once min_tokens and num_waits were satisfied.
        assert summary.tokens >= budget.min_tokens
        assert summary.waits_inserted >= budget.num_waits
    if budget.min_tokens == 0:
        assert summary.waits_inserted <= budget.num_waits


def check_structure(steps, spec, opened) -> None:
    """[answer* start] thinking* end [prefix] answer* stop: delimiters whole, in order."""
    phases = "".join(s.phase.value[0] for s in steps)  # t, a, c
    out = ids(steps)
    ns, ne = len(spec.start), len(spec.end)
    opener = "" if opened else rf"a*c{{{ns}}}"
    match = re.fullmatch(rf"({opener})t*(c{{{ne}}})a*c", phases)
    if not opened and match is None:
        assert re.fullmatch(r"a*c", phases), phases  # stopped before thinking began
        return
    assert match, phases
    assert out[match.end(1) - ns : match.end(1)] == list(spec.start) or opened
    assert out[match.start(2) : match.end(2)] == list(spec.end)


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(st.sampled_from(VOCAB), max_size=80),
    budget=budgets,
    spec=st.sampled_from([S1, R1]),
)
def test_forced_tokens_sit_where_they_should(stream, budget, spec) -> None:
    state = BudgetState(spec, budget, **OPEN)
    steps = run(state, stream)
    out = ids(steps)
    for i, step in enumerate(steps):
        if not step.forced:
            assert step.token_id == stream[i]  # a free token is what was sampled
        elif step.phase is Phase.THINKING:
            assert stream[i] in (spec.end[0], 2) or steps[i - 1].forced  # a wait replaces an end
    control = [i for i, s in enumerate(steps) if s.phase is Phase.CONTROL and not s.done]
    if control:
        end = out[control[0] : control[0] + len(spec.end)]
        assert end == list(spec.end)[: len(end)]
        assert all(s.phase is not Phase.THINKING for s in steps[control[0] :])
        after = out[control[0] + len(spec.end) :]
        prefix = list(budget.answer_prefix_ids) if state.summary().forced_end else []
        assert after[: len(prefix)] == prefix[: len(after)]
    waits = sum(s.forced and s.phase is Phase.THINKING for s in steps)
    assert 0 <= state.summary().waits_inserted * len(budget.wait_ids) - waits < len(budget.wait_ids)
