"""Every path-like field of a job goes through here: the training and validation data,
the base model, and any ``config`` key naming a path.

Allowed: the project's uploaded files (by id), files and folders under the allowed
dataset roots (never thinkforge's own folders: uploads, registry downloads, checkpoints,
artifacts), the project's registry references (``models:/NAME/N``, ``models:/NAME@ALIAS``),
``thinkforge/tiny``, and Hugging Face ids when ``allow_hub_models`` is set. A path outside
the roots is refused without a word on whether it exists.

    ref = resolve_dataset(session, settings, project_id="p", ref="file-…", param="training_file")
    model = resolve_model(session, settings, project_id="p", model="models:/sums/3")
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from thinkforge.jobs.config import TINY_MODEL
from thinkforge.platform import ownership
from thinkforge.platform.errors import InvalidRequest, NotFound
from thinkforge.platform.files import get_file
from thinkforge.platform.registry import parse_ref
from thinkforge.platform.settings import Settings

# ``config`` keys that name a path, and where the resolver takes each from instead.
CONFIG_PATHS = {"dataset": "training_file", "model": "model", "validation_dataset": None}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class DatasetRef:
    path: str
    sha256: str  # "" for a file under a root: computed when the job is validated
    format: str  # "auto" for a file under a root


def resolve_dataset(
    session: Session, settings: Settings, *, project_id: str, ref: str, param: str
) -> DatasetRef:
    """A file id of the project, or an absolute path (``file://`` allowed) to a file under
    one of the dataset roots."""
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
    path = allowed_path(settings, ref, param=param)
    if not path.is_file():
        raise InvalidRequest(f"{param} {ref!r} does not exist", param=param, code="file_not_found")
    return DatasetRef(str(path), "", "auto")


def resolve_model(session: Session, settings: Settings, *, project_id: str, model: str) -> str:
    """The job's base model, as the job will be given it."""
    if model == TINY_MODEL:
        return model
    if model.startswith("models:/"):
        try:
            name = parse_ref(model).name
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, param="model") from None
        ownership.require_visible(session, project_id=project_id, name=name)
        return model
    if model.startswith(("/", "file://", ".", "~")):
        return str(allowed_path(settings, model, param="model"))
    if settings.allow_hub_models and _HUB_ID.fullmatch(model) and ".." not in model:
        return model
    hub = ", or a Hugging Face id" if settings.allow_hub_models else ""
    raise InvalidRequest(
        f"model must be {TINY_MODEL}, a registry version of this project (models:/NAME/N or "
        f"models:/NAME@ALIAS), an absolute path under a dataset root{hub}",
        param="model",
    )


def allowed_path(settings: Settings, ref: str, *, param: str) -> Path:
    """``ref`` resolved (symlinks too), if it lies under a dataset root and outside
    thinkforge's own folders; else 400 naming the roots, never saying if it exists."""
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
    """Folders of thinkforge's own that no job field may name by path, whatever the roots:
    other projects' uploads, registry downloads, checkpoints, evaluations, artifacts."""
    data = settings.data_dir
    dirs = [settings.files_dir, settings.models_dir, data / "evals", data / "serve-cache"]
    dirs += [Path(p) for p in (settings.storage_path, settings.mlflow_artifact_root)]
    dirs.append(Path(settings.mlflow_artifact_root.removeprefix("file://")))
    return [d.resolve() for d in dirs if d.is_absolute()]
