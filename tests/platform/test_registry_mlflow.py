"""MlflowRegistry against real MLflow stores: a local SQLite store, and a live ``mlflow
server`` on a fresh PostgreSQL database with proxied artifacts.

Versions are registered the way training jobs register them, through
``thinkforge.jobs.tracking`` (a tiny directory of files instead of a model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port, seed_mlflow_store
from thinkforge.contract import ModelRef
from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.tracking import MetricLogger, open_job_run, register_model
from thinkforge.platform.errors import InvalidRequest, NotFound
from thinkforge.platform.mlflow_server import MlflowServer
from thinkforge.platform.registry import (
    AliasNotFound,
    InvalidReference,
    MlflowRegistry,
    ModelNotFound,
    VersionNotFound,
    VersionStatus,
    parse_ref,
)

NAME = "tiny-sft"


def make_model_dir(root: Path, seed: str) -> Path:
    """A stand-in for a Hugging Face directory: a few files, one in a subfolder."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "seed": seed}))
    (root / "model.safetensors").write_bytes(os.urandom(4096))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text(json.dumps({"seed": seed}))
    return root


def register_job(
    uri: str, tmp_path: Path, job_id: str, *, artifact_root: str | None = None, name: str = NAME
) -> str:
    """Open the job's run, log metrics and register its model, as a training job does."""
    config = SFTConfig(model="thinkforge/tiny", dataset="train.jsonl", recipe="tiny-cpu")
    run_id = open_job_run(
        tracking_uri=uri,
        job_id=job_id,
        config=config,
        dataset_sha256="d" * 64,
        artifact_root=artifact_root,
    )
    logger = MetricLogger(uri, run_id)
    logger.log({"loss": 2.0}, step=1)
    logger.log({"loss": 0.5, "learning_rate": 1e-5}, step=2)
    logger.flush()
    return register_model(
        tracking_uri=uri,
        run_id=run_id,
        model_dir=make_model_dir(tmp_path / job_id, seed=job_id),
        name=name,
        job_id=job_id,
        base_model=config.model,
        dataset_sha256="d" * 64,
    )


def test_a_retried_job_logs_each_step_once(tmp_path: Path) -> None:
    """A retry trains the steps after its checkpoint again (the same values: resume is
    exact); its logger skips the steps the job's run holds already."""
    uri = f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow.db')}"
    config = SFTConfig(model="thinkforge/tiny", dataset="train.jsonl")

    def attempt(steps: range) -> str:
        run_id = open_job_run(tracking_uri=uri, job_id="j", config=config, dataset_sha256="d")
        logger = MetricLogger(uri, run_id)
        logger.skip_logged_steps()
        logger.log({"data_records": 10.0}, step=0)
        for step in steps:
            logger.log({"loss": 5.0 - step, "step": float(step)}, step=step)
        logger.flush()
        return run_id

    first = attempt(range(1, 4))  # lost after step 3, its checkpoint at 2
    assert attempt(range(3, 6)) == first
    client = MlflowClient(tracking_uri=uri)
    assert [int(p.step) for p in client.get_metric_history(first, "loss")] == [1, 2, 3, 4, 5]
    assert [int(p.step) for p in client.get_metric_history(first, "data_records")] == [0]


def stored_file(artifacts: Path, version_dir_marker: str, rel: str) -> Path:
    """The on-disk copy of ``rel`` in the version whose config names ``version_dir_marker``."""
    for config in artifacts.rglob("model/config.json"):
        if version_dir_marker in config.read_text():
            return config.parent / rel
    raise AssertionError(f"no stored model/ folder for {version_dir_marker}")


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A SQLite tracking/registry store with file artifacts, both in tmp_path."""
    yield f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow.db')}", tmp_path / "artifacts"


def test_parse_ref_forms() -> None:
    assert parse_ref("models:/tiny-sft@production") == ModelRef("tiny-sft", alias="production")
    assert parse_ref("models:/tiny-sft/3") == ModelRef("tiny-sft", version=3)
    assert parse_ref("tiny-sft@staging") == ModelRef("tiny-sft", alias="staging")
    assert parse_ref("org/tiny-sft/12") == ModelRef("org/tiny-sft", version=12)
    assert str(parse_ref("tiny-sft/3")) == "models:/tiny-sft/3"
    for bad in ("tiny-sft", "tiny-sft/0", "tiny-sft/x", "@prod", "tiny-sft@", "a@b c", "/3"):
        with pytest.raises(InvalidReference, match="NAME/VERSION"):
            parse_ref(bad)


@pytest.mark.slow
def test_local_store_read_aliases_and_verify(local_store: tuple[str, Path], tmp_path: Path) -> None:
    uri, artifacts = local_store
    root = artifacts.as_uri()
    assert register_job(uri, tmp_path, "job-a", artifact_root=root) == f"{NAME}/1"
    assert register_job(uri, tmp_path, "job-b", artifact_root=root) == f"{NAME}/2"
    registry = MlflowRegistry(uri)

    MlflowClient(uri).create_registered_model("another-model")
    first = registry.list_models(max_results=1)
    assert [m.name for m in first.items] == ["another-model"] and first.next_page_token
    rest = registry.list_models(max_results=1, page_token=first.next_page_token)
    assert [m.name for m in rest.items] == [NAME]
    assert registry.get_model(NAME).latest_version == 2
    newest = registry.list_versions(NAME, max_results=1)
    assert [v.version for v in newest.items] == [2] and newest.next_page_token
    older = registry.list_versions(NAME, page_token=newest.next_page_token)
    assert [v.version for v in older.items] == [1]

    detail = registry.get_version(NAME, 1)
    assert detail.status is VersionStatus.READY and detail.run_id
    assert detail.lineage == {
        "job_id": "job-a",
        "base_model": "thinkforge/tiny",
        "dataset_sha256": "d" * 64,
        "recipe": "tiny-cpu",
    }
    assert detail.metrics == {"loss": 0.5, "learning_rate": 1e-5}
    assert detail.params["recipe"] == "tiny-cpu"
    assert detail.manifest is not None
    files = {"config.json", "model.safetensors", "tokenizer/tokenizer.json", "MLmodel"}
    assert set(detail.manifest) == files  # MLmodel: the pyfunc flavor, checked like the rest
    assert detail.manifest["model.safetensors"]["size"] == 4096

    assert registry.set_alias(NAME, "production", 1) is None
    assert registry.set_alias(NAME, "staging", 2) is None
    assert registry.set_alias(NAME, "production", 2) == 1  # moved
    assert registry.get_alias(NAME, "production") == 2
    assert registry.get_alias(NAME, "latest") == 2
    assert registry.get_model(NAME).aliases == {"production": 2, "staging": 2}
    assert registry.list_versions(NAME).items[0].aliases == ["production", "staging"]
    assert registry.delete_alias(NAME, "staging") == 2
    assert registry.get_alias(NAME, "staging") is None
    with pytest.raises(AliasNotFound):
        registry.delete_alias(NAME, "staging")

    assert registry.resolve(f"models:/{NAME}@production") == (NAME, 2)
    assert registry.resolve(f"{NAME}/1") == (NAME, 1)
    assert registry.verify_version(NAME, 1) == []
    assert registry.verify_version(NAME, 2) == []


@pytest.mark.slow
def test_local_store_errors(local_store: tuple[str, Path], tmp_path: Path) -> None:
    uri, artifacts = local_store
    register_job(uri, tmp_path, "job-a", artifact_root=artifacts.as_uri())
    registry = MlflowRegistry(uri)
    with pytest.raises(ModelNotFound, match="no registered model 'nope'"):
        registry.get_model("nope")
    with pytest.raises(ModelNotFound):
        registry.get_version("nope", 1)
    with pytest.raises(VersionNotFound, match="has no version 7"):
        registry.set_alias(NAME, "production", 7)
    with pytest.raises(AliasNotFound, match="no alias 'production'"):
        registry.resolve(f"{NAME}@production")
    with pytest.raises(InvalidReference):
        registry.set_alias(NAME, "v3", 1)  # MLflow reserves v<N> for versions
    assert isinstance(VersionNotFound("x"), NotFound)
    assert isinstance(InvalidReference("x"), InvalidRequest)


@pytest.mark.slow
def test_verify_reports_corrupt_missing_and_unlisted_files(
    local_store: tuple[str, Path], tmp_path: Path
) -> None:
    uri, artifacts = local_store
    for job in ("job-a", "job-b", "job-c"):
        register_job(uri, tmp_path, job, artifact_root=artifacts.as_uri())
    registry = MlflowRegistry(uri)

    weights = stored_file(artifacts, "job-a", "model.safetensors")
    weights.write_bytes(b"\0" + weights.read_bytes()[1:])  # same size, different bytes
    assert registry.verify_version(NAME, 1) == [
        "model.safetensors: sha256 differs from the manifest"
    ]

    stored_file(artifacts, "job-b", "tokenizer/tokenizer.json").unlink()
    assert registry.verify_version(NAME, 2) == [
        "tokenizer/tokenizer.json: missing from the artifact store"
    ]
    manifest_path = stored_file(artifacts, "job-b", "manifest.json")  # cover the tracks
    manifest = json.loads(manifest_path.read_text())
    del manifest["tokenizer/tokenizer.json"]
    manifest_path.write_text(json.dumps(manifest))
    assert registry.verify_version(NAME, 2) == [
        "manifest.json: sha256 differs from the version's tag"
    ]

    stored_file(artifacts, "job-c", "model.safetensors").write_bytes(b"short")
    stored_file(artifacts, "job-c", "extra.py").write_text("import os\n")
    assert registry.verify_version(NAME, 3) == [
        "model.safetensors: size 5 differs from the manifest's",
        "extra.py: in the artifact store but not in the manifest",
    ]
    stored_file(artifacts, "job-c", "manifest.json").unlink()
    assert registry.get_version(NAME, 3).manifest is None
    assert registry.verify_version(NAME, 3) == [
        "manifest.json: missing; register the version again"
    ]


@pytest.mark.slow
@pytest.mark.postgres
def test_mlflow_server_on_postgres(pg_database: str, tmp_path: Path) -> None:
    artifacts = tmp_path / "mlartifacts"
    server = MlflowServer(pg_database, artifacts, port=free_port(), log_path=tmp_path / "srv.log")
    with server:
        assert register_job(server.url, tmp_path, "job-pg") == f"{NAME}/1"
        registry = MlflowRegistry(server.url)

        detail = registry.get_version(NAME, 1)
        assert detail.source.startswith("mlflow-artifacts:/")
        assert detail.lineage["job_id"] == "job-pg" and detail.lineage["recipe"] == "tiny-cpu"
        assert detail.metrics["loss"] == 0.5
        assert detail.manifest is not None and "model.safetensors" in detail.manifest

        assert registry.set_alias(NAME, "production", 1) is None
        assert registry.resolve(f"models:/{NAME}@production") == (NAME, 1)
        assert registry.list_versions(NAME).items[0].aliases == ["production"]
        assert registry.verify_version(NAME, 1) == []

        stored_file(artifacts, "job-pg", "config.json").write_text("{}")
        problems = registry.verify_version(NAME, 1)
        assert problems and problems[0].startswith("config.json: ")
