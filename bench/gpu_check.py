"""GPU check of both engines: a bigger random Qwen2, ratios (1)-(3) of serve_bench; then (4),
training: FSDP2 in bf16 on every visible GPU.

Needs only torch + transformers + thinkforge (no tokenizer training, no network); with
vLLM installed (the `vllm` extra) and a GPU, the vLLM engine runs as well (v1)-(v3):
    python bench/gpu_check.py                 # cuda when available, else a small cpu run
    python bench/gpu_check.py --hidden 2048 --layers 16
    python bench/gpu_check.py --no-vllm       # the transformers engine only
    python bench/gpu_check.py --train-only    # only (4)

Finishes within 5 minutes on one GPU (vLLM: eager mode, no CUDA graph capture). Prints one
line per measurement; (4) prints one table: a Qwen2-0.5B-shaped random model, block 4096,
activation checkpointing, FSDP2 with MixedPrecisionPolicy(bf16, fp32 reduce) over all
visible GPUs (one process each, NCCL): tokens/s, an MFU estimate, peak GPU memory, and a
DCP save and resume (the resumed model's loss on the next batch must equal the
uninterrupted one's).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from thinkforge.serve.config import ThinkingParams
from thinkforge.serve.engine import GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from thinkforge.serve.engines.transformers import TransformersEngine

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build(path: Path, hidden: int, layers: int, vocab: int) -> None:
    """A character-level tokenizer (no training needed) and a random Qwen2 of that vocab."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    words = [f"w{i}" for i in range(vocab - len(chars) - len(SPECIALS))]
    vocab_map = {t: i for i, t in enumerate(SPECIALS + chars + words)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    config = Qwen2Config(
        vocab_size=len(vocab_map),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 128, 4),
        num_key_value_heads=max(hidden // 512, 2),
        max_position_embeddings=8192,
        eos_token_id=vocab_map["<|im_end|>"],
        pad_token_id=0,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    fast.save_pretrained(path)


def timed(engine: Any, requests: list[GenerationRequest]) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(isinstance(e, TokenEvent) for e in engine.generate(requests))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def results(engine: Any, requests: list[GenerationRequest]) -> dict[str, GenerationResult]:
    return {e.request_id: e for e in engine.generate(requests) if isinstance(e, GenerationResult)}


def vllm_check(path: str, n: int, expected: dict[str, GenerationResult], reqs: list) -> None:
    """The vLLM engine on the GPU: same requests as the transformers engine (bfloat16, so
    near ties may flip: the agreement is reported, not asserted), forcing overhead,
    batched throughput. Unrun so far: no GPU has been lent to this project's sessions."""
    from thinkforge.serve.engines.vllm import VllmEngine

    start = time.perf_counter()
    engine = VllmEngine(
        path,
        template="s1",
        device="cuda",
        dtype="bfloat16",
        max_batch_size=16,
        engine_args={"gpu_memory_utilization": 0.4, "max_model_len": 8192, "enforce_eager": True},
    )
    engine.load()
    print(f"(v0) vllm engine loaded in {time.perf_counter() - start:.0f}s")
    got = results(engine, reqs)
    same = sum(got[r].token_ids == expected[r].token_ids for r in expected)
    summaries = sum(got[r].thinking == expected[r].thinking for r in expected)
    print(
        f"(v1) greedy, same tokens as the transformers engine: {same}/{len(expected)} requests, "
        f"same thinking summary: {summaries}/{len(expected)}"
    )
    plain, forced = reqs[0], reqs[1]
    timed(engine, [plain])  # warm
    t_plain, k_plain = timed(engine, [plain])
    t_forced, k_forced = timed(engine, [forced])
    print(
        f"(v2) plain {k_plain / t_plain:.0f} tok/s, forced {k_forced / t_forced:.0f} tok/s, "
        f"per-token ratio {(t_forced / k_forced) / (t_plain / k_plain):.3f}x"
    )
    for concurrency in (1, 8, 16):
        batch = [
            GenerationRequest(
                str(i), plain.prompt_ids, SamplingParams(1.0, seed=i, max_completion_tokens=n)
            )
            for i in range(concurrency)
        ]
        t, k = timed(engine, batch)
        print(f"(v3) {concurrency:2d} requests batched: {k / t:.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens for (2)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM engine")
    parser.add_argument("--train-only", action="store_true", help="only the training check (4)")
    parser.add_argument("--no-train", action="store_true", help="skip the training check (4)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not args.train_only:
        serve_checks(args, cuda)
    if cuda and not args.no_train:
        train_check()


def serve_checks(args: argparse.Namespace, cuda: bool) -> None:
    if not cuda:
        args.hidden, args.layers, args.vocab, args.tokens, args.prompt = 128, 2, 512, 32, 256
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.hidden, args.layers, args.vocab)
        engine = TransformersEngine(tmp, template="s1", dtype="bfloat16" if cuda else "float32")
        engine.load()
        print(f"device {engine.model.device}, hidden {args.hidden}, layers {args.layers}")
        n = args.tokens
        prompt = engine._encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>think\n")
        timed(
            engine, [GenerationRequest("warm", prompt, SamplingParams(0, max_completion_tokens=8))]
        )
        plain = GenerationRequest("p", prompt, SamplingParams(0, max_completion_tokens=n))
        forced = GenerationRequest(
            "f",
            prompt,
            SamplingParams(0, max_completion_tokens=n),
            ThinkingParams(max_tokens=n // 2, min_tokens=n // 2, final_answer_prefix="Final:"),
        )
        t_plain, t_forced = timed(engine, [plain])[0], timed(engine, [forced])[0]
        print(
            f"(1) {n} tokens: plain {n / t_plain:.0f} tok/s, forced {n / t_forced:.0f} tok/s, "
            f"ratio {t_forced / t_plain:.3f}x time"
        )
        long_prompt = (prompt * (args.prompt // len(prompt) + 1))[-args.prompt :]
        wait, chunk = engine._encode("Wait"), n // 8
        for waits in (1, 2, 4, 8):
            start, context = time.perf_counter(), list(long_prompt)
            for _ in range(waits + 1):
                req = GenerationRequest(
                    "s", context, SamplingParams(0, max_completion_tokens=chunk)
                )
                out = [e for e in engine.generate([req]) if isinstance(e, GenerationResult)]
                context += out[0].token_ids + wait
            t_s1 = time.perf_counter() - start
            req = GenerationRequest(
                "l", long_prompt, SamplingParams(0, max_completion_tokens=chunk * (waits + 1))
            )
            t_loop = timed(engine, [req])[0]
            print(
                f"(2) {waits} waits, prompt {len(long_prompt)}: resubmission {t_s1:.2f}s, "
                f"in-loop {t_loop:.2f}s, speed-up {t_s1 / t_loop:.2f}x"
            )
        for concurrency in (1, 4, 8, 16):
            reqs = [
                GenerationRequest(
                    str(i), prompt, SamplingParams(1.0, seed=i, max_completion_tokens=n)
                )
                for i in range(concurrency)
            ]
            engine.max_batch_size = 1
            t_seq, k_seq = timed(engine, reqs)
            engine.max_batch_size = concurrency
            t_bat, k_bat = timed(engine, reqs)
            print(
                f"(3) {concurrency:2d} requests: one at a time {k_seq / t_seq:.0f} tok/s, "
                f"batched {k_bat / t_bat:.0f} tok/s"
            )
        if args.no_vllm or not cuda or importlib.util.find_spec("vllm") is None:
            print("(v) vllm engine skipped: needs a CUDA GPU and the `vllm` extra")
            return
        checks = [
            plain,
            forced,
            GenerationRequest(
                "w", prompt, SamplingParams(0, max_completion_tokens=n), ThinkingParams(num_waits=3)
            ),
        ]
        expected = results(engine, checks)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        vllm_check(tmp, n, expected, checks)


# ---------------------------------------------------------------- (4) training, FSDP2

QWEN2_05B = {  # Qwen2-0.5B's shape (random weights)
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
H200_BF16_FLOPS = 989e12  # dense bf16 peak per GPU; MFU is against this
TRAIN_BLOCK, TRAIN_STEPS, TRAIN_WARMUP = 4096, 10, 3


def train_check() -> None:
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        config = Qwen2Config(**QWEN2_05B, max_position_embeddings=TRAIN_BLOCK)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(Path(tmp) / "model")
        mp.spawn(_train_rank, args=(world, tmp), nprocs=world, join=True)


def _train_rank(rank: int, world: int, tmp: str) -> None:
    import os

    import torch.distributed as dist

    from thinkforge.jobs.checkpointing import CheckpointManager
    from thinkforge.jobs.memory import ModelShape
    from thinkforge.jobs.parallel import build_model, clip_grad_norm

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    model_dir = str(Path(tmp) / "model")

    def fresh(load: bool) -> tuple[Any, Any, Any]:
        model = build_model(
            model_dir, strategy="fsdp", device=device, world=world,
            param_dtype=torch.bfloat16, activation_checkpointing=True, load_weights=load,
        )  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return (
            model,
            opt,
            CheckpointManager(
                model, opt, sched, global_batch=world, strategy="fsdp", rank=rank, world=world
            ),
        )

    def batch(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i * world + rank)
        return torch.randint(0, QWEN2_05B["vocab_size"], (1, TRAIN_BLOCK), generator=g).to(device)

    def step(model: Any, opt: Any, i: int) -> float:
        ids = batch(i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    try:
        model, opt, manager = fresh(load=True)
        for i in range(TRAIN_WARMUP):
            step(model, opt, i)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for i in range(TRAIN_WARMUP, TRAIN_WARMUP + TRAIN_STEPS):
            step(model, opt, i)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30
        done = TRAIN_WARMUP + TRAIN_STEPS
        start = time.perf_counter()
        manager.save(Path(tmp) / "ckpt", step=done)
        dist.barrier()
        saved = time.perf_counter() - start
        with torch.no_grad():
            ids = batch(done)
            expected = float(model(input_ids=ids, labels=ids).loss)
        del model, opt, manager
        torch.cuda.empty_cache()
        start = time.perf_counter()
        model, _opt, manager = fresh(load=False)
        resumed_at = manager.load(Path(tmp) / "ckpt")
        dist.barrier()
        resumed = time.perf_counter() - start
        with torch.no_grad():
            ids = batch(done)
            got = float(model(input_ids=ids, labels=ids).loss)
        if rank == 0:
            shape = ModelShape.from_config(Qwen2Config(**QWEN2_05B))
            tokens_per_s = TRAIN_BLOCK * world * TRAIN_STEPS / elapsed
            # 6 N per token (forward + backward) + attention, + one more forward (recompute).
            flops = 8 * shape.n_params + 16 * shape.n_layers * shape.hidden_size * TRAIN_BLOCK
            mfu = tokens_per_s * flops / (H200_BF16_FLOPS * world)
            print(
                "(4) training, FSDP2 bf16, activation checkpointing, Qwen2-0.5B shape, "
                f"block {TRAIN_BLOCK}, {world} GPU(s)\n"
                f"    {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'save s':>7} "
                f"{'resume s':>9} {'resumed step':>12} {'loss match':>10}\n"
                f"    {tokens_per_s:10.0f} {mfu:6.1%} {peak:9.2f} {saved:7.2f} {resumed:9.2f} "
                f"{resumed_at:12d} {abs(got - expected) < 1e-3!s:>10}"
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
