"""End to end on a local Ray cluster: 2-worker DDP training through the job entrypoint,
MLflow run and registered version, checkpoints, and exact resume after a worker failure;
the same with FSDP2 over gloo (sharded DCP checkpoints, sharded export); a job asking for
GPUs the cluster does not have."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import seed_mlflow_store
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
from thinkforge.jobs.checkpoints import list_checkpoints, model_files
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
    return run_entrypoint("job-a", config, workdir, data_dir, prefix="")


def run_entrypoint(
    job_id: str, config: SFTConfig, workdir: Path, data_dir: Path, *, prefix: str
) -> str:
    """The job through ``python -m thinkforge.jobs``'s main, its MLflow store (whose URI it
    returns) and artifacts named by ``prefix`` in ``workdir``."""
    config_path = workdir / f"{prefix or 'job'}.json"
    config_path.write_text(config.model_dump_json())
    uri = f"sqlite:///{seed_mlflow_store(workdir / f'{prefix}mlflow.db')}"
    argv = ["--job-id", job_id, "--config", str(config_path), "--mlflow-uri", uri]
    argv += ["--mlflow-artifact-root", str(workdir / f"{prefix}artifacts")]
    argv += ["--storage-path", str(workdir / "ckpt"), "--data-dir", str(data_dir)]
    assert main(argv) == 0
    return uri


def test_loss_falls_and_checkpoints_are_saved(finished_job: str, workdir: Path) -> None:
    checkpoints = list_checkpoints(workdir / "ckpt", "job-a")
    assert [c.step for c in checkpoints] == [4, 8, 12, 16]
    assert checkpoints[-1].epoch == 2.0
    final = Path(checkpoints[-1].path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "dcp"} <= {
        p.name for p in final.iterdir()
    }
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {
        p.name for p in (final / "dcp").iterdir()
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
    assert "model.safetensors" in manifest and not any(k.startswith("dcp/") for k in manifest)
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


def assert_resume_is_exact(
    config: SFTConfig,
    job_id: str,
    straight: str,
    storage: Path,
    data_dir: Path,
    *,
    killed_after: int,
) -> None:
    """Run ``job_id`` with a worker SIGKILLed after step ``killed_after``: the retry goes on
    from the last checkpoint on storage (at 4), and its checkpoints' loss, val_loss and
    trained tokens equal those of the uninterrupted ``straight``."""
    from tests.jobs import faults
    from thinkforge.jobs.sft import run_training
    from thinkforge.jobs.tiny import ensure_tiny_model

    faults.ship()
    marker, steps = storage / f"{job_id}.killed", storage / f"{job_id}.steps"
    result = run_training(
        config.model_copy(update={"max_failures": 1}),
        job_id,
        str(storage),
        model_path=str(ensure_tiny_model(data_dir)),
        callbacks=[
            faults.RecordSteps(steps),
            faults.KillWorkerOnce(after_step=killed_after, marker=marker),
        ],
    )
    assert result.error is None
    assert marker.exists()  # it did die, once
    total = list_checkpoints(storage, straight)[-1].step
    trained = [int(line) for line in steps.read_text().split()]
    assert trained == [*range(1, killed_after + 1), *range(5, total + 1)]  # not from step 1
    for key in ("loss", "val_loss", TRAINED_TOKENS):
        resumed = {c.step: c.metrics[key] for c in list_checkpoints(storage, job_id)}
        uninterrupted = {c.step: c.metrics[key] for c in list_checkpoints(storage, straight)}
        assert resumed == pytest.approx(uninterrupted, rel=1e-6)


def test_resume_after_a_killed_worker_is_exact(
    finished_job: str, workdir: Path, data_dir: Path, config: SFTConfig
) -> None:
    """Killed right after the checkpoint at 4 is written: Ray Train records a checkpoint
    only when it next polls the workers (every 2 s), so it never heard of this one."""
    assert_resume_is_exact(config, "job-b", "job-a", workdir / "ckpt", data_dir, killed_after=4)


def test_pause_then_resume_is_exact(
    finished_job: str, workdir: Path, data_dir: Path, config: SFTConfig
) -> None:
    """A pause requested after step 5 checkpoints the step the run is on and ends it early;
    a second run of the job resumes there, and its checkpoints' loss, val_loss and trained
    tokens equal the uninterrupted job's (``assert_resume_is_exact``'s measure)."""
    from tests.jobs import faults
    from thinkforge.jobs.checkpoints import clear_pause
    from thinkforge.jobs.sft import run_training
    from thinkforge.jobs.tiny import ensure_tiny_model

    faults.ship()
    storage, model = workdir / "ckpt", str(ensure_tiny_model(data_dir))
    pause = faults.PauseAfter(after_step=5, storage=storage, job_id="job-p")
    first = run_training(config, "job-p", str(storage), model_path=model, callbacks=[pause])
    assert first.error is None
    paused_at = int(first.metrics["step"])
    assert 5 < paused_at < first.metrics["total_steps"] == 16
    assert [c.step for c in list_checkpoints(storage, "job-p")][-1] == paused_at
    clear_pause(storage, "job-p")
    second = run_training(config, "job-p", str(storage), model_path=model)
    assert second.error is None and second.metrics["step"] == 16
    steps = {c.step for c in list_checkpoints(storage, "job-p")}
    assert {4, 8, 12, 16, paused_at} <= steps
    for key in ("loss", "val_loss", TRAINED_TOKENS):
        resumed = {c.step: c.metrics[key] for c in list_checkpoints(storage, "job-p")}
        uninterrupted = {c.step: c.metrics[key] for c in list_checkpoints(storage, "job-a")}
        assert {s: resumed[s] for s in uninterrupted} == pytest.approx(uninterrupted, rel=1e-6)


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
    uri = f"sqlite:///{seed_mlflow_store(workdir / 'mlflow-moe.db')}"
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


# ---------------------------------------------------------------- FSDP2 on 2 CPU workers


@pytest.fixture(scope="module")
def fsdp_config(config: SFTConfig) -> SFTConfig:
    # One epoch (8 steps, checkpoints at 4 and 8); small export shards force an index.
    update = {"strategy": "fsdp"}
    return config.model_copy(
        update={
            "resources": config.resources.model_copy(update=update),
            "hyperparameters": config.hyperparameters.model_copy(update={"n_epochs": 1}),
            "export_shard_mb": 1,
        }
    )


@pytest.fixture(scope="module")
def fsdp_job(ray_cluster: None, workdir: Path, data_dir: Path, fsdp_config: SFTConfig) -> Path:
    from thinkforge.jobs.sft import run_training
    from thinkforge.jobs.tiny import ensure_tiny_model

    model = str(ensure_tiny_model(data_dir))
    result = run_training(fsdp_config, "job-f", str(workdir / "ckpt"), model_path=model)
    assert result.error is None
    return workdir / "ckpt"


def test_fsdp_trains_and_writes_sharded_state_and_a_sharded_export(
    fsdp_job: Path, finished_job: str, workdir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    checkpoints = list_checkpoints(fsdp_job, "job-f")
    assert [c.step for c in checkpoints] == [4, 8]
    # The same data and schedule as DDP's first epoch up to step 4 (warmup and decay
    # differ after: DDP runs 2 epochs), so the first checkpoint's loss agrees closely.
    ddp = {c.step: c.metrics["loss"] for c in list_checkpoints(workdir / "ckpt", "job-a")}
    assert checkpoints[0].metrics["loss"] == pytest.approx(ddp[4], rel=0.05)
    assert checkpoints[-1].metrics["loss"] < checkpoints[0].metrics["loss"]
    final = Path(checkpoints[-1].path)
    state = json.loads((final / "thinkforge_checkpoint.json").read_text())
    assert state["layout"]["strategy"] == "fsdp" and state["layout"]["world_size"] == 2
    shards = sorted(p.name for p in (final / "dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert {f"dcp/{name}" for name in shards} <= set(state["files"])  # both ranks' files
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.float32  # the training dtype on CPU
    # What a registered version's manifest covers: every shard and the index, no DCP state.
    covered = {p.relative_to(final).as_posix() for p in model_files(final)}
    assert set(index["weight_map"].values()) | {"model.safetensors.index.json"} <= covered
    assert not any(name.startswith("dcp/") for name in covered)


def test_fsdp_resume_after_a_killed_worker_is_exact(
    fsdp_job: Path, data_dir: Path, fsdp_config: SFTConfig
) -> None:
    """Each rank reads back only its DCP shards; no full optimizer state exists anywhere."""
    assert_resume_is_exact(fsdp_config, "job-g", "job-f", fsdp_job, data_dir, killed_after=5)


def test_gpus_the_cluster_lacks_fail_the_job_with_a_clear_error(
    ray_cluster: None, workdir: Path, data_dir: Path, fsdp_config: SFTConfig
) -> None:
    from thinkforge.jobs.sft import ClusterTooSmall, run_training

    wants_gpus = fsdp_config.model_copy(
        update={"resources": fsdp_config.resources.model_copy(update={"gpus_per_worker": 1})}
    )
    with pytest.raises(ClusterTooSmall, match=r"need 2 GPU \(the cluster has 0\)"):
        run_training(
            wants_gpus, "job-gpu", str(workdir / "ckpt"), model_path="unused", resource_timeout_s=0
        )
    assert not (workdir / "ckpt" / "job-gpu").exists()


# ---------------------------------------------------------------- LoRA under FSDP2, merged


@pytest.fixture(scope="module")
def lora_config(fsdp_config: SFTConfig) -> SFTConfig:
    from thinkforge.jobs.config import LoRA

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hyper = fsdp_config.hyperparameters.model_copy(update={"learning_rate": 2e-2})
    return fsdp_config.model_copy(
        update={
            "lora": LoRA(r=8, target_modules=targets, merge=True),
            "hyperparameters": hyper,
            "registered_model_name": "lora-merged",
        }
    )


@pytest.fixture(scope="module")
def lora_job(ray_cluster: None, workdir: Path, data_dir: Path, lora_config: SFTConfig) -> str:
    """A LoRA job through the entrypoint under FSDP2, registered merged."""
    return run_entrypoint("job-l", lora_config, workdir, data_dir, prefix="lora-")


def test_lora_under_fsdp_trains_the_adapter_alone_and_registers_it_merged(
    lora_job: str, workdir: Path, data_dir: Path
) -> None:
    import mlflow.artifacts
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from thinkforge.contract import LORA_METRIC_PREFIX, LORA_TAG
    from thinkforge.jobs.tiny import ensure_tiny_model

    checkpoints = list_checkpoints(workdir / "ckpt", "job-l")
    assert [c.step for c in checkpoints] == [4, 8]
    assert checkpoints[-1].metrics["loss"] < checkpoints[0].metrics["loss"]
    final = Path(checkpoints[-1].path)
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the export is the adapter alone
    client = MlflowClient(tracking_uri=lora_job, registry_uri=lora_job)
    version = client.get_model_version("lora-merged", "1")
    assert version.tags[LORA_TAG] == "merged" and version.tags["base_model"] == "thinkforge/tiny"
    run = client.get_run(version.run_id)
    fraction = run.data.metrics[LORA_METRIC_PREFIX + "trainable_fraction"]
    assert 0 < fraction < 0.2
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, dst_path=str(workdir / "lora-dl"),
        tracking_uri=lora_job,
    )  # fmt: skip
    assert check_manifest(local, manifest_sha256=version.tags["manifest_sha256"]) == []
    merged = load_file(Path(local) / "model.safetensors")
    base = load_file(ensure_tiny_model(data_dir) / "model.safetensors")
    assert set(merged) == set(base)  # a plain model: no adapter keys left
    adapted = [k for k in base if "_proj.weight" in k]
    assert adapted and all(not torch.equal(merged[k], base[k]) for k in adapted)
    assert all(torch.equal(merged[k], base[k]) for k in base if "_proj" not in k)
