"""The transformers engine: a batched decode loop with budget forcing and a kept KV cache.

Requests are prefilled once (left padded), then decoded together one token per step with
``model(next_tokens, cache=...)``. Each sequence's ``BudgetState`` turns the sampled
token into the token to append, so forced tokens (waits, delimiters, answer prefix) are
just the next inputs: no prompt is ever prefilled twice. Finished sequences leave the
batch between steps and waiting ones join (their caches are left padded to one length).

    engine = TransformersEngine("/models/s1-tiny", template=TemplateFamily.S1)
    engine.load()
    for event in engine.generate(requests):
        ...

A server's scheduler thread keeps one ``DecodeLoop`` instead, so requests that arrive
while others decode join between steps and cancelled ones leave:

    loop = engine.open_loop(); loop.submit(request); events = loop.step(); loop.cancel(id)

CPU or one GPU; meant for small models, tests and the demo (vLLM serves big ones).
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from thinkforge.jobs.config import TemplateFamily
from thinkforge.serve.budget import BudgetState, DelimiterSpec
from thinkforge.serve.engine import (
    END_OF_TURN,
    EngineEvent,
    GenerationFailed,
    GenerationRequest,
    budget_from_params,
    delimiters_for,
)
from thinkforge.serve.engines.row import Detokenizer, Row, StopStrings, prompt_opens_thinking

__all__ = ["DecodeLoop", "TransformersEngine"]


def _sample(logits: torch.Tensor, row: Row) -> int:
    """One token from one row's logits: greedy at temperature 0, else top-p sampling."""
    params = row.request.sampling
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """The sequences being decoded together: their KV cache, mask, positions, next logits."""

    def __init__(
        self, model: Any, cache_arg: str, pad_id: int, adapters: dict[str | None, str] | None
    ) -> None:
        self.model, self.cache_arg, self.pad_id = model, cache_arg, pad_id
        self.adapters = adapters  # LoRA: request's adapter -> peft's name for it
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(0, 0, device=self.device)

    def add(self, rows: list[Row]) -> None:
        """Prefill new rows together, then merge them into the running batch."""
        prompts = [list(r.request.prompt_ids) for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, rows)
        if not self.rows:
            self.cache, self.mask = cache, mask
        else:
            self._merge(cache, mask)
        self.rows += rows
        self.positions = torch.cat([self.positions, positions[:, -1] + 1])
        self.logits = torch.cat([self.logits, logits]) if self.logits.numel() else logits

    def step(self) -> Iterator[EngineEvent]:
        """Append one token to every row, emit events, drop finished rows, run the model."""
        greedy = torch.argmax(self.logits, dim=-1).tolist()
        next_ids: list[int] = []
        failed: set[int] = set()
        for i, row in enumerate(self.rows):
            try:
                if row.state.next_forced() is not None or row.request.sampling.temperature == 0:
                    sampled = greedy[i]  # ignored when a token is forced
                else:
                    sampled = _sample(self.logits[i], row)
                step = row.state.advance(sampled)
                event = row.take(step)
                if step.rollback:
                    self.rollback(i, step.rollback)
                result = row.result() if row.finish is not None else None
            except Exception as exc:  # this sequence alone leaves the batch
                failed.add(i)
                next_ids.append(self.pad_id)
                yield GenerationFailed(row.request.request_id, f"{type(exc).__name__}: {exc}")
                continue
            next_ids.append(step.token_id)
            yield event
            if result is not None:
                yield result
        keep = [i for i, row in enumerate(self.rows) if row.finish is None and i not in failed]
        if len(keep) < len(self.rows):
            self._keep(keep)
        if self.rows:
            self.feed([next_ids[i] for i in keep])

    def feed(self, next_ids: list[int]) -> None:
        """Run the model on one appended token per row: the next step's logits."""
        ids = torch.tensor([[t] for t in next_ids], device=self.device)
        ones = torch.ones(len(next_ids), 1, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=-1)
        self.logits = self._forward(ids, self.mask, self.positions[:, None], self.cache, self.rows)
        self.positions = self.positions + 1

    def rollback(self, i: int, n: int) -> None:
        """Drop row ``i``'s last ``n`` tokens (a plain-text end delimiter replaced by a
        wait). The cache is shared by the batch, so their columns are masked out for this
        row rather than cropped, and its positions step back: the next token attends and
        is placed exactly as if they had never been appended."""
        self.mask[i, self.mask.shape[1] - n :] = 0
        self.positions[i] -= n

    @torch.inference_mode()
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        rows: list[Row],
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_arg: cache}
        if self.adapters is not None:  # peft routes each row through its own adapter
            kwargs["adapter_names"] = [self.adapters[r.request.adapter] for r in rows]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, self.mask[:0]
            self.positions, self.logits = self.positions[:0], self.logits[:0]
            return
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.logits = self.logits[index]
        # Columns that are padding for every remaining row cost attention time: trim them.
        live = int(self.mask.any(dim=0).float().argmax())
        if live > 0:
            self.mask = self.mask[:, live:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, live:], layer.values[:, :, live:]

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
            old.values = torch.cat(
                [_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)]
            )


def _check_prompt(request: GenerationRequest) -> None:
    if not request.prompt_ids:
        raise ValueError(f"request {request.request_id!r} has an empty prompt")


class DecodeLoop:
    """The transformers ``EngineLoop`` (``thinkforge.serve.engine``): requests join and
    leave between decode steps, at most ``max_batch_size`` decoding at once."""

    def __init__(self, engine: TransformersEngine) -> None:
        self._engine = engine
        self._waiting: deque[Row] = deque()
        self._batch = _Batch(engine.model, engine._cache_arg, engine._pad_id(), engine._peft_names)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._batch.rows

    @property
    def active(self) -> int:
        """Requests decoding or waiting to join."""
        return len(self._waiting) + len(self._batch.rows)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; one that cannot be decoded (say, a seed torch refuses) raises
        here, for its caller alone, never later inside a step that others share."""
        _check_prompt(request)
        self._waiting.append(self._engine._row(request))

    def cancel(self, request_id: str) -> bool:
        """Drop a request wherever it is; no event is emitted for it. False: not found."""
        for row in self._waiting:
            if row.request.request_id == request_id:
                self._waiting.remove(row)
                return True
        rows = self._batch.rows
        keep = [i for i, row in enumerate(rows) if row.request.request_id != request_id]
        if len(keep) == len(rows):
            return False
        self._batch._keep(keep)
        return True

    def step(self) -> list[EngineEvent]:
        """Admit waiting requests into free slots, then append one token to every row."""
        batch, waiting = self._batch, self._waiting
        free = self._engine.max_batch_size - len(batch.rows)
        if waiting and free > 0:
            batch.add([waiting.popleft() for _ in range(min(free, len(waiting)))])
        return list(batch.step()) if batch.rows else []


class TransformersEngine:
    """Engine over a Hugging Face causal LM loaded from a local directory."""

    def __init__(
        self,
        model_path: str,
        *,
        template: TemplateFamily | str = TemplateFamily.S1,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 8,
        adapters: dict[str, str] | None = None,
        default_adapter: str | None = None,
    ) -> None:
        """``model_path``: the model, or with ``adapters`` (name -> LoRA adapter directory)
        the base they were trained on; a request's ``adapter`` picks one, None picks
        ``default_adapter`` (None: the base itself)."""
        self.model_path = model_path
        self.adapters = dict(adapters or {})
        if default_adapter is not None and default_adapter not in self.adapters:
            raise ValueError(f"default_adapter {default_adapter!r} is not among the adapters")
        self.default_adapter = default_adapter
        self._peft_names: dict[str | None, str] | None = None
        self.template = TemplateFamily(template)
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.model: Any = None
        self.tokenizer: Any = None
        self.spec: DelimiterSpec | None = None

    def load(self) -> None:
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        # transformers 5.x renamed past_key_values to cache; accept both spellings.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if self.adapters:
            model = self._with_adapters(model)
        self.model = model.to(device).eval()
        self.spec = delimiters_for(
            self.template,
            self._encode,
            self._stop_ids(),
            atomic_ids=self.tokenizer.added_tokens_decoder.keys(),
        )

    def _with_adapters(self, model: Any) -> Any:
        """The base wrapped once by peft with every adapter loaded beside the others."""
        from peft import PeftModel

        names: dict[str | None, str] = {}
        for i, (name, path) in enumerate(self.adapters.items()):
            peft_name = f"adapter{i}"  # peft's names must be attribute names
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=peft_name)
            else:
                model.load_adapter(path, adapter_name=peft_name)
            names[name] = peft_name
        default = self.default_adapter  # "" is an adapter: the deployment's own
        names[None] = names[default] if default is not None else "__base__"
        self._peft_names = names
        return model

    def health(self) -> bool:
        return self.model is not None and self.spec is not None

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[EngineEvent]:
        """Decode the requests, at most ``max_batch_size`` at a time; new ones join as
        others finish."""
        if not self.health():
            raise RuntimeError("the engine is not loaded: call load() first")
        for request in requests:
            _check_prompt(request)
        loop = self.open_loop()
        for request in requests:
            loop.submit(request)
        while not loop.idle:
            yield from loop.step()

    def open_loop(self) -> DecodeLoop:
        """A decode loop that requests can join and leave between steps (a Serve replica's
        scheduler thread owns one)."""
        if not self.health():
            raise RuntimeError("the engine is not loaded: call load() first")
        return DecodeLoop(self)

    def _row(self, request: GenerationRequest) -> Row:
        assert self.spec is not None
        spec = self.spec
        if request.adapter is not None and request.adapter not in self.adapters:
            served = ", ".join(sorted(self.adapters)) or "none"
            raise ValueError(f"no adapter {request.adapter!r} here (adapters: {served})")
        opened = prompt_opens_thinking(request.prompt_ids, spec)
        budget = budget_from_params(request.thinking, self._encode)
        generator = None
        seed = request.sampling.seed
        if seed is not None:
            if not 0 <= seed < 2**64:
                raise ValueError(f"seed must be in [0, 2**64), not {seed}")
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(seed)
        return Row(
            request=request,
            state=BudgetState(spec, budget, prompt_opened_thinking=opened, decode=self._decode),
            detok=Detokenizer(self.tokenizer),
            stops=StopStrings(request.sampling.stop),
            generator=generator,
        )

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids))
        return text

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(END_OF_TURN)}
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
        unk = self.tokenizer.unk_token_id
        return sorted(i for i in ids if isinstance(i, int) and i != unk)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else 0)
