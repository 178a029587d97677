"""MLflow for a fine-tune job: one run per job, per-step metrics, the registered model.

The driver opens (or, after a restart, reopens) the run tagged with the job id, rank 0
of the training workers logs per-step metrics into it, and at the end the driver logs
the final Hugging Face directory under the run's ``model/`` artifacts with a sha256
``manifest.json`` and registers it as a new version of the registered model:

    run_id = open_job_run(tracking_uri=uri, job_id=job_id, config=cfg, ...)
    logger = MetricLogger(uri, run_id); logger.log({"loss": 1.2}, step=3); logger.flush()
    ref = register_model(tracking_uri=uri, run_id=run_id, model_dir=final, ...)  # "name/3"

Run tags: ``job_id``, ``base_model``, ``dataset_sha256``, ``recipe``; version tags:
``job_id``, ``base_model``, ``dataset_sha256``, ``manifest_sha256``. The version's
source is the run's ``model/`` artifact folder, so ``models:/name/N`` downloads to a
directory that ``from_pretrained`` loads and ``thinkforge.contract.check_manifest``
checks. Names, layout and manifest format: ``thinkforge.contract``.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinkforge.contract import (
    BASE_MODEL_TAG,
    DATASET_SHA_TAG,
    JOB_TAG,
    MANIFEST_FILE,
    MANIFEST_SHA_TAG,
    MLMODEL_FILE,
    MODEL_ARTIFACT_PATH,
    PYFUNC_LOADER,
    PYFUNC_TASK,
    RECIPE_TAG,
    build_manifest,
    check_manifest,
    manifest_bytes,
    sha256_file,
)
from thinkforge.jobs.checkpoints import model_files
from thinkforge.jobs.config import SFTConfig

__all__ = [
    "MetricLogger",
    "flatten",
    "open_job_run",
    "register_model",
    "registry_resolver",
]


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: a resolved config as MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=name + "."))
        else:
            out[name] = "" if value is None else str(value)
    return out


def open_job_run(
    *,
    tracking_uri: str,
    job_id: str,
    config: SFTConfig,
    dataset_sha256: str,
    experiment_name: str = "thinkforge",
    artifact_root: str | None = None,
) -> str:
    """The run id of the job's run: found by its job tag (a restarted job) or created."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        experiment_id = client.create_experiment(experiment_name, artifact_location=artifact_root)
    else:
        experiment_id = experiment.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.{JOB_TAG} = '{job_id}'")
    if runs:
        run_id = str(runs[0].info.run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {
        JOB_TAG: job_id,
        BASE_MODEL_TAG: config.model,
        DATASET_SHA_TAG: dataset_sha256,
        RECIPE_TAG: config.recipe or "",
    }
    run = client.create_run(experiment_id, run_name=job_id, tags=tags)
    run_id = str(run.info.run_id)
    _log_params(client, run_id, flatten(config.model_dump(mode="json")))
    return run_id


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow's per-batch param limit
        client.log_batch(run_id, params=items[i : i + 100])


class MetricLogger:
    """Buffers per-step metrics and writes them in batches, so logging costs no step time."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 2.0) -> None:
        self._client = _client(tracking_uri)
        self._run_id = run_id
        self._every = flush_every_s
        self._pending: list[Any] = []
        self._last = time.monotonic()
        self._logged_through = -1  # steps up to this one are in the run already

    def skip_logged_steps(self, step_metric: str = "step") -> None:
        """From now on drop the steps the run holds already (its ``step_metric`` tells the
        last one; without it, only step 0's figures can be there). A retry trains the
        steps after its checkpoint again: resume being exact, each step is logged once."""
        metrics = self._client.get_run(self._run_id).data.metrics
        last = metrics.get(step_metric, 0 if metrics else -1)
        self._logged_through = int(last)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self._logged_through:
            return
        now_ms = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now_ms, step) for k, v in metrics.items()]
        if time.monotonic() - self._last >= self._every:
            self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self._run_id, str(path), artifact_path)

    def flush(self) -> None:
        for i in range(0, len(self._pending), 1000):
            self._client.log_batch(self._run_id, metrics=self._pending[i : i + 1000])
        self._pending = []
        self._last = time.monotonic()


def register_model(
    *,
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    name: str,
    job_id: str,
    base_model: str,
    dataset_sha256: str,
    template: str = "s1",
    tags: dict[str, str] | None = None,
) -> str:
    """Log the HF directory under ``model/`` as an MLflow pyfunc model (an ``MLmodel``
    beside the files naming ``thinkforge.serve.pyfunc`` as its loader) with a manifest of every file, and
    register it: "name/N". ``tags``: more version tags (a LoRA job's ``LORA_TAG``).

    Idempotent per run: a restarted job that already registered gets the same version.
    """
    client = _client(tracking_uri)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return f"{name}/{version.version}"
    root = Path(model_dir)
    files = model_files(root)
    manifest = build_manifest(files, root)
    for path in files:
        rel_parent = path.parent.relative_to(root).as_posix()
        sub = MODEL_ARTIFACT_PATH if rel_parent == "." else f"{MODEL_ARTIFACT_PATH}/{rel_parent}"
        client.log_artifact(run_id, str(path), artifact_path=sub)
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = mlmodel_file(
            Path(tmp), run_id=run_id, artifact_path=MODEL_ARTIFACT_PATH, name=name,
            template=template,
        )  # fmt: skip
        manifest |= build_manifest([mlmodel], Path(tmp))
        client.log_artifact(run_id, str(mlmodel), artifact_path=MODEL_ARTIFACT_PATH)
        manifest_path = Path(tmp) / MANIFEST_FILE
        manifest_path.write_bytes(manifest_bytes(manifest))
        client.log_artifact(run_id, str(manifest_path), artifact_path=MODEL_ARTIFACT_PATH)
        manifest_sha = sha256_file(manifest_path)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
    tags = {
        JOB_TAG: job_id,
        BASE_MODEL_TAG: base_model,
        DATASET_SHA_TAG: dataset_sha256,
        MANIFEST_SHA_TAG: manifest_sha,
        **(tags or {}),
    }
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return f"{name}/{version.version}"


def mlmodel_file(
    directory: Path, *, run_id: str, artifact_path: str, name: str, template: str
) -> Path:
    """Write the ``MLmodel`` that makes a Hugging Face directory a pyfunc model whose
    loader is ``thinkforge.serve.pyfunc`` (named, not imported)."""
    import mlflow.pyfunc
    from mlflow.models import Model

    model = Model(artifact_path=artifact_path, run_id=run_id, metadata={"task": PYFUNC_TASK})
    config = {"name": name, "template": template}
    mlflow.pyfunc.add_to_model(model, loader_module=PYFUNC_LOADER, model_config=config)
    path = directory / MLMODEL_FILE
    model.save(str(path))
    return path


def registry_resolver(tracking_uri: str, dest_root: str | Path) -> Callable[[str], str]:
    """A ``resolve_base_model`` hook: download ``models:/name/N`` (or ``@alias``) locally.

    The download is checked against the version's manifest before it is trained on.
    """

    def resolve(uri: str) -> str:
        import mlflow.artifacts

        dest = Path(dest_root) / hashlib.sha256(uri.encode()).hexdigest()[:16]
        dest.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking_uri
        )
        problems = check_manifest(local)
        if problems:
            raise ValueError(f"{uri} does not match its manifest: {'; '.join(problems[:3])}")
        return str(local)

    return resolve
