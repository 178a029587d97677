"""/v1/files: upload, list, get and delete training datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from thinkforge.platform import files
from thinkforge.platform.deps import (
    AfterQuery,
    CtxDep,
    IdempotencyKeyDep,
    KeyFirstRoute,
    LimitQuery,
    PrincipalDep,
)
from thinkforge.platform.errors import InvalidRequest
from thinkforge.platform.idempotency import fingerprint, run_idempotent
from thinkforge.platform.schemas import FileDeleted, FileObject, ListResponse
from thinkforge.platform.views import file_view

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=KeyFirstRoute)


@router.post("", response_model=FileObject)
def upload_file(
    ctx: CtxDep,
    principal: PrincipalDep,
    file: UploadFile,
    purpose: Annotated[str, Form(max_length=64)],
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    filename = file.filename or ""
    if not filename:
        raise InvalidRequest("the upload has no file name", param="file")

    staged = files.stage_upload(
        ctx.settings, project_id=principal.project_id, filename=filename, purpose=purpose,
        stream=file.file,
    )  # fmt: skip

    def handler(session):  # type: ignore[no-untyped-def]
        return 200, file_view(files.record_upload(session, staged)).model_dump(mode="json")

    try:
        status, body = run_idempotent(
            ctx.sessions,
            project_id=principal.project_id,
            key=idempotency_key,
            method="POST",
            path="/v1/files",
            request_fingerprint=fingerprint(staged.info.sha256, purpose, filename),
            ttl_s=ctx.settings.idempotency_ttl_s,
            handler=handler,
        )
    finally:
        staged.discard()  # moved into place unless the request failed or was a replay
    return JSONResponse(body, status_code=status)


@router.get("", response_model=ListResponse[FileObject])
def list_files(
    ctx: CtxDep, principal: PrincipalDep, after: AfterQuery = None, limit: LimitQuery = 20
) -> ListResponse[FileObject]:
    with ctx.sessions() as session:
        rows, more = files.list_files(
            session, project_id=principal.project_id, after=after, limit=limit
        )
        data = [file_view(r) for r in rows]
    return ListResponse.of(data, more)


@router.get("/{file_id}", response_model=FileObject)
def get_file(ctx: CtxDep, principal: PrincipalDep, file_id: str) -> FileObject:
    with ctx.sessions() as session:
        return file_view(files.get_file(session, project_id=principal.project_id, file_id=file_id))


@router.get("/{file_id}/content")
def file_content(ctx: CtxDep, principal: PrincipalDep, file_id: str) -> FileResponse:
    """The file's bytes (OpenAI's ``files.content``): an upload, or a job's result CSV."""
    with ctx.sessions() as session:
        row = files.get_file(session, project_id=principal.project_id, file_id=file_id)
        path, name = row.path, row.filename
    media = "text/csv" if path.endswith(".csv") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=name)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(ctx: CtxDep, principal: PrincipalDep, file_id: str) -> FileDeleted:
    with ctx.sessions.begin() as session:
        files.delete_file(session, project_id=principal.project_id, file_id=file_id)
    return FileDeleted(id=file_id)
