"""End to end on a local Ray cluster: 2-worker DDP training through the job entrypoint,
MLflow run and registered version, checkpoints, and exact resume after a worker failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thinkforge.contract import (
    DATA_METRIC_PREFIX,
    MANIFEST_FILE,
    MOE_AUX_LOSS,
    MOE_IMBALANCE,
    TRAINED_TOKENS,
    check_manifest,
    expert_load_metric,
)
from thinkforge.jobs.__main__ import main
from thinkforge.jobs.checkpoints import list_checkpoints
from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.synthetic import write_jsonl, write_mixed_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def config(workdir: Path) -> SFTConfig:
    data = write_jsonl(workdir / "sums.jsonl", n=128, seed=0)
    # 17 held-out sequences: shares of 9 and 8, so the ranks run 3 and 2 real batches of 4.
    held_out = write_jsonl(workdir / "held-out.jsonl", n=17, seed=1)
    return SFTConfig.model_validate(
        {
            "dataset": str(data),
            "validation_dataset": str(held_out),
            "block_size": 128,
            "checkpoint_every_steps": 4,
            "seed": 0,
            "recipe": "test",
            "hyperparameters": {
                "learning_rate": 3e-3,
                "n_epochs": 2,
                "batch_size": 16,
                "micro_batch_size": 4,
            },
            "resources": {"num_workers": 2},
        }
    )


@pytest.fixture(scope="module")
def finished_job(ray_cluster: None, workdir: Path, data_dir: Path, config: SFTConfig) -> Any:
    """One uninterrupted job through the entrypoint, as the control plane runs it."""
    config_path = workdir / "job.json"
    config_path.write_text(config.model_dump_json())
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    argv = ["--job-id", "job-a", "--config", str(config_path), "--mlflow-uri", uri]
    argv += ["--mlflow-artifact-root", str(workdir / "artifacts")]
    argv += ["--storage-path", str(workdir / "ckpt"), "--data-dir", str(data_dir)]
    assert main(argv) == 0
    return uri


def test_loss_falls_and_checkpoints_are_saved(finished_job: str, workdir: Path) -> None:
    checkpoints = list_checkpoints(workdir / "ckpt", "job-a")
    assert [c.step for c in checkpoints] == [4, 8, 12, 16]
    assert checkpoints[-1].epoch == 2.0
    final = Path(checkpoints[-1].path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"} <= {
        p.name for p in final.iterdir()
    }
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)


def test_mlflow_run_and_registered_version(finished_job: str, workdir: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=finished_job, registry_uri=finished_job)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("thinkforge").experiment_id], "tags.job_id = 'job-a'"
    )
    assert run.info.run_name == "job-a" and run.info.status == "FINISHED"
    assert run.data.tags["base_model"] == "thinkforge/tiny" and run.data.tags["recipe"] == "test"
    assert len(run.data.tags["dataset_sha256"]) == 64
    assert run.data.params["hyperparameters.learning_rate"] == "0.003"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 16 and losses[-1] < 0.7 * losses[0]
    assert {"lr", "grad_norm", "tokens_per_s", "epoch", "step"} <= set(run.data.metrics)
    (version,) = client.search_model_versions("name = 'thinkforge-tiny-sft'")
    assert int(version.version) == 1 and version.run_id == run.info.run_id
    assert version.tags["job_id"] == "job-a"
    assert version.tags["dataset_sha256"] == run.data.tags["dataset_sha256"]
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, dst_path=str(workdir / "dl"), tracking_uri=finished_job
    )
    manifest = json.loads((Path(local) / MANIFEST_FILE).read_text())
    assert "model.safetensors" in manifest and "trainer_state.pt" not in manifest
    mlmodel = (Path(local) / "MLmodel").read_text()  # an MLflow pyfunc model, task llm/v1/chat
    assert "loader_module: thinkforge.serve.pyfunc" in mlmodel and "llm/v1/chat" in mlmodel
    assert check_manifest(local, manifest_sha256=version.tags["manifest_sha256"]) == []


def test_trained_tokens_are_the_tokens_the_loss_was_computed_on(finished_job: str) -> None:
    """Every sequence is trained on once per epoch, so the job's count is the dataset's
    assistant tokens times the epochs (the control plane shows it as ``trained_tokens``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=finished_job)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("thinkforge").experiment_id], "tags.job_id = 'job-a'"
    )
    per_epoch = run.data.metrics[f"{DATA_METRIC_PREFIX}trained_tokens"]
    assert per_epoch > 0
    assert run.data.metrics[TRAINED_TOKENS] == 2 * per_epoch


def test_resume_after_a_killed_worker_is_exact(
    finished_job: str, workdir: Path, data_dir: Path, config: SFTConfig
) -> None:
    from tests.jobs import faults
    from thinkforge.jobs.sft import run_training
    from thinkforge.jobs.tiny import ensure_tiny_model

    faults.ship()
    # A worker process is killed after step 5; the retry resumes from the checkpoint at 4.
    kill = faults.KillWorkerOnce(after_step=5, marker=workdir / "job-b.killed")
    retrying = config.model_copy(update={"max_failures": 1})
    result = run_training(
        retrying,
        "job-b",
        str(workdir / "ckpt"),
        model_path=str(ensure_tiny_model(data_dir)),
        callbacks=[kill],
    )
    assert result.error is None
    assert (workdir / "job-b.killed").exists()  # it did die, once
    for key in ("loss", "val_loss", TRAINED_TOKENS):
        resumed = {c.step: c.metrics[key] for c in list_checkpoints(workdir / "ckpt", "job-b")}
        straight = {c.step: c.metrics[key] for c in list_checkpoints(workdir / "ckpt", "job-a")}
        assert resumed == pytest.approx(straight, rel=1e-6)


def test_validation_loss_at_every_checkpoint_is_the_whole_held_out_set(
    finished_job: str, workdir: Path, config: SFTConfig
) -> None:
    """val_loss is logged with each checkpoint's step and equals the token-weighted loss of
    the final weights over all 17 held-out sequences, computed here in one process."""
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkforge.jobs.data import IGNORE_INDEX, ensure_pad_token, load_examples

    client = MlflowClient(tracking_uri=finished_job)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("thinkforge").experiment_id], "tags.job_id = 'job-a'"
    )
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(int(m.step) for m in history) == [4, 8, 12, 16]
    by_step = {int(m.step): m.value for m in history}
    assert by_step[16] < by_step[4]
    final = list_checkpoints(workdir / "ckpt", "job-a")[-1]
    assert final.metrics["val_loss"] == pytest.approx(by_step[16])

    tokenizer = AutoTokenizer.from_pretrained(final.path)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(final.path, dtype=torch.float32).eval()
    assert config.validation_dataset is not None
    examples, _ = load_examples(
        config.validation_dataset, tokenizer, template=config.template, block_size=128
    )
    assert len(examples) == 17
    total = tokens = 0.0
    with torch.no_grad():
        for ex in examples:
            labels = torch.tensor([ex.labels])
            loss = model(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss
            n = int(labels[:, 1:].ne(IGNORE_INDEX).sum())
            total, tokens = total + float(loss) * n, tokens + n
    assert by_step[16] == pytest.approx(total / tokens, rel=1e-4)


@pytest.fixture(scope="module")
def moe_job(ray_cluster: None, workdir: Path, data_dir: Path) -> str:
    """The tiny-moe recipe, 3 steps of 2 workers x 2 micro-batches, global balance."""
    data = write_mixed_jsonl(workdir / "mixed.jsonl", n=64, seed=0)
    recipe = Path(__file__).parents[2] / "recipes" / "tiny-moe-cpu.yaml"
    overrides = [f"dataset={data}", "hyperparameters.max_steps=3", "checkpoint_every_steps=0"]
    config = SFTConfig.from_yaml(recipe, overrides=overrides)
    assert config.moe is not None and config.moe.balance == "global"
    (workdir / "moe.json").write_text(config.model_dump_json())
    uri = f"sqlite:///{workdir / 'mlflow-moe.db'}"
    argv = ["--job-id", "job-moe", "--config", str(workdir / "moe.json"), "--mlflow-uri", uri]
    argv += ["--mlflow-artifact-root", str(workdir / "artifacts-moe")]
    argv += ["--storage-path", str(workdir / "ckpt"), "--data-dir", str(data_dir)]
    assert main(argv) == 0
    return uri


def test_moe_job_logs_router_loss_and_expert_load(moe_job: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=moe_job, registry_uri=moe_job)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("thinkforge").experiment_id], "tags.job_id = 'job-moe'"
    )
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, MOE_AUX_LOSS)}
    assert sorted(history) == [1, 2, 3]
    assert all(0 < v < 4 for v in history.values())  # N_E * sum f P lies in (0, top_k * N_E)
    metrics = run.data.metrics
    for layer in range(2):
        shares = [metrics[expert_load_metric(layer, e)] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0)
    assert metrics[MOE_IMBALANCE] >= 1.0
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "experts.png" in logged  # the heatmap of the last checkpoint
    steps = [a.path for a in client.list_artifacts(run.info.run_id, "experts")]
    assert steps == ["experts/step-000003.png"]
    (version,) = client.search_model_versions("name = 'thinkforge-tiny-moe-sft'")
    assert version.tags["base_model"] == "thinkforge/tiny-moe"
