"""Uploaded datasets: stored under the data dir, validated record by record before they count.

A dataset is JSONL (errors name the line and field), parquet or a ``datasets.save_to_disk``
folder (errors name the row and column); the rules per record are the job's own
(``jobs.config.parse_record``). Uploads are JSONL or parquet; a folder is named by path.

info = validate_dataset(path)                 # raises InvalidFile naming line/row and field
staged = stage_upload(settings, project_id=..., filename=..., purpose=..., stream=fh)
row = record_upload(session, staged)          # in a short transaction
ref = resolve_dataset(session, settings, project_id=..., ref="file-…" or "/data/x.jsonl", param=...)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from thinkforge.jobs.config import (
    DatasetFormat,
    DatasetKind,
    RecordError,
    check_row,
    dataset_kind,
    dataset_sha256,
    detect_format,
    is_saved_dataset,
    iter_pool_rows,
    iter_table_rows,
    parse_record,
    question_of,
)
from thinkforge.platform.errors import (
    Conflict,
    InvalidFile,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from thinkforge.platform.models import Distillation, Evaluation, File, Job, new_id
from thinkforge.platform.pagination import page
from thinkforge.platform.settings import Settings
from thinkforge.platform.status import DistillStatus, EvalStatus, JobStatus

# fine-tune: training data; distill: a question pool for POST /v1/datasets/distill.
PURPOSES = ("fine-tune", "distill")
QUESTIONS_FORMAT = "questions"  # a distill file's format: question + reference answer
UPLOAD_SUFFIXES = {".jsonl": DatasetKind.JSONL, ".parquet": DatasetKind.PARQUET}
MAX_REPORTED_ERRORS = 10
CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetInfo:
    format: DatasetFormat
    num_records: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class FileInfo:
    """A file that is not training data: a question pool, a distillation's traces."""

    format: str
    num_records: int
    sha256: str
    bytes: int


def validate_dataset(path: Path, fmt: DatasetFormat = DatasetFormat.AUTO) -> DatasetInfo:
    """Check every record of a dataset; all records must share one accepted format."""
    kind = dataset_kind(path)
    if kind is DatasetKind.JSONL:
        return _validate_jsonl(path, fmt)
    return _validate_table(path, kind, fmt)


def _validate_jsonl(path: Path, fmt: DatasetFormat) -> DatasetInfo:
    errors: list[str] = []
    first_field: str | None = None
    seen: DatasetFormat | None = None if fmt is DatasetFormat.AUTO else fmt
    count = 0
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            digest.update(raw)
            if not raw.strip():
                continue
            problem, field, detected = _check_line(raw, seen)
            if problem is None:
                count += 1
                seen = seen or detected
                continue
            first_field = first_field or field
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(f"line {lineno}: {problem}")
    _raise_errors(errors, first_field, "fix these lines")
    if count == 0 or seen is None:
        raise InvalidFile("the file has no records: upload one JSON object per line", param="file")
    return DatasetInfo(
        format=seen, num_records=count, sha256=digest.hexdigest(), bytes=path.stat().st_size
    )


def _validate_table(path: Path, kind: DatasetKind, fmt: DatasetFormat) -> DatasetInfo:
    errors: list[str] = []
    first_field: str | None = None
    seen: DatasetFormat | None = None if fmt is DatasetFormat.AUTO else fmt
    count = 0
    try:
        for number, row in iter_table_rows(path):
            try:
                if seen is None:
                    seen = detect_format(row)
                check_row(number, row, seen)
                count += 1
            except RecordError as exc:
                first_field = first_field or exc.field
                if len(errors) < MAX_REPORTED_ERRORS:
                    text = str(exc)
                    errors.append(text if text.startswith("row ") else f"row {number}: {text}")
    except RecordError as exc:
        errors.append(str(exc))
    _raise_errors(errors, first_field, "fix these rows")
    if count == 0 or seen is None:
        raise InvalidFile("the table has no rows", param="file")
    size = (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )
    return DatasetInfo(format=seen, num_records=count, sha256=dataset_sha256(path), bytes=size)


def validate_questions(path: Path) -> FileInfo:
    """Check a distillation question pool (JSONL or parquet): every row has a question and
    a reference answer (``answer`` or ``solution``); errors name the line or row."""
    errors: list[str] = []
    first_field: str | None = None
    count = 0
    try:
        for where, row in iter_pool_rows(path):
            try:
                question_of(row)
                count += 1
            except RecordError as exc:
                first_field = first_field or exc.field
                if len(errors) < MAX_REPORTED_ERRORS:
                    field = f"field '{exc.field}': " if exc.field else ""
                    errors.append(f"{where}: {field}{exc}")
    except (RecordError, UnicodeDecodeError) as exc:
        errors.append(str(exc))
    if errors:
        more = "" if len(errors) < MAX_REPORTED_ERRORS else " (further errors not shown)"
        raise InvalidFile(
            "invalid question file; fix these rows and upload again: " + "; ".join(errors) + more,
            param=first_field or "file",
        )
    if count == 0:
        raise InvalidFile("the file has no questions", param="file")
    return FileInfo(format=QUESTIONS_FORMAT, num_records=count, sha256=dataset_sha256(path),
                       bytes=path.stat().st_size)  # fmt: skip


def _raise_errors(errors: list[str], first_field: str | None, fix: str) -> None:
    if not errors:
        return
    more = "" if len(errors) < MAX_REPORTED_ERRORS else " (further errors not shown)"
    raise InvalidFile(
        f"invalid training data; {fix} and upload again: " + "; ".join(errors) + more,
        param=first_field or "file",
    )


def _check_line(
    raw: bytes, expected: DatasetFormat | None
) -> tuple[str | None, str | None, DatasetFormat | None]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text", None, None
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})", None, None
    try:
        detected = _detect(obj) if expected is None else expected
        parse_record(obj, detected)
    except RecordError as exc:
        where = f"field '{exc.field}': " if exc.field else ""
        return f"{where}{exc}", exc.field, None
    return None, None, detected


def _detect(obj: object) -> DatasetFormat:
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, not {type(obj).__name__}")
    return detect_format(obj)


@dataclass
class StagedUpload:
    """An upload copied to disk and validated, not yet a row (``record_upload``); ``discard``
    removes the copy if it never becomes one."""

    project_id: str
    filename: str
    purpose: str
    path: Path
    info: DatasetInfo | FileInfo
    kind: DatasetKind = DatasetKind.JSONL

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def stage_upload(
    settings: Settings, *, project_id: str, filename: str, purpose: str, stream: BinaryIO
) -> StagedUpload:
    """Copy and validate an upload, with no database transaction open: validating a large
    file takes seconds, and on SQLite a write transaction holds every other request."""
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    expected = UPLOAD_SUFFIXES.get(Path(filename).suffix.lower())
    if expected is None:
        raise InvalidRequest(
            "upload a JSON Lines file ending in .jsonl or a parquet file ending in .parquet",
            param="file",
        )
    folder = settings.files_dir / project_id
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _copy_limited(stream, out, settings.max_upload_bytes)
        if dataset_kind(tmp) is not expected:
            raise InvalidFile(
                f"{filename!r} is not a {expected.value} file: its content does not match its name",
                param="file",
            )
        info = validate_questions(tmp) if purpose == "distill" else validate_dataset(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StagedUpload(project_id, Path(filename).name[:512], purpose, tmp, info, expected)


def record_upload(session: Session, staged: StagedUpload) -> File:
    """The row for a staged upload, its file moved into place (a short transaction)."""
    file_id = new_id("file")
    suffix = "parquet" if staged.kind is DatasetKind.PARQUET else "jsonl"
    dest = staged.path.parent / f"{file_id}.{suffix}"
    row = File(
        id=file_id,
        project_id=staged.project_id,
        filename=staged.filename,
        purpose=staged.purpose,
        bytes=staged.info.bytes,
        sha256=staged.info.sha256,
        path=str(dest),
        format=str(staged.info.format),
        num_records=staged.info.num_records,
    )
    session.add(row)
    session.flush()
    staged.path.rename(dest)
    return row


def _copy_limited(src: BinaryIO, dst: BinaryIO, limit: int) -> None:
    total = 0
    while chunk := src.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the file is larger than the {limit}-byte upload limit")
        dst.write(chunk)


def get_file(session: Session, *, project_id: str, file_id: str) -> File:
    row = session.scalar(select(File).where(File.id == file_id, File.project_id == project_id))
    if row is None:
        raise NotFound(
            f"no file {file_id!r} in this project: list files with GET /v1/files", param="file_id"
        )
    return row


def list_files(
    session: Session, *, project_id: str, after: str | None, limit: int
) -> tuple[list[File], bool]:
    stmt = select(File).where(File.project_id == project_id)
    return page(session, stmt, File, after=after, limit=limit)


@dataclass(frozen=True)
class DatasetRef:
    path: str
    sha256: str  # "" for a dataset path: hashed when the run is validated
    format: str  # "auto" for a dataset path


def resolve_dataset(
    session: Session,
    settings: Settings,
    *,
    project_id: str,
    ref: str,
    param: str,
    folders: bool = False,
) -> DatasetRef:
    """Where a run reads a dataset given as a file id of the project, or as an absolute
    path (``file://`` allowed) to a file under one of the dataset roots (``allowed_path``);
    with ``folders``, a ``datasets.save_to_disk`` folder there too (training data)."""
    if ref.startswith("file-"):
        try:
            row = get_file(session, project_id=project_id, file_id=ref)
        except NotFound:
            raise InvalidRequest(
                f"{param} {ref!r} is not a file of this project: upload it with POST /v1/files",
                param=param,
                code="file_not_found",
            ) from None
        return DatasetRef(row.path, row.sha256, row.format)
    resolved = allowed_path(settings, ref, param=param)
    if folders and resolved.is_dir():
        if not is_saved_dataset(resolved):
            raise InvalidRequest(
                f"{param} {ref!r} is a folder but not one written by datasets' save_to_disk "
                "(no state.json or dataset_dict.json)",
                param=param,
            )
        return DatasetRef(str(resolved), "", "auto")
    if not resolved.is_file():
        raise InvalidRequest(f"{param} {ref!r} does not exist", param=param, code="file_not_found")
    return DatasetRef(str(resolved), "", "auto")


def allowed_path(settings: Settings, ref: str, *, param: str) -> Path:
    """``ref`` resolved (symlinks too), if it lies under a dataset root and outside
    thinkforge's own folders; else 400 naming the roots, never saying if it exists. Every
    path a job or an evaluation names goes through here (see ``platform/paths.py``)."""
    path = Path(ref.removeprefix("file://"))
    if not path.is_absolute():
        raise InvalidRequest(f"{param} must be a file id or an absolute path", param=param)
    resolved = path.resolve()
    inside = any(resolved.is_relative_to(root.resolve()) for root in settings.dataset_roots)
    private = any(resolved.is_relative_to(p) for p in _private_dirs(settings))
    if not inside or private:
        roots = ", ".join(str(r) for r in settings.dataset_roots)
        raise InvalidRequest(
            f"{param} {ref!r} is outside the allowed dataset roots ({roots})", param=param
        )
    return resolved


def _private_dirs(settings: Settings) -> list[Path]:
    """Folders of thinkforge's own that no run may name by path, whatever the roots: other
    projects' uploads, registry downloads, checkpoints, evaluations, artifacts."""
    data = settings.data_dir
    dirs = [settings.files_dir, settings.models_dir, data / "evals", data / "serve-cache"]
    dirs += [
        Path(settings.storage_path),
        Path(settings.mlflow_artifact_root.removeprefix("file://")),
    ]
    return [d.resolve() for d in dirs if d.is_absolute()]


def delete_file(session: Session, *, project_id: str, file_id: str) -> None:
    """Delete a file; 409 while a live job trains or validates on it or a live
    evaluation reads it."""
    row = get_file(session, project_id=project_id, file_id=file_id)
    active = [s.value for s in JobStatus if not s.is_terminal()]
    job = session.scalar(
        select(Job.id)
        .where(
            or_(Job.training_file == file_id, Job.validation_file == file_id),
            Job.status.in_(active),
        )
        .limit(1)
    )
    evaluation = session.scalar(
        select(Evaluation.id)
        .where(
            Evaluation.project_id == project_id,
            Evaluation.config["dataset"].as_string() == row.path,
            Evaluation.status.in_([s.value for s in EvalStatus if not s.is_terminal()]),
        )
        .limit(1)
    )
    distillation = session.scalar(
        select(Distillation.id)
        .where(
            Distillation.question_file == file_id,
            Distillation.status.in_([s.value for s in DistillStatus if not s.is_terminal()]),
        )
        .limit(1)
    )
    users = (("job", job), ("evaluation", evaluation), ("distillation", distillation))
    for kind, user in users:
        if user is not None:
            raise Conflict(
                f"file {file_id!r} is in use by {kind} {user}; cancel it or wait", param="file_id"
            )
    path = Path(row.path)
    session.delete(row)
    session.flush()
    path.unlink(missing_ok=True)
