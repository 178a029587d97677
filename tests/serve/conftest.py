"""Serve test fixtures: s1's resubmission algorithm as a reference, and a tiny model.

``s1_reference`` is budget forcing done the way s1's own code does it: generate until the
model tries to end thinking, append "Wait" to the text, submit the whole text again, ...
It shares no code with ``thinkforge.serve.budget``; tests check the state machine and the
engine against it token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from thinkforge.serve.budget import DelimiterSpec, ThinkingBudget

# generate(context, max_new_tokens, stop_ids) -> new tokens, the stop token included.
Generate = Callable[[list[int], int, Sequence[int]], list[int]]


@dataclass
class Reference:
    tokens: list[int]
    thinking: int = 0
    waits: int = 0
    forced_end: bool = False


def s1_reference(
    generate: Generate,
    prompt: Sequence[int],
    spec: DelimiterSpec,
    budget: ThinkingBudget,
    max_completion: int,
) -> Reference:
    """Budget forcing by resubmission. Output is cut at ``max_completion`` tokens."""
    ref = Reference([])
    stops = sorted(spec.stop_ids)

    def room() -> int:
        return max_completion - len(ref.tokens)

    opened = list(prompt[-len(spec.start) :]) == list(spec.start)
    if not opened:  # the model must open thinking itself
        new = generate(list(prompt), room(), [spec.start[0], *stops])
        ref.tokens += new
        if not new or new[-1] != spec.start[0]:
            return ref
        ref.tokens += spec.start[1:]
    _think(generate, list(prompt), spec, budget, ref, room)
    if room() > 0:
        ref.tokens += generate(list(prompt) + ref.tokens, room(), stops)
    ref.tokens = ref.tokens[:max_completion]
    return ref


def _think(generate: Generate, prompt: list[int], spec, budget, ref: Reference, room) -> None:
    cap = budget.max_tokens
    attempts = [spec.end[0], *sorted(spec.stop_ids)]
    while room() > 0:
        left = room() if cap is None else min(cap - ref.thinking, room())
        new = generate(prompt + ref.tokens, left, attempts) if left > 0 else []
        tried = bool(new) and new[-1] in attempts
        body = new[:-1] if tried else new
        ref.tokens += body
        ref.thinking += len(body)
        if not tried and (cap is None or ref.thinking < cap):
            return  # out of max_completion tokens
        if not tried:
            break  # the cap
        wants = ref.thinking < budget.min_tokens or ref.waits < budget.num_waits
        if wants and (cap is None or ref.thinking + len(budget.wait_ids) <= cap):
            ref.tokens += budget.wait_ids
            ref.thinking += len(budget.wait_ids)
            ref.waits += 1
            if cap is not None and ref.thinking >= cap:
                break
            continue
        ref.tokens += spec.end
        return
    if cap is not None and ref.thinking >= cap:
        ref.tokens += [*spec.end, *budget.answer_prefix_ids]
        ref.forced_end = True


@pytest.fixture(scope="session")
def reference() -> Callable[..., Reference]:
    return s1_reference


def _bias_model(model: Any, tokenizer: Any) -> None:
    """Make a random model chatty and make it try to end thinking now and then.

    Default init gives near-uniform logits and greedy decoding collapses onto one token;
    larger weights give varied text, and larger embeddings for the delimiter and end of
    turn tokens (tied with the output layer) make the model sample them sometimes.
    """
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        weight = model.get_input_embeddings().weight
        for token in ("<|im_start|>", "</think>", "<|im_end|>"):
            weight[tokenizer.convert_tokens_to_ids(token)] *= 2.0


def save_tiny_model(path: Path, *, hidden_size: int, biased: bool) -> Path:
    """A tiny random Qwen2 and its tokenizer saved with save_pretrained (``biased``: made
    chatty, and trying to end thinking now and then)."""
    from thinkforge.jobs.tiny import EOS_TOKEN, PAD_TOKEN, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        hidden_size=hidden_size,
    )
    if biased:
        _bias_model(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny biased Qwen2 model and its tokenizer, saved with save_pretrained."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-serve"), hidden_size=64, biased=True)
