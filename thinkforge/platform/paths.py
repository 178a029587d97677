"""Every path-like field of a job goes through one resolver: the training and validation
data (``files.resolve_dataset``), the base model (``resolve_model``), and any ``config``
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

from sqlalchemy.orm import Session

from thinkforge.contract import TINY_MODEL, TINY_MOE_MODEL
from thinkforge.platform import ownership
from thinkforge.platform.errors import InvalidRequest
from thinkforge.platform.files import allowed_path
from thinkforge.platform.registry import parse_ref
from thinkforge.platform.settings import Settings

# ``config`` keys that name a path, and where the resolver takes each from instead.
CONFIG_PATHS = {"dataset": "training_file", "model": "model", "validation_dataset": None}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve_model(session: Session, settings: Settings, *, project_id: str, model: str) -> str:
    """The job's base model, as the job will be given it."""
    if model in (TINY_MODEL, TINY_MOE_MODEL):
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
        f"model must be {TINY_MODEL}, {TINY_MOE_MODEL}, a registry version of this project (models:/NAME/N or "
        f"models:/NAME@ALIAS), an absolute path under a dataset root{hub}",
        param="model",
    )
