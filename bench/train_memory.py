"""Training memory per worker, DDP vs FSDP2, on 2 CPU workers under Ray Train.

A random-initialised Qwen2 of ~160M parameters is built here and saved as a Hugging Face
directory; each strategy then trains it through ``run_training`` (2 workers, gloo), with a
checkpoint at step 3 and 6 and a worker SIGKILLed after step 4, so the retry resumes from
step 3. Inside every worker a sampler thread reads the process's RSS (psutil) every 5 ms
and keeps the peak per phase: load (model built, weights read), steps, save (DCP + export),
resume (model built, checkpoint read). The phases are marked by wrapping the job's own
functions from this script, in the worker; the job code has no hook for it.

Goals (issue 11): FSDP2's training peak <= 0.6x DDP's; a save adds <= 10% to a rank's
training peak; resume's peak <= training's; FSDP2 tokens/s >= 0.8x DDP's. Then the
Qwen2.5-32B projection on 2 x 8 GPUs of 80 GB at block 32768, from ``thinkforge.jobs.memory``
(the function ``strategy: auto`` uses).

    PYTHONPATH=$PWD .venv/bin/python bench/train_memory.py [--steps 8] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def build_model(directory: Path, layers: int) -> int:
    """A random Qwen2 (Qwen2-0.5B's width) with the tiny tokenizer; returns its size."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinkforge.jobs.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=32000,
        hidden_size=896,
        intermediate_size=2432,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def measured_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` with an RSS sampler and phase marks around it (runs in
    the Ray worker; shipped by value, so it may only import what the worker has)."""
    import threading

    import psutil
    import ray.train

    from thinkforge.jobs import checkpointing, sft

    rank = ray.train.get_context().get_world_rank()
    out = Path(loop_config["bench_dir"]) / f"{loop_config['config']['resources']['strategy']}"
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "peaks": {}, "steps": []}
    state = {"phase": "start", "stop": False}
    proc = psutil.Process()

    def sample() -> None:
        while not state["stop"]:
            rss = proc.memory_info().rss
            peaks = record["peaks"]
            peaks[state["phase"]] = max(peaks.get(state["phase"], 0), rss)
            time.sleep(0.005)

    def dump() -> None:
        path = out / f"rank{rank}-{os.getpid()}.json"
        path.write_text(json.dumps(record))

    def phased(name: str, fn: Any, after: str = "steps") -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state["phase"] = name(*args) if callable(name) else name
            try:
                return fn(*args, **kwargs)
            finally:
                dump()
                state["phase"] = after

        return wrapper

    build, train_step = sft._build_worker, sft._train_step
    sft._build_worker = phased(lambda *a: "resume" if a[2] else "load", build)
    sft._save_checkpoint = phased("save", sft._save_checkpoint)
    checkpointing.CheckpointManager.load = phased(
        "resume", checkpointing.CheckpointManager.load, after="resume"
    )

    def timed_step(worker: Any, micro: Any) -> dict[str, float]:
        metrics = train_step(worker, micro)
        record["steps"].append(metrics["tokens_per_s"])
        return metrics

    sft._train_step = timed_step
    threading.Thread(target=sample, daemon=True).start()
    try:
        sft.train_loop_per_worker(loop_config)
    finally:
        state["stop"] = True
        dump()


def run(strategy: str, model_dir: Path, data: Path, work: Path, steps: int) -> dict[str, Any]:
    import ray

    from thinkforge.jobs import sft
    from thinkforge.jobs.config import SFTConfig

    cfg = SFTConfig.model_validate(
        {
            "model": str(model_dir),
            "dataset": str(data),
            "block_size": 256,
            "checkpoint_every_steps": 3,
            "max_failures": 1,
            "seed": 0,
            "export_shard_mb": 50,
            "hyperparameters": {
                "learning_rate": 1e-4,
                "batch_size": 8,
                "micro_batch_size": 4,
                "max_steps": steps,
            },
            "resources": {"num_workers": 2, "strategy": strategy},
        }
    )
    original = sft.train_loop_per_worker
    sft.train_loop_per_worker = _with_bench_dir(work)  # run_training ships this function
    try:
        started = time.perf_counter()
        result = sft.run_training(
            cfg,
            f"mem-{strategy}",
            str(work / "ckpt"),
            model_path=str(model_dir),
            callbacks=[KillOnce(after_step=4, marker=str(work / f"{strategy}.killed"))],
        )
        wall = time.perf_counter() - started
    finally:
        sft.train_loop_per_worker = original
    if result.error is not None:
        raise RuntimeError(f"{strategy}: {result.error}")
    del ray
    return {"wall_s": wall, "records": _records(work / strategy)}


class KillOnce:
    """A ``StepCallback``: the last rank dies by SIGKILL after ``after_step``, once per job
    (the marker outlives the attempt). Defined here, so Ray ships it by value."""

    def __init__(self, *, after_step: int, marker: str) -> None:
        self.after_step, self.marker = after_step, marker

    def __call__(self, *, step: int, rank: int, world_size: int) -> None:
        import signal

        if step != self.after_step or rank != world_size - 1 or Path(self.marker).exists():
            return
        Path(self.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _with_bench_dir(work: Path) -> Any:
    bench_dir = str(work)

    def loop(loop_config: dict[str, Any]) -> None:
        measured_loop(loop_config | {"bench_dir": bench_dir})

    return loop


def _records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("rank*.json"))]


def summarise(strategy: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rank: peak RSS (GB) per phase over both attempts; tokens/s after warmup."""
    rows: dict[int, dict[str, float]] = {}
    speeds: list[float] = []
    for rec in records:
        row = rows.setdefault(rec["rank"], {})
        for phase, rss in rec["peaks"].items():
            row[phase] = max(row.get(phase, 0.0), rss / 1e9)
        if rec["rank"] == 0:
            speeds += rec["steps"][1:]  # the first step of an attempt warms up
    return {"strategy": strategy, "ranks": rows, "tokens_per_s": sum(speeds) / max(1, len(speeds))}


def projection() -> list[dict[str, Any]]:
    from transformers import Qwen2Config

    from thinkforge.jobs.memory import QWEN25_32B, ModelShape, choose_strategy, estimate_memory

    shape = ModelShape.from_config(Qwen2Config(**QWEN25_32B))
    common = {"world_size": 16, "block_size": 32768, "activation_checkpointing": True}
    rows = [estimate_memory(shape, strategy="ddp", **common).as_gb()]
    rows.append(estimate_memory(shape, strategy="fsdp", **common).as_gb())
    rows.append(estimate_memory(shape, strategy="fsdp", cpu_offload=True, **common).as_gb())
    rows[-1]["strategy"] = "fsdp+cpu_offload"
    auto = choose_strategy(shape, capacity_bytes=80e9, **common)
    return [dict(r, n_params_b=round(shape.n_params / 1e9, 2), auto=auto) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()

    import ray

    from thinkforge.jobs.synthetic import write_jsonl

    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        work = Path(tmp)
        n_params = build_model(work / "model", args.layers)
        data = write_jsonl(work / "sums.jsonl", n=256, seed=0)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            results = {s: run(s, work / "model", data, work, args.steps) for s in ("ddp", "fsdp")}
        finally:
            ray.shutdown()
    summary = {s: summarise(s, r["records"]) | {"wall_s": r["wall_s"]} for s, r in results.items()}
    print(f"model: random Qwen2, {n_params / 1e6:.0f}M parameters (fp32), 2 CPU workers, gloo")
    print(
        f"{'strategy':8} {'rank':>4} " + " ".join(f"{p:>8}" for p in PHASES) + "   (peak RSS, GB)"
    )
    for s, summ in summary.items():
        for rank, row in sorted(summ["ranks"].items()):
            cells = " ".join(f"{row.get(p, float('nan')):8.2f}" for p in PHASES)
            print(f"{s:8} {rank:>4} {cells}")
    print(json.dumps({"goals": goals(summary), "summary": summary}, indent=1, default=str))
    print("Qwen2.5-32B, 16 workers of 80 GB, block 32768, bf16, activation checkpointing (GB):")
    for row in projection():
        print(json.dumps(row))


PHASES = ("start", "load", "steps", "save", "resume")


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    def peak(s: str, phase: str) -> float:
        return max(r.get(phase, 0.0) for r in summary[s]["ranks"].values())

    ddp, fsdp = summary["ddp"], summary["fsdp"]
    save_overhead = max(
        row.get("save", 0.0) / row["steps"] - 1
        for s in ("ddp", "fsdp")
        for row in summary[s]["ranks"].values()
    )
    return {
        "fsdp_over_ddp_training_peak": round(peak("fsdp", "steps") / peak("ddp", "steps"), 3),
        "save_over_training_peak_max": round(save_overhead, 3),
        "fsdp_resume_over_training_peak": round(peak("fsdp", "resume") / peak("fsdp", "steps"), 3),
        "ddp_resume_over_training_peak": round(peak("ddp", "resume") / peak("ddp", "steps"), 3),
        "fsdp_over_ddp_tokens_per_s": round(fsdp["tokens_per_s"] / ddp["tokens_per_s"], 3),
    }


if __name__ == "__main__":
    main()
