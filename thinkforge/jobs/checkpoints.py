"""Checkpoint layout under the Ray Train storage path, readable without torch or Ray.

A job's checkpoints live at ``{storage_path}/{job_id}/checkpoint_{step:08d}/``; each is
a Hugging Face model directory (config, safetensors, tokenizer) plus the trainer state
(``trainer_state.pt``: optimizer, scheduler, step, RNG) and ``thinkforge_checkpoint.json``
(step, epoch, metrics, and the size of every other file, so a reader can tell a fully
copied checkpoint from one Ray Train is still uploading).
The control plane lists them to turn checkpoints into rows:

    latest = latest_checkpoint(settings.storage_path, job_id)   # CheckpointInfo | None
    latest.step, latest.path
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "STATE_FILE",
    "TRAINER_STATE_FILE",
    "CheckpointInfo",
    "checkpoint_dir_name",
    "latest_checkpoint",
    "list_checkpoints",
    "model_files",
]

STATE_FILE = "thinkforge_checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.pt"
_PREFIX = "checkpoint_"


def checkpoint_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    epoch: float
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def list_checkpoints(storage_path: str | Path, job_id: str) -> list[CheckpointInfo]:
    """Complete checkpoints of a job (local storage only), oldest step first."""
    root = Path(storage_path) / job_id
    found = []
    for state in root.glob(f"{_PREFIX}*/{STATE_FILE}"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue  # being written or damaged: not a usable checkpoint
        if not _complete(state.parent, data.get("files", {})):
            continue
        found.append(
            CheckpointInfo(
                step=int(data["step"]),
                epoch=float(data.get("epoch", 0.0)),
                path=state.parent,
                metrics=dict(data.get("metrics", {})),
            )
        )
    return sorted(found, key=lambda c: c.step)


def _complete(directory: Path, files: dict[str, int]) -> bool:
    for rel, size in files.items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def latest_checkpoint(storage_path: str | Path, job_id: str) -> CheckpointInfo | None:
    found = list_checkpoints(storage_path, job_id)
    return found[-1] if found else None


def model_files(directory: str | Path) -> list[Path]:
    """The files of the Hugging Face model in a checkpoint (no trainer state), sorted."""
    root = Path(directory)
    skip = {STATE_FILE, TRAINER_STATE_FILE}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip)
