"""Training throughput: bare single-process torch vs Ray Train TorchTrainer (1 and 2 workers).

Same tiny model, data and step (micro-batch 8, global batch 16 per worker-step) in each
mode; prints tokens/s and the ratios to bare torch. Target: 1-worker Ray within 10%.

    .venv/bin/python bench/train_bench.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.synthetic import write_jsonl
from thinkforge.jobs.tiny import ensure_tiny_model


def bare_torch(cfg: SFTConfig, model_path: str, steps: int) -> float:
    """The same loop body as the workers', without Ray: tokens/s over ``steps`` steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkforge.jobs.data import collate, ensure_pad_token, load_examples

    torch.set_num_threads(1)  # a Ray worker with 1 CPU gets OMP_NUM_THREADS=1
    tok = AutoTokenizer.from_pretrained(model_path)
    ensure_pad_token(tok)
    examples, _ = load_examples(cfg.dataset, tok, block_size=cfg.block_size)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    micro = cfg.hyperparameters.micro_batch_size
    accum = cfg.hyperparameters.batch_size // micro
    tokens, elapsed, i = 0, 0.0, 0
    for step in range(steps + 2):  # the first two steps warm up and are not timed
        start = time.perf_counter()
        n = 0
        for _ in range(accum):
            batch = collate(examples[i : i + micro], tok.pad_token_id)
            i = (i + micro) % (len(examples) - micro)
            (model(**batch).loss / accum).backward()
            n += int(batch["input_ids"].ne(tok.pad_token_id).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            tokens, elapsed = tokens + n, elapsed + time.perf_counter() - start
    return tokens / elapsed


def ray_train(cfg: SFTConfig, model_path: str, workers: int, storage: Path) -> float:
    """Mean of the per-step tokens_per_s the workers log (rank 0's view, global tokens)."""
    from mlflow.tracking import MlflowClient

    from thinkforge.jobs.sft import run_training
    from thinkforge.jobs.tracking import open_job_run

    job = f"bench-{workers}w"
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    run_cfg = cfg.model_copy(
        update={"resources": cfg.resources.model_copy(update={"num_workers": workers})}
    )
    run_cfg.hyperparameters.batch_size = cfg.hyperparameters.batch_size * workers
    run_id = open_job_run(
        tracking_uri=uri,
        job_id=job,
        config=run_cfg,
        dataset_sha256="-",
        artifact_root=str(storage / "art"),
    )
    result = run_training(
        run_cfg, job, str(storage / "ckpt"), model_path=model_path, tracking_uri=uri, run_id=run_id
    )
    assert result.error is None, result.error
    hist = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "tokens_per_s")
    values = [m.value for m in sorted(hist, key=lambda m: m.step)][2:]
    return sum(values) / len(values)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    data = write_jsonl(tmp / "sums.jsonl", n=2048, seed=0)
    model_path = str(ensure_tiny_model(tmp))
    cfg = SFTConfig.model_validate(
        {
            "dataset": str(data),
            "block_size": 128,
            "seed": 0,
            "hyperparameters": {
                "batch_size": 16,
                "micro_batch_size": 8,
                "n_epochs": 1,
                "max_steps": args.steps + 2,
            },
        }
    )
    results = {"bare_torch": bare_torch(cfg, model_path, args.steps)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    for workers in (1, 2):
        results[f"ray_{workers}_worker"] = ray_train(cfg, model_path, workers, tmp)
    ray.shutdown()
    base = results["bare_torch"]
    print(
        json.dumps(
            {
                "tokens_per_s": results,
                "ratio_to_bare": {k: round(v / base, 3) for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
