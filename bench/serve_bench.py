"""Serving benchmark on the CPU with a tiny random Qwen2: ratios measured side by side.

    python bench/serve_bench.py            # ~1-2 minutes on 2 cores
    python bench/serve_bench.py --quick    # a smoke run

(1) budget-forcing overhead: tokens/s of a forced generation vs a plain one, same length;
(2) s1-style resubmission (re-prefill the whole text per wait) vs in-loop forcing;
(3) batched throughput at 1, 4, 8, 16 concurrent requests vs one at a time;
(4) p50 / p99 time to first token and per-token latency.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from thinkforge.jobs.tiny import EOS_TOKEN, PAD_TOKEN, build_tiny_model, build_tiny_tokenizer
from thinkforge.serve.config import ThinkingParams
from thinkforge.serve.engine import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
)
from thinkforge.serve.engines.transformers import TransformersEngine


def build_model(path: Path, hidden: int, layers: int) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        hidden_size=hidden,
        num_layers=layers,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def timed(engine: TransformersEngine, requests: list[GenerationRequest]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(isinstance(e, TokenEvent) for e in engine.generate(requests))
    return time.perf_counter() - start, tokens


def prompt_ids(engine: TransformersEngine, words: int) -> list[int]:
    text = " ".join(["Let me think step by step."] * max(words // 6, 1))
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, enable_thinking=True
    )
    return list(ids["input_ids"])


def overhead(engine: TransformersEngine, n: int, reps: int) -> None:
    """Forced vs plain: the same number of tokens, the plain run never forced."""
    prompt = prompt_ids(engine, 30)
    plain = GenerationRequest("p", prompt, SamplingParams(0, max_completion_tokens=n))
    # min_tokens = max_tokens: every end attempt becomes a wait, the cap forces the end.
    budget = ThinkingParams(max_tokens=n // 2, min_tokens=n // 2, final_answer_prefix="Final:")
    forced = GenerationRequest("f", prompt, SamplingParams(0, max_completion_tokens=n), budget)
    t_plain = min(timed(engine, [plain])[0] for _ in range(reps))
    t_forced = min(timed(engine, [forced])[0] for _ in range(reps))
    print(
        f"(1) budget forcing overhead, {n} tokens: plain {n / t_plain:.0f} tok/s, "
        f"forced {n / t_forced:.0f} tok/s, ratio {t_forced / t_plain:.3f}x time"
    )


def resubmission(engine: TransformersEngine, prompt_words: int, chunk: int) -> None:
    """s1's way: each wait re-prefills prompt + everything so far. Here: one loop."""
    prompt = prompt_ids(engine, prompt_words)
    wait = engine._encode("Wait")
    for waits in (1, 2, 4, 8):
        total = chunk * (waits + 1)
        start = time.perf_counter()
        context = list(prompt)
        for _ in range(waits + 1):  # s1: generate a chunk, append Wait, resubmit
            req = GenerationRequest("s", context, SamplingParams(0, max_completion_tokens=chunk))
            result = next(e for e in engine.generate([req]) if isinstance(e, GenerationResult))
            context += result.token_ids + wait
        t_s1 = time.perf_counter() - start
        req = GenerationRequest("l", prompt, SamplingParams(0, max_completion_tokens=total))
        t_loop, _ = timed(engine, [req])
        print(
            f"(2) {waits} waits, prompt {len(prompt)} tok, {total} new: resubmission "
            f"{t_s1:.2f}s, in-loop {t_loop:.2f}s, speed-up {t_s1 / t_loop:.2f}x"
        )


def throughput(engine: TransformersEngine, n: int) -> None:
    prompt = prompt_ids(engine, 30)
    thinking = ThinkingParams(max_tokens=n // 2, num_waits=1)
    for concurrency in (1, 4, 8, 16):
        reqs = [
            GenerationRequest(
                str(i), prompt, SamplingParams(1.0, seed=i, max_completion_tokens=n), thinking
            )
            for i in range(concurrency)
        ]
        engine.max_batch_size = 1
        t_seq, tok_seq = timed(engine, reqs)
        engine.max_batch_size = concurrency
        t_bat, tok_bat = timed(engine, reqs)
        print(
            f"(3) {concurrency:2d} requests: one at a time {tok_seq / t_seq:.0f} tok/s, "
            f"batched {tok_bat / t_bat:.0f} tok/s, {t_seq / t_bat * tok_bat / tok_seq:.2f}x"
        )


def latency(engine: TransformersEngine, n: int, count: int) -> None:
    prompt = prompt_ids(engine, 30)
    engine.max_batch_size = 8
    reqs = [
        GenerationRequest(
            str(i),
            prompt,
            SamplingParams(1.0, seed=i, max_completion_tokens=n),
            ThinkingParams(max_tokens=n // 2),
        )
        for i in range(count)
    ]
    start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    for event in engine.generate(reqs):
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            if event.request_id in last:
                gaps.append(now - last[event.request_id])
            first.setdefault(event.request_id, now - start)
            last[event.request_id] = now
    ttft = sorted(first.values())
    q = statistics.quantiles
    print(
        f"(4) {count} requests, batch 8: TTFT p50 {q(ttft, n=100)[49] * 1e3:.1f} ms "
        f"p99 {q(ttft, n=100)[98] * 1e3:.1f} ms; per-token p50 "
        f"{q(gaps, n=100)[49] * 1e3:.2f} ms p99 {q(gaps, n=100)[98] * 1e3:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = 32 if args.quick else 128
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), hidden=128, layers=2)
        engine = TransformersEngine(tmp, device="cpu")
        engine.load()
        print(f"tiny Qwen2 on cpu, torch threads {torch.get_num_threads()}")
        overhead(engine, n, reps=2)
        resubmission(engine, prompt_words=120 if args.quick else 450, chunk=n // 4)
        throughput(engine, n // 2)
        latency(engine, n // 2, count=8 if args.quick else 24)


if __name__ == "__main__":
    main()
