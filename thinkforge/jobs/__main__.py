"""The fine-tune job entrypoint the control plane submits as a Ray Job.

    python -m thinkforge.jobs --job-id ftjob-123 --config job.json \\
        [--mlflow-uri sqlite:///mlflow.db] [--mlflow-artifact-root DIR] \\
        [--storage-path DIR] [--data-dir DIR] [--experiment NAME] [--ray-address ADDR]

Order of work: validate the config, the dataset (every record) and the base model
before any Ray resource is taken; then open the job's MLflow run, train with Ray Train
(resuming from the job's latest checkpoint if there is one), log and register the final
model. Progress goes to stdout as ``THINKFORGE_EVENT {json}`` lines. Any failure ends
with exit status 1 and, as the last line on stderr, ``thinkforge job error: <what to fix>``.

Errors:
    JobError            the job cannot run or did not finish; the message is for the user
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from thinkforge.contract import LORA_TAG, default_registered_name, emit_error, emit_event
from thinkforge.jobs.config import RecordError, SFTConfig, iter_records


class JobError(Exception):
    """The job cannot run or did not finish; ``str(exc)`` tells the user what to fix."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m thinkforge.jobs", description=__doc__)
    parser.add_argument("--job-id", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="path of the resolved SFTConfig as JSON (or YAML)")
    source.add_argument("--config-json", help="the resolved SFTConfig itself, as JSON")
    parser.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="tracking + registry URI (default: MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--mlflow-artifact-root", default=None)
    parser.add_argument("--experiment", default="thinkforge")
    parser.add_argument("--storage-path", default=".thinkforge/checkpoints")
    parser.add_argument("--data-dir", default=".thinkforge", help="caches the tiny model")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS or local")
    return parser.parse_args(argv)


def load_config(path: str) -> SFTConfig:
    from pydantic import ValidationError

    try:
        if path.endswith((".yaml", ".yml")):
            return SFTConfig.from_yaml(path)
        return SFTConfig.model_validate_json(Path(path).read_text())
    except OSError as exc:
        raise JobError(f"cannot read the config {path}: {exc.strerror}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        raise JobError(f"invalid config {path}: {loc}: {err['msg']}") from None


def load_config_json(text: str) -> SFTConfig:
    """The config inline, as the control plane passes it (no shared file system needed)."""
    from pydantic import ValidationError

    try:
        return SFTConfig.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        raise JobError(f"invalid config: {loc}: {err['msg']}") from None


def validate_dataset(path: str, config: SFTConfig) -> int:
    """Parse every record now, so a bad file fails the job before training starts."""
    if not path:
        raise JobError("no dataset given: set 'dataset' to a JSONL or parquet file")
    if not Path(path).exists():
        raise JobError(f"dataset {path} does not exist")
    try:
        count = sum(1 for _ in iter_records(path, config.format))
    except RecordError as exc:
        raise JobError(f"dataset {path}: {exc}") from None
    except UnicodeDecodeError:
        raise JobError(f"dataset {path} is not UTF-8 text (expected JSONL)") from None
    if count == 0:
        raise JobError(f"dataset {path} has no records")
    return count


def resolve_model(config: SFTConfig, data_dir: str, mlflow_uri: str | None) -> str:
    """The base model as a loadable path or id; its config must load offline now."""
    from thinkforge.jobs.tiny import resolve_base_model
    from thinkforge.jobs.tracking import registry_resolver

    resolver = registry_resolver(mlflow_uri, Path(data_dir) / "models") if mlflow_uri else None
    try:
        path = resolve_base_model(config.model, data_dir, registry_resolver=resolver)
    except Exception as exc:
        raise JobError(
            f"base model {config.model!r} cannot be resolved: {_first_line(exc)}"
        ) from None
    # "org/name" is a Hugging Face id; only explicit paths can be said not to exist.
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise JobError(f"base model path {path} does not exist")
    from transformers import AutoConfig

    try:
        base = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise JobError(
            f"base model {config.model!r} cannot be loaded: {_first_line(exc)}"
        ) from None
    _check_router(config.model, base)
    if config.lora is not None:
        from thinkforge.jobs.lora import LoraTargetError, check_base_targets

        try:
            check_base_targets(path, config.lora, config.model)
        except LoraTargetError as exc:
            raise JobError(f"[{exc.code}] {exc}") from None
    return path


def _check_router(model: str, base: Any) -> None:
    """Experts whose router thinkforge does not know fail the job before any worker starts,
    tagged with their code (the control plane checks only local bases at create time)."""
    from thinkforge.jobs.moe import RouterError, is_moe, router_spec

    if is_moe(base):
        try:
            router_spec(base)
        except RouterError as exc:
            raise JobError(f"[{exc.code}] base model {model!r}: {exc}") from None


def training_failure(error: BaseException) -> str:
    """What a worker said when training failed (Ray Train's own message is only "Training
    failed due to worker errors"): the lowest failing rank's exception, with its code when
    it has one (``checkpoint_incompatible``)."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return _first_line(error)
    exc = failures[min(failures)]
    code = getattr(exc, "code", None)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    # A worker's exception may arrive as text with its traceback: its last line says it.
    text = lines[-1].strip() if lines else type(exc).__name__
    return f"[{code}] {text}" if code else text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_job(args: argparse.Namespace) -> str | None:
    """Validate, train, register; returns "name/version" when a registry is configured."""
    from thinkforge.jobs.data import dataset_sha256

    config = load_config_json(args.config_json) if args.config_json else load_config(args.config)
    records = validate_dataset(config.dataset, config)
    if config.validation_dataset:
        validate_dataset(config.validation_dataset, config)
    model_path = resolve_model(config, args.data_dir, args.mlflow_uri)
    sha = dataset_sha256(config.dataset)
    emit_event("validated", job_id=args.job_id, records=records, dataset_sha256=sha)
    run_id = None
    if args.mlflow_uri:
        from thinkforge.jobs.tracking import open_job_run

        run_id = open_job_run(
            tracking_uri=args.mlflow_uri,
            job_id=args.job_id,
            config=config,
            dataset_sha256=sha,
            experiment_name=args.experiment,
            artifact_root=args.mlflow_artifact_root,
        )
        emit_event("mlflow_run", run_id=run_id)
    try:
        ref = _train_and_register(args, config, model_path, run_id, sha)
    except Paused:  # the run checkpointed and stopped when asked; a resume goes on from there
        _end_run(args.mlflow_uri, run_id, "KILLED")
        return None
    except BaseException:
        _end_run(args.mlflow_uri, run_id, "FAILED")
        raise
    _end_run(args.mlflow_uri, run_id, "FINISHED")
    return ref


def _train_and_register(
    args: argparse.Namespace, config: SFTConfig, model_path: str, run_id: str | None, sha: str
) -> str | None:
    import ray

    from thinkforge.jobs.sft import ClusterTooSmall, run_training

    if not ray.is_initialized():
        ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS"))
    try:
        result = run_training(
            config,
            args.job_id,
            args.storage_path,
            model_path=model_path,
            tracking_uri=args.mlflow_uri,
            run_id=run_id,
        )
    except ClusterTooSmall as exc:
        raise JobError(str(exc)) from None
    if result.error is not None:
        raise JobError(f"training failed: {training_failure(result.error)}")
    if result.checkpoint is None:
        raise JobError("training finished without a checkpoint")
    metrics = result.metrics or {}
    if metrics.get("step", 0) < metrics.get("total_steps", 0):
        emit_event("paused", checkpoint=str(result.checkpoint.path), step=int(metrics["step"]))
        raise Paused
    emit_event("trained", checkpoint=str(result.checkpoint.path), metrics=result.metrics)
    if not (args.mlflow_uri and run_id):
        return None
    from thinkforge.jobs.tracking import register_model

    name = config.registered_model_name or default_registered_name(config.model)
    with result.checkpoint.as_directory() as final_dir, tempfile.TemporaryDirectory() as tmp:
        model_dir, tags = final_dir, {}
        if config.lora is not None:
            tags = {LORA_TAG: "merged" if config.lora.merge else "adapter"}
        if config.lora is not None and config.lora.merge:
            from thinkforge.jobs.lora import merge_adapter

            model_dir = str(merge_adapter(model_path, final_dir, Path(tmp) / "merged"))
        ref = register_model(
            tracking_uri=args.mlflow_uri,
            run_id=run_id,
            model_dir=model_dir,
            name=name,
            job_id=args.job_id,
            base_model=config.model,
            dataset_sha256=sha,
            template=config.template.value,
            tags=tags,
        )
    emit_event("registered", model_version=ref, run_id=run_id)
    return ref


class Paused(Exception):
    """The run stopped early, at a pause request, after checkpointing (see ``sft._train``)."""


def _end_run(mlflow_uri: str | None, run_id: str | None, status: str) -> None:
    if not (mlflow_uri and run_id):
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=mlflow_uri).set_terminated(run_id, status=status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # No network here: fail fast instead of waiting on Hugging Face Hub timeouts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run_job(args)
    except JobError as exc:
        message = str(exc)
    except Exception as exc:  # unexpected: keep the trace for the log, then the one line
        traceback.print_exc()
        message = f"unexpected {type(exc).__name__}: {_first_line(exc)}"
    else:
        return 0
    emit_error(message)
    return 1


if __name__ == "__main__":
    sys.exit(main())
