"""Distillations: a teacher's traces for a question pool, verified and curated into a
training file, run as a Ray Job (``python -m thinkforge.jobs.distill``).

The request names a question file (``purpose=distill``), a teacher (a deployment of the
project, asked through the front door with a key of the run's own; a registry version,
loaded by the job; or an external OpenAI-compatible URL on the settings' allow-list, with
the *name* of its key in the settings) and the curation. The reconciler copies the run's
events into the row's events, and when it ends registers its outputs as files: the
curated s1K-1.1 file (``purpose=fine-tune``, ready as a job's ``training_file``) and every
trace generated (``purpose=distill-traces``; all a failed run leaves). A model trained on
the curated file shows this distillation in its registry lineage (``lineage_for``).

    row = create_distillation(session, settings, project_id=..., spec=DistillCreate(...))
    reconcile_distills(sessions, launcher, settings)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.contract import (
    DISTILL_CURATED_FILE,
    DISTILL_EVENTS_FILE,
    DISTILL_TRACES_FILE,
    RESULTS_FILE,
    TEACHER_KEY_ENV,
)
from thinkforge.jobs.config import DistillConfig
from thinkforge.platform.auth import create_derived_key, derived_key
from thinkforge.platform.deployments import get_deployment
from thinkforge.platform.errors import InvalidFile, InvalidRequest, NotFound, first_error_location
from thinkforge.platform.files import DatasetInfo, FileInfo, get_file, validate_dataset
from thinkforge.platform.launcher import JobLauncher, LaunchState, ModuleLaunch
from thinkforge.platform.models import (
    Distillation,
    DistillEvent,
    File,
    new_id,
)
from thinkforge.platform.pagination import page
from thinkforge.platform.ray_launcher import job_error_line
from thinkforge.platform.runs import cancel_target, move_run, reconcile_rows, submit_row
from thinkforge.platform.schemas import DistillCreate, ModelIn, TeacherIn
from thinkforge.platform.settings import Settings
from thinkforge.platform.status import DistillFailureKind, DistillStatus

log = logging.getLogger(__name__)
TERMINAL = tuple(s.value for s in DistillStatus if s.is_terminal())
TRACES_PURPOSE = "distill-traces"
# The run's front-door key (deployment teachers) lives in this variable of its environment.
RUN_KEY_ENV = "THINKFORGE_API_KEY"

Version = tuple[str, int]


def create_distillation(
    session: Session,
    settings: Settings,
    *,
    project_id: str,
    spec: DistillCreate,
    versions: dict[str, Version] | None = None,
) -> Distillation:
    """A queued distillation. ``versions``: the registry refs of the request (teacher and
    weaker model), resolved by the caller through the project's view of the registry."""
    versions = versions or {}
    questions = _question_file(session, project_id, spec.question_file)
    teacher, target, asks_front_door = _teacher(session, settings, project_id, spec.teacher,
                                                versions)  # fmt: skip
    weaker = None
    if spec.curation.weaker is not None:
        weaker, weaker_public, weaker_door = _platform_model(
            session, settings, project_id, spec.curation.weaker, versions, "curation.weaker"
        )
        teacher["weaker"] = weaker_public
        asks_front_door = asks_front_door or weaker_door
    distill_id = new_id("distill")
    try:
        config = DistillConfig.model_validate(
            {
                "dataset": questions.path, "teacher": target, "samples": spec.samples,
                "thinking": spec.thinking.model_dump(exclude_none=True) if spec.thinking else {},
                "temperature": spec.temperature, "seed": spec.seed,
                "max_completion_tokens": spec.max_completion_tokens,
                "concurrency": spec.concurrency, "max_retries": spec.max_retries,
                "curation": {**spec.curation.model_dump(exclude={"weaker"}), "weaker": weaker},
            }
        )  # fmt: skip
    except ValidationError as exc:
        loc, msg = first_error_location(exc)
        raise InvalidRequest(f"{loc}: {msg}") from None
    row = Distillation(
        id=distill_id, project_id=project_id, status=DistillStatus.QUEUED.value,
        question_file=questions.id, teacher=teacher, config=config.model_dump(mode="json"),
        output_dir=str(settings.data_dir / "distill" / distill_id),
    )  # fmt: skip
    session.add(row)
    if asks_front_door:  # the run asks the front door with a key of its own
        create_derived_key(
            session, settings.secret_key.get_secret_value(), project_id=project_id,
            key_id=_run_key_id(distill_id), purpose=distill_id, role="inference",
        )  # fmt: skip
    session.flush()
    return row


def _run_key_id(distill_id: str) -> str:
    return "key-d" + distill_id.removeprefix("distill-")


def _question_file(session: Session, project_id: str, file_id: str) -> File:
    try:
        row = get_file(session, project_id=project_id, file_id=file_id)
    except NotFound:
        raise InvalidRequest(
            f"question_file {file_id!r} is not a file of this project: upload it with "
            "POST /v1/files and purpose=distill",
            param="question_file", code="file_not_found",
        ) from None  # fmt: skip
    if row.purpose != "distill":
        raise InvalidRequest(
            f"question_file {file_id!r} was uploaded with purpose={row.purpose}: upload the "
            "questions with purpose=distill (each row: question and answer or solution)",
            param="question_file",
        )
    return row


def _teacher(
    session: Session, settings: Settings, project_id: str, spec: TeacherIn,
    versions: dict[str, Version],
) -> tuple[dict[str, Any], dict[str, Any], bool]:  # fmt: skip
    """(what the API shows, the job's TeacherTarget, whether it asks the front door)."""
    if spec.base_url is None:
        model = ModelIn(deployment=spec.deployment, version=spec.version)
        target, public, door = _platform_model(session, settings, project_id, model, versions,
                                               "teacher")  # fmt: skip
        return public, target, door
    url = check_teacher_url(settings, spec.base_url)
    public = {"base_url": url, "model": spec.model, "api_key_secret": spec.api_key_secret}
    target = {"base_url": url, "model": spec.model}
    if spec.api_key_secret is not None:
        if spec.api_key_secret not in settings.distill_teacher_secrets:
            raise InvalidRequest(
                f"teacher.api_key_secret {spec.api_key_secret!r} names no key in the settings "
                "(THINKFORGE_DISTILL_TEACHER_SECRETS)",
                param="teacher.api_key_secret",
            )
        target["api_key_env"] = TEACHER_KEY_ENV
    return public, target, False


def _platform_model(
    session: Session, settings: Settings, project_id: str, spec: ModelIn,
    versions: dict[str, Version], param: str,
) -> tuple[dict[str, Any], dict[str, Any], bool]:  # fmt: skip
    """(the job's TeacherTarget, what the API shows, whether it asks the front door)."""
    if spec.deployment is not None:
        try:
            deployment = get_deployment(session, project_id=project_id, name=spec.deployment)
        except NotFound:
            raise NotFound(
                f"no deployment {spec.deployment!r} in this project", param=f"{param}.deployment"
            ) from None
        target = {"base_url": settings.serve_url, "model": deployment.name,
                  "api_key_env": RUN_KEY_ENV}  # fmt: skip
        public = {"deployment": deployment.name, "model_version": deployment.served_version}
        return target, public, True
    assert spec.version is not None
    name, number = versions[spec.version]
    # No tracking URI: the job reads MLFLOW_TRACKING_URI, which the launcher sets.
    target = {"model_uri": f"models:/{name}/{number}", "model": name}
    return target, {"version": f"{name}/{number}"}, False


def check_teacher_url(settings: Settings, url: str) -> str:
    """``url`` if the settings allow it as a teacher: http(s), no credentials, query or
    dot segments, and scheme, host and port equal to an allowed URL's with a path under
    its path. Anything else is a 400 that says nothing of what the server could reach."""

    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest(
            f"teacher.base_url is not allowed ({why}): an external teacher must be on the "
            "allow-list of teacher URLs (THINKFORGE_DISTILL_TEACHER_URLS)",
            param="teacher.base_url", code="url_not_allowed",
        )  # fmt: skip

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise refuse("not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise refuse("an http or https URL with a host is needed")
    if parsed.userinfo or parsed.query or parsed.fragment or "/.." in parsed.path:
        raise refuse("credentials, queries and dot segments are not accepted")
    for allowed in settings.distill_teacher_urls:
        base = httpx.URL(allowed)
        same = (base.scheme, base.host, base.port) == (parsed.scheme, parsed.host, parsed.port)
        root = base.path.rstrip("/")
        path = parsed.path.rstrip("/")
        if same and (path == root or path.startswith(root + "/")):
            return str(parsed).rstrip("/")
    raise refuse("not on the allow-list")


def get_distillation(
    session: Session, *, project_id: str, distill_id: str, lock: bool = False
) -> Distillation:
    stmt = select(Distillation).where(
        Distillation.id == distill_id, Distillation.project_id == project_id
    )
    row = session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound(f"no distillation {distill_id!r} in this project", param="distill_id")
    return row


def list_distillations(
    session: Session, *, project_id: str, after: str | None, limit: int
) -> tuple[list[Distillation], bool]:
    stmt = select(Distillation).where(Distillation.project_id == project_id)
    return page(session, stmt, Distillation, after=after, limit=limit)


def list_events(
    session: Session, *, project_id: str, distill_id: str, after: str | None, limit: int
) -> tuple[list[DistillEvent], bool]:
    get_distillation(session, project_id=project_id, distill_id=distill_id)
    stmt = select(DistillEvent).where(DistillEvent.distill_id == distill_id)
    return page(session, stmt, DistillEvent, after=after, limit=limit)


def cancel_distillation(
    session: Session, *, project_id: str, distill_id: str
) -> tuple[Distillation, bool]:
    """Cancel a distillation; returns it and whether its launched run must be stopped."""
    row = get_distillation(session, project_id=project_id, distill_id=distill_id, lock=True)
    target = cancel_target(
        DistillStatus(row.status), launched=row.submitted_at is not None,
        what=f"distillation {distill_id}",
    )  # fmt: skip
    if target is not None:
        set_status(row, target)
    return row, target is not DistillStatus.CANCELLED


def set_status(
    row: Distillation, target: DistillStatus, *, error: dict[str, Any] | None = None
) -> bool:
    return move_run(row, target, what="distillation", error=error)


def lineage_for(session: Session, *, project_id: str, dataset_sha256: str | None) -> dict[str, str]:
    """The distillation that produced a training file with this hash, as lineage entries
    (a model version's ``dataset_sha256`` tag names the file it was trained on)."""
    if not dataset_sha256:
        return {}
    row = session.scalar(
        select(Distillation)
        .where(Distillation.project_id == project_id, Distillation.output_sha256 == dataset_sha256)
        .order_by(Distillation.seq.desc())
        .limit(1)
    )
    if row is None:
        return {}
    config = row.config
    return {
        "distill_id": row.id,
        "distill_teacher": json.dumps(row.teacher, sort_keys=True),
        "distill_seed": str(config.get("seed")),
        "distill_samples": str(config.get("samples")),
        "distill_thinking": json.dumps(config.get("thinking"), sort_keys=True),
        "distill_filters": json.dumps(config.get("curation"), sort_keys=True),
        "distill_counts": json.dumps(row.counts, sort_keys=True),
        "distill_question_file": row.question_file,
    }


def launch_spec(row: Distillation, settings: Settings) -> ModuleLaunch:
    args = [
        "--distill-id", row.id, "--config-json", json.dumps(row.config, separators=(",", ":")),
        "--output", row.output_dir,
    ]  # fmt: skip
    if settings.mlflow_artifact_root:
        args += ["--mlflow-artifact-root", settings.mlflow_artifact_root]
    env = {}
    targets = [row.config["teacher"], (row.config.get("curation") or {}).get("weaker") or {}]
    if any(t.get("api_key_env") == RUN_KEY_ENV for t in targets):
        env[RUN_KEY_ENV] = derived_key(settings.secret_key.get_secret_value(), row.id)
    secret_name = row.teacher.get("api_key_secret")
    if secret_name:  # read at launch: a rotated key is used by the next run
        secret = settings.distill_teacher_secrets.get(secret_name)
        if secret is None:
            raise ValueError(f"the teacher key {secret_name!r} is no longer in the settings")
        env[TEACHER_KEY_ENV] = secret.get_secret_value()
    return ModuleLaunch(job_id=row.id, module="thinkforge.jobs.distill", args=tuple(args), env=env)


# ---------------------------------------------------------------- reconciling


def reconcile_distills(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings
) -> None:
    reconcile_rows(
        sessions, Distillation, terminal=TERMINAL, run_key_id=_run_key_id,
        advance=lambda row: _advance(sessions, launcher, settings, row),
    )  # fmt: skip


@dataclass(frozen=True)
class _Outputs:
    """What an ended run left, read before the row is locked (validating takes time)."""

    results: dict[str, Any] | None
    curated: DatasetInfo | None
    curated_problem: str | None
    traces: FileInfo | None


def _read_outputs(row: Distillation) -> _Outputs:
    out = Path(row.output_dir)
    try:
        results = json.loads((out / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        results = None
    curated, problem = None, None
    path = out / DISTILL_CURATED_FILE
    if path.is_file() and path.stat().st_size > 0:
        try:
            curated = validate_dataset(path)
        except InvalidFile as exc:  # the job writes what training reads: a bug if not
            problem = f"the curated file is not valid training data: {exc.message}"
    traces = None
    path = out / DISTILL_TRACES_FILE
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            lines = sum(1 for line in fh if line.strip())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        traces = FileInfo(format="traces", num_records=lines, sha256=digest,
                             bytes=path.stat().st_size)  # fmt: skip
    return _Outputs(results, curated, problem, traces)


def _advance(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings,
    row: Distillation,
) -> None:  # fmt: skip
    if row.submitted_at is None:
        _submit(sessions, launcher, settings, row)
        return
    status = launcher.status(row.id)
    live = status.state in (LaunchState.PENDING, LaunchState.RUNNING)
    if row.status == DistillStatus.CANCELLING and live:
        launcher.cancel(row.id)
        return
    outputs = None if live else _read_outputs(row)
    with sessions.begin() as session:
        current = session.scalar(
            select(Distillation).where(Distillation.seq == row.seq).with_for_update()
        )
        if current is None or current.status in TERMINAL:
            return
        failed_teacher = _copy_events(session, current)
        if current.status == DistillStatus.CANCELLING and status.state is not LaunchState.SUCCEEDED:
            set_status(current, DistillStatus.CANCELLED)
        elif status.state is LaunchState.RUNNING:
            set_status(current, DistillStatus.RUNNING)
        elif status.state is LaunchState.SUCCEEDED:
            assert outputs is not None
            _finish(session, settings, current, outputs)
        elif not live:
            assert outputs is not None
            _keep_traces(session, settings, current, outputs)
            message = job_error_line(status.log_tail) or status.message or "the run ended"
            kind = DistillFailureKind.TEACHER_FAILED if failed_teacher else (
                DistillFailureKind.DISTILL_FAILED
            )  # fmt: skip
            stopped = status.state is LaunchState.STOPPED
            error = {"code": kind.value, "message": message}
            set_status(current, DistillStatus.CANCELLED if stopped else DistillStatus.FAILED,
                       error=error)  # fmt: skip


def _copy_events(session: Session, row: Distillation) -> bool:
    """Copy the run's new events into the row's; True if one says the teacher failed."""
    path = Path(row.output_dir) / DISTILL_EVENTS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    last = session.scalar(
        select(func.max(DistillEvent.number)).where(DistillEvent.distill_id == row.id)
    )
    failed = False
    for line in lines:
        try:
            event = json.loads(line)
            number = int(event["n"])
        except (ValueError, KeyError, TypeError):
            continue  # a line the run was writing as it was read: the next pass has it
        failed = failed or event.get("type") == "teacher_failed"
        if last is not None and number <= last:
            continue
        session.add(DistillEvent(
            id=new_id("devent"), distill_id=row.id, number=number,
            level=str(event.get("level", "info"))[:8], type=str(event.get("type", ""))[:32],
            message=str(event.get("message", "")), data=event.get("data"),
        ))  # fmt: skip
    session.flush()
    return failed


def _register(
    session: Session,
    settings: Settings,
    row: Distillation,
    src: Path,
    info: DatasetInfo | FileInfo,
    *,
    purpose: str,
    filename: str,
) -> File:
    file_id = new_id("file")
    dest = settings.files_dir / row.project_id / f"{file_id}.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    file = File(
        id=file_id, project_id=row.project_id, filename=filename, purpose=purpose,
        bytes=info.bytes, sha256=info.sha256, path=str(dest), format=str(info.format),
        num_records=info.num_records,
    )  # fmt: skip
    session.add(file)
    session.flush()
    return file


def _keep_traces(
    session: Session, settings: Settings, row: Distillation, outputs: _Outputs
) -> None:
    if outputs.traces is None or row.traces_file is not None:
        return
    src = Path(row.output_dir) / DISTILL_TRACES_FILE
    name = f"{row.id}-traces.jsonl"
    file = _register(session, settings, row, src, outputs.traces, purpose=TRACES_PURPOSE,
                     filename=name)  # fmt: skip
    row.traces_file = file.id
    done = outputs.traces.num_records
    if row.counts is None:
        row.counts = {"traces": done}


def _finish(session: Session, settings: Settings, row: Distillation, outputs: _Outputs) -> None:
    _keep_traces(session, settings, row, outputs)
    if outputs.results is None:
        error = {"code": DistillFailureKind.DISTILL_FAILED.value, "message": "no results.json"}
        set_status(row, DistillStatus.FAILED, error=error)
        return
    row.counts = outputs.results.get("counts")
    row.stages = outputs.results.get("stages")
    row.mlflow_run_id = outputs.results.get("mlflow_run_id")
    if outputs.curated is None:
        message = outputs.curated_problem or (
            "curation kept no example: loosen it (min_correct, drop_forced_end, weaker) or "
            "give more questions; every trace is in traces_file"
        )
        kind = DistillFailureKind.DISTILL_FAILED if outputs.curated_problem else (
            DistillFailureKind.NOTHING_KEPT
        )  # fmt: skip
        set_status(row, DistillStatus.FAILED, error={"code": kind.value, "message": message})
        return
    src = Path(row.output_dir) / DISTILL_CURATED_FILE
    file = _register(session, settings, row, src, outputs.curated, purpose="fine-tune",
                     filename=f"{row.id}.jsonl")  # fmt: skip
    row.output_file, row.output_sha256 = file.id, file.sha256
    set_status(row, DistillStatus.SUCCEEDED)


def _submit(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings,
    row: Distillation,
) -> None:  # fmt: skip
    def fail(current: Distillation, message: str) -> None:
        error = {"code": DistillFailureKind.LAUNCH_FAILED.value, "message": message}
        set_status(current, DistillStatus.FAILED, error=error)

    submit_row(
        sessions, launcher, Distillation, row.seq,
        build_spec=lambda: launch_spec(row, settings), fail=fail,
    )  # fmt: skip
