"""The transformers engine against s1's resubmission algorithm, on a tiny random Qwen2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thinkforge.jobs.config import TemplateFamily
from thinkforge.serve.config import ThinkingParams
from thinkforge.serve.engine import (
    Engine,
    EngineLoop,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
    TokenPhase,
    budget_from_params,
)
from thinkforge.serve.engines.row import Detokenizer, StopStrings
from thinkforge.serve.engines.transformers import TransformersEngine

GREEDY = SamplingParams(temperature=0, max_completion_tokens=80)
QUESTIONS = ["Sum: 3 4", "Solve this problem", "Let me think", "Sum: 9 9 9"]


@pytest.fixture(scope="module", params=[TemplateFamily.S1, TemplateFamily.R1])
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> TransformersEngine:
    engine = TransformersEngine(str(tiny_model_dir), template=request.param, max_batch_size=4)
    engine.load()
    return engine


def prompt(engine: TransformersEngine, question: str, *, opened: bool = True) -> list[int]:
    encoded = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        enable_thinking=opened,
        thinking_family=engine.template.value,
    )
    return list(encoded["input_ids"])


def run(
    engine: TransformersEngine, requests: list[GenerationRequest]
) -> dict[str, GenerationResult]:
    events = list(engine.generate(requests))
    results = {e.request_id: e for e in events if isinstance(e, GenerationResult)}
    for request_id, result in results.items():
        tokens = [
            e.token_id for e in events if isinstance(e, TokenEvent) and e.request_id == request_id
        ]
        assert tokens == result.token_ids
    return results


def hf_greedy(model):
    """s1's ``model.generate(whole_text)``: a fresh prefill on every call."""

    def generate(context: list[int], n: int, stops) -> list[int]:
        out = model.generate(
            torch.tensor([context]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(stops),
            pad_token_id=0,
        )
        return out[0, len(context) :].tolist()

    return generate


BUDGETS = [
    ThinkingParams(max_tokens=12),
    ThinkingParams(max_tokens=0),
    ThinkingParams(max_tokens=40, num_waits=2),
    ThinkingParams(max_tokens=30, min_tokens=20, final_answer_prefix="Final Answer:"),
    ThinkingParams(max_tokens=9, min_tokens=20, num_waits=3, wait_string=" Hmm, check again."),
    ThinkingParams(num_waits=3),
]


def test_budget_forcing_equals_s1_resubmission(engine: TransformersEngine, reference) -> None:
    requests = [
        GenerationRequest(f"{q}/{b}", prompt(engine, q), GREEDY, b)
        for q in QUESTIONS
        for b in BUDGETS
    ]
    results = run(engine, requests)
    waits = forced = 0
    for request in requests:
        budget = budget_from_params(request.thinking, engine._encode)
        generate = hf_greedy(engine.model)
        ref = reference(generate, request.prompt_ids, engine.spec, budget, 80)
        got = results[request.request_id]
        assert got.token_ids == ref.tokens, request.request_id
        assert (got.thinking.tokens, got.thinking.waits_inserted) == (ref.thinking, ref.waits)
        assert got.thinking.forced_end == ref.forced_end
        waits += got.thinking.waits_inserted
        forced += got.thinking.forced_end
    # The comparison is not vacuous: the model really tried to stop and was told to wait.
    assert waits >= 3 and forced >= 3


def test_batch_equals_each_request_alone(engine: TransformersEngine) -> None:
    requests = [
        GenerationRequest(str(i), prompt(engine, q, opened=i % 2 == 0), GREEDY, BUDGETS[i % 6])
        for i, q in enumerate(QUESTIONS * 2)
    ]
    batched = run(engine, requests)  # 8 requests, 4 at a time: rows join and leave
    for request in requests:
        alone = run(engine, [request])[request.request_id]
        assert alone.token_ids == batched[request.request_id].token_ids


def test_reasoning_and_content_texts(engine: TransformersEngine) -> None:
    thinking = ThinkingParams(max_tokens=10, min_tokens=10, final_answer_prefix="Final Answer:")
    request = GenerationRequest("t", prompt(engine, "Sum: 1 2"), GREEDY, thinking)
    events = list(engine.generate([request]))
    result = events[-1]
    assert isinstance(result, GenerationResult)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    reasoning_ids = [e.token_id for e in tokens if e.phase is TokenPhase.REASONING]
    assert len(reasoning_ids) == result.usage.reasoning_tokens == 10
    decode = engine.tokenizer.decode
    assert result.reasoning_text == decode(reasoning_ids, skip_special_tokens=True)
    assert "".join(e.reasoning for e in tokens) == result.reasoning_text
    assert "".join(e.content for e in tokens) == result.content_text
    assert result.content_text.startswith("Final Answer:")
    assert result.usage.completion_tokens == len(result.token_ids)


def test_stop_string_cuts_the_answer(engine: TransformersEngine) -> None:
    thinking = ThinkingParams(max_tokens=4)
    base = GenerationRequest("a", prompt(engine, "Sum: 5 6"), GREEDY, thinking)
    full = run(engine, [base])["a"].content_text
    assert len(full) > 6
    stop = full[3:6]
    cut = run(
        engine, [GenerationRequest("a", base.prompt_ids, SamplingParams(0, stop=(stop,)), thinking)]
    )
    assert cut["a"].content_text == full[: full.index(stop)]
    assert cut["a"].finish_reason is FinishReason.STOP


def test_max_completion_tokens(engine: TransformersEngine) -> None:
    params = SamplingParams(temperature=0, max_completion_tokens=5)
    result = run(engine, [GenerationRequest("m", prompt(engine, "Sum: 1 1"), params)])["m"]
    assert len(result.token_ids) == 5 and result.finish_reason is FinishReason.LENGTH


def test_seeded_sampling_is_reproducible(engine: TransformersEngine) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_completion_tokens=30)
        request = GenerationRequest(
            "s", prompt(engine, "Sum: 2 2"), params, ThinkingParams(max_tokens=8)
        )
        return run(engine, [request])["s"].token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_engine_protocol_and_errors(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(str(tiny_model_dir))
    assert isinstance(engine, Engine) and not engine.health()
    with pytest.raises(RuntimeError, match="load"):
        list(engine.generate([]))
    engine.load()
    with pytest.raises(ValueError, match="empty prompt"):
        list(engine.generate([GenerationRequest("e", [])]))
    loop = engine.open_loop()
    assert isinstance(loop, EngineLoop) and loop.idle and loop.active == 0
    with pytest.raises(ValueError, match="empty prompt"):
        loop.submit(GenerationRequest("e", []))


def test_detokenizer_never_splits_a_character(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Sum: 3+4=7 — café ✓ Wait"
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_hold_back_a_possible_prefix() -> None:
    stops = StopStrings(["STOP"])
    assert stops.push("abcST") == ("ab", False)
    assert stops.push("Oxyz") == ("cSTO", False)
    assert stops.push("ST") == ("xy", False)
    assert stops.push("OP tail") == ("z", True)
