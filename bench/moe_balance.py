"""MoE balance loss: Qwen's global-batch balance vs transformers' per-micro-batch one.

Trains thinkforge/tiny-moe (4 experts, top-2, 2 layers) with recipes/tiny-moe-cpu.yaml on
the mixed-domain synthetic set (running sums + word reversals), once per balance mode,
same data, seed and steps, 2 CPU workers (DDP over gloo, 2 micro-batches per step), then
reports per mode:

- final training loss (mean of the last 5 steps) and held-out loss per domain;
- specialisation: per layer, the share of a domain's top-k selections that go to that
  domain's own top-k experts, averaged over the domains (top_k / n_experts = 0.5 when
  routing ignores the domain, 1.0 when each domain keeps to its own experts);
- seconds per step (median over the steps after the first two, from MLflow timestamps).

    .venv/bin/python bench/moe_balance.py [--steps 120] [--aux-coef 0.01]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from thinkforge.jobs.__main__ import main as run_job
from thinkforge.jobs.checkpoints import list_checkpoints
from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.synthetic import generate_mixed, write_records

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-moe-cpu.yaml"
DOMAINS = ("sums", "words")


def train(mode: str, work: Path, data: Path, steps: int, coef: float) -> tuple[str, str]:
    overrides = [
        f"dataset={data}",
        f"hyperparameters.max_steps={steps}",
        "hyperparameters.n_epochs=100",
        "checkpoint_every_steps=0",
        f"moe.balance={mode}",
        f"moe.aux_loss_coef={coef}",
    ]
    cfg = SFTConfig.from_yaml(RECIPE, overrides=overrides)
    (work / f"{mode}.json").write_text(cfg.model_dump_json())
    uri = f"sqlite:///{work / 'mlflow.db'}"
    argv = ["--job-id", f"moe-{mode}", "--config", str(work / f"{mode}.json")]
    argv += ["--mlflow-uri", uri, "--mlflow-artifact-root", str(work / "artifacts")]
    argv += ["--storage-path", str(work / "ckpt"), "--data-dir", str(work / "data")]
    assert run_job(argv) == 0
    return uri, list_checkpoints(work / "ckpt", f"moe-{mode}")[-1].path


def run_metrics(uri: str, job_id: str) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("thinkforge")
    (run,) = client.search_runs([exp.experiment_id], f"tags.job_id = '{job_id}'")
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    final = statistics.mean(m.value for m in history[-5:])
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in itertools.pairwise(history[2:])]
    return final, statistics.median(gaps)


@torch.no_grad()
def held_out(path: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out loss per domain and the specialisation per layer of a checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkforge.jobs.config import TemplateFamily, parse_record
    from thinkforge.jobs.data import collate, ensure_pad_token, tokenize_example
    from thinkforge.jobs.moe import router_spec, router_stats

    tok = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tok)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    spec = router_spec(model.config)
    out: dict[str, Any] = {}
    counts = {}
    for domain in DOMAINS:
        rows = [r for r in records if r["domain"] == domain]
        examples = [tokenize_example(parse_record(r), tok, TemplateFamily.S1) for r in rows]
        batch = collate(examples, tok.pad_token_id)
        res = model(**batch, output_router_logits=True)
        out[f"held-out loss {domain}"] = float(res.loss)
        counts[domain] = router_stats(res.router_logits, spec, batch["attention_mask"]).counts
    shares = []
    for layer in range(next(iter(counts.values())).shape[0]):
        per_domain = []
        for c in counts.values():
            top = torch.topk(c[layer], spec.top_k).values.sum()
            per_domain.append(float(top / c[layer].sum()))
        shares.append(statistics.mean(per_domain))
    out["specialisation"] = shares
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--aux-coef", type=float, default=0.01)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_records(work / "train.jsonl", generate_mixed(2000, seed=0))
        test = generate_mixed(200, seed=1)
        for mode in ("micro_batch", "global"):
            uri, ckpt = train(mode, work, data, args.steps, args.aux_coef)
            loss, sec = run_metrics(uri, f"moe-{mode}")
            results[mode] = {"final loss": loss, "s/step": sec, **held_out(ckpt, test)}
    ray.shutdown()
    print(json.dumps(results, indent=2))
    print(
        "| balance | final loss | held-out sums | held-out words | specialisation L0 / L1 "
        "| s/step |"
    )
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        spec = " / ".join(f"{s:.3f}" for s in r["specialisation"])
        print(
            f"| {mode} | {r['final loss']:.3f} | {r['held-out loss sums']:.3f} "
            f"| {r['held-out loss words']:.3f} | {spec} | {r['s/step']:.3f} |"
        )


if __name__ == "__main__":
    main()
