"""Training tokens/s, DDP vs FSDP2, side by side in one Ray Train run (issue 11).

One ``TorchTrainer`` with 2 CPU workers (gloo) builds the same model twice through the
job's own ``_build_worker``, once per strategy, with the same data in the same order, and
then alternates them: each round runs ``--steps`` optimizer steps of one strategy, then
as many of the other, and the next round starts with the other one (ABBA, so neither is
always the one that runs first after a switch). Both models and their data loaders live
in the same worker processes for the whole run, so the two strategies see the same load
from the rest of the machine within a round, a few seconds apart, rather than minutes
apart as in ``bench/train_memory.py``.

Each strategy takes one warmup step first (not timed). A round's tokens/s is the global
(non-padding) tokens of its steps over their summed wall time on rank 0; the ratio is
FSDP2's over DDP's in that round. The goal: the median ratio >= 0.8. Rank 0's CPU
seconds per step (``time.process_time``, all its threads) give a second ratio, tokens per
CPU second, which a loaded machine disturbs much less than wall time.

    PYTHONPATH=$PWD .venv/bin/python bench/train_throughput.py [--rounds 8] [--steps 1]
        [--fsdp-layers-per-unit 2]

FSDP2 runs with ``resources.fsdp_layers_per_unit`` 2 by default here (two decoder layers
per ``fully_shard`` unit: half the collectives, each twice as large); the job's default,
under which ``bench/train_memory.py`` measures the memory goal, is 1.

The model is ``bench/train_memory.py``'s random Qwen2 (Qwen2-0.5B's width, vocabulary
32000), with 4 layers by default (62M parameters): the memory bench's 16 layers made no
visible progress on the loaded 2-core machine within the ~10 minutes a run may take.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from train_memory import build_model  # the same model as the memory bench

STRATEGIES = ("ddp", "fsdp")


def alternating_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: both strategies' workers, then ABBA rounds (runs in the
    Ray worker; shipped by value, so it may only import what the worker has)."""
    import ray.train
    import torch

    from thinkforge.jobs import sft
    from thinkforge.jobs.config import SFTConfig

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    base = SFTConfig.model_validate(loop_config["config"])
    workers, batches = {}, {}
    for strategy in STRATEGIES:
        torch.manual_seed(base.seed)
        resources = base.resources.model_copy(update={"strategy": strategy})
        cfg = base.model_copy(update={"resources": resources})
        workers[strategy] = sft._build_worker(cfg, loop_config["model_path"], None, rank, world)
        workers[strategy].sampler.set_epoch(0)
        batches[strategy] = iter(workers[strategy].loader)

    def step(strategy: str) -> tuple[float, float, float]:
        """(global tokens, seconds, this process's CPU seconds) of one optimizer step."""
        worker = workers[strategy]
        micro = [next(batches[strategy]) for _ in range(worker.plan.accumulation)]
        started, cpu = time.perf_counter(), time.process_time()
        metrics = sft._train_step(worker, micro)
        elapsed = time.perf_counter() - started
        return metrics["tokens_per_s"] * elapsed, elapsed, time.process_time() - cpu

    for strategy in STRATEGIES:
        step(strategy)  # warmup: first allocations, gloo connections
    rounds = []
    for r in range(loop_config["rounds"]):
        order = STRATEGIES if r % 2 == 0 else STRATEGIES[::-1]
        row: dict[str, Any] = {"order": "".join(s[0].upper() for s in order)}
        for strategy in order:
            tokens = seconds = cpu = 0.0
            for _ in range(loop_config["steps"]):
                t, s, c = step(strategy)
                tokens, seconds, cpu = tokens + t, seconds + s, cpu + c
            row[strategy] = {
                "tokens": tokens,
                "seconds": seconds,
                "cpu": cpu,
                "load1": os.getloadavg()[0],
            }
        rounds.append(row)
    if rank == 0:
        Path(loop_config["out"]).write_text(json.dumps(rounds))


def _with_options(out: Path, rounds: int, steps: int) -> Any:
    extra = {"out": str(out), "rounds": rounds, "steps": steps}

    def loop(loop_config: dict[str, Any]) -> None:
        alternating_loop(loop_config | extra)

    return loop


def run(
    model_dir: Path, data: Path, work: Path, rounds: int, steps: int, layers_per_unit: int
) -> list[Any]:
    from thinkforge.jobs import sft
    from thinkforge.jobs.config import SFTConfig

    cfg = SFTConfig.model_validate(
        {
            "model": str(model_dir),
            "dataset": str(data),
            "block_size": 256,
            "seed": 0,
            "hyperparameters": {"learning_rate": 1e-4, "batch_size": 8, "micro_batch_size": 4},
            "resources": {
                "num_workers": 2,
                "strategy": "ddp",
                "fsdp_layers_per_unit": layers_per_unit,
            },
        }
    )
    out = work / "rounds.json"
    original = sft.train_loop_per_worker
    sft.train_loop_per_worker = _with_options(out, rounds, steps)  # run_training ships it
    try:
        result = sft.run_training(cfg, "throughput", str(work / "ckpt"), model_path=str(model_dir))
    finally:
        sft.train_loop_per_worker = original
    if result.error is not None:
        raise RuntimeError(str(result.error))
    rows: list[Any] = json.loads(out.read_text())
    return rows


def report(rows: list[Any]) -> dict[str, Any]:
    ratios, cpu_ratios = [], []
    print("| round | order | DDP tokens/s | FSDP2 tokens/s | FSDP2 / DDP | per CPU s | load1 |")
    print("|---|---|---|---|---|---|---|")
    for i, row in enumerate(rows, 1):
        speed = {s: row[s]["tokens"] / row[s]["seconds"] for s in STRATEGIES}
        ratios.append(speed["fsdp"] / speed["ddp"])
        per_cpu = {s: row[s]["tokens"] / row[s]["cpu"] for s in STRATEGIES}
        cpu_ratios.append(per_cpu["fsdp"] / per_cpu["ddp"])
        load = max(row[s]["load1"] for s in STRATEGIES)
        print(
            f"| {i} | {row['order']} | {speed['ddp']:,.0f} | {speed['fsdp']:,.0f} "
            f"| {ratios[-1]:.3f} | {cpu_ratios[-1]:.3f} | {load:.1f} |"
        )
    return {
        "median_ratio": round(statistics.median(ratios), 3),
        # Tokens per CPU second of rank 0, FSDP2 over DDP: the work each step costs,
        # which other agents' load on the machine moves far less than wall time.
        "median_cpu_ratio": round(statistics.median(cpu_ratios), 3),
        "min_ratio": round(min(ratios), 3),
        "max_ratio": round(max(ratios), 3),
        "goal_median_at_least_0.8": statistics.median(ratios) >= 0.8,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per strategy")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--fsdp-layers-per-unit",
        type=int,
        default=2,
        help="resources.fsdp_layers_per_unit of the FSDP2 side (the job's default is 1)",
    )
    args = parser.parse_args()

    import ray

    from thinkforge.jobs.synthetic import write_jsonl

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        work = Path(tmp)
        n_params = build_model(work / "model", args.layers)
        data = write_jsonl(work / "sums.jsonl", n=256, seed=0)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            rows = run(
                work / "model", data, work, args.rounds, args.steps, args.fsdp_layers_per_unit
            )
        finally:
            ray.shutdown()
    print(f"model: random Qwen2, {n_params / 1e6:.0f}M parameters (fp32), 2 CPU workers, gloo;")
    print(f"{args.rounds} rounds of {args.steps} steps per strategy, global batch 8,")
    print(f"FSDP2 with {args.fsdp_layers_per_unit} decoder layers per unit")
    summary = report(rows)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
