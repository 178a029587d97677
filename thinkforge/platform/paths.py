"""Every path-like field of a job goes through one resolver: the training and validation
data (``files.resolve_dataset``), the base model (``resolve_model``: a warm start from a
job checkpoint of the project, ``ftjob-…:ckpt-step-N``, too), and any ``config``
key naming a path (``CONFIG_PATHS``); paths on disk through ``files.allowed_path``.

Allowed: the project's uploaded files (by id), files and folders under the allowed
dataset roots (never thinkforge's own folders: uploads, registry downloads, checkpoints,
artifacts), the project's registry references (``models:/NAME/N``, ``models:/NAME@ALIAS``),
``thinkforge/tiny`` and ``thinkforge/tiny-moe``, and Hugging Face ids when ``allow_hub_models`` is set. A path outside
the roots is refused without a word on whether it exists.

    ref = files.resolve_dataset(session, settings, project_id="p", ref="file-…", param="x")
    model = resolve_model(session, settings, project_id="p", model="models:/sums/3")
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinkforge.contract import TINY_MODEL, TINY_MOE_MODEL
from thinkforge.platform import ownership
from thinkforge.platform.errors import InvalidRequest, NotFound
from thinkforge.platform.files import allowed_path
from thinkforge.platform.models import Checkpoint, Job
from thinkforge.platform.registry import parse_ref
from thinkforge.platform.settings import Settings

# ``config`` keys that name a path, and where the resolver takes each from instead.
CONFIG_PATHS = {"dataset": "training_file", "model": "model", "validation_dataset": None}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# A job checkpoint as a base model (a warm start): "ftjob-…:ckpt-step-200".
CHECKPOINT_REF = re.compile(r"(ftjob-[A-Za-z0-9]+):ckpt-step-([0-9]+)")


def resolve_model(session: Session, settings: Settings, *, project_id: str, model: str) -> str:
    """The job's base model, as the job will be given it."""
    if model in (TINY_MODEL, TINY_MOE_MODEL):
        return model
    if warm := CHECKPOINT_REF.fullmatch(model):
        return checkpoint_path(session, project_id=project_id, job_id=warm[1], step=int(warm[2]))
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
    hub += ", a job checkpoint (ftjob-ID:ckpt-step-N)"
    raise InvalidRequest(
        f"model must be {TINY_MODEL}, {TINY_MOE_MODEL}, a registry version of this project (models:/NAME/N or "
        f"models:/NAME@ALIAS), an absolute path under a dataset root{hub}",
        param="model",
    )


def checkpoint_path(session: Session, *, project_id: str, job_id: str, step: int) -> str:
    """Where a job checkpoint of the project is (the Hugging Face model it holds); 404 for
    another project's job or a step with no checkpoint."""
    path = session.scalar(
        select(Checkpoint.path)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.id == job_id, Job.project_id == project_id, Checkpoint.step == step)
    )
    if path is None:
        raise NotFound(
            f"no checkpoint at step {step} of a job {job_id!r} in this project: list them with "
            f"GET /v1/fine_tuning/jobs/{job_id}/checkpoints",
            param="model",
        )
    return str(path)
