"""Checkpoint layout under the Ray Train storage path, readable without torch or Ray.

A job's checkpoints live at ``{storage_path}/{job_id}/checkpoint_{step:08d}/``; each is
a Hugging Face model directory (config, safetensors, sharded with an index for large models,
tokenizer) plus the sharded training state under ``dcp/`` (``torch.distributed.checkpoint``:
model, optimizer, scheduler, step, RNG; one ``__{rank}_0.distcp`` per rank, see
``thinkforge.jobs.checkpointing``) and ``thinkforge_checkpoint.json`` (step, epoch, metrics,
layout, and the size of every other file of every rank, so a reader can tell a fully copied
checkpoint from one Ray Train is still uploading).
The control plane lists them to turn checkpoints into rows. The storage path is a local
directory or any URI pyarrow opens (``s3://``, ``gs://``, ``abfs://``: what Ray Train
writes to), listed through ``pyarrow.fs``:

    latest = latest_checkpoint(settings.storage_path, job_id)   # CheckpointInfo | None
    latest.step, latest.path                                    # path: a directory or URI

Pausing a job goes through the same store: the control plane writes ``PAUSE_FILE`` in the
job's folder (``request_pause``); the training loop's rank 0 looks for it
(``pause_requested``), every rank checkpoints and the run ends early; a resume removes it
(``clear_pause``) before the job is submitted again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DCP_DIR",
    "PAUSE_FILE",
    "STATE_FILE",
    "TRAINER_STATE_FILE",
    "CheckpointInfo",
    "checkpoint_dir_name",
    "clear_pause",
    "latest_checkpoint",
    "list_checkpoints",
    "model_files",
    "pause_requested",
    "request_pause",
]

STATE_FILE = "thinkforge_checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.pt"  # the full-state layout before DCP; never written now
DCP_DIR = "dcp"
_PREFIX = "checkpoint_"
PAUSE_FILE = "pause_requested.json"


def checkpoint_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    epoch: float
    path: str  # a local directory, or a URI under a remote storage path
    metrics: dict[str, Any] = field(default_factory=dict)


def list_checkpoints(
    storage_path: str | Path, job_id: str, *, filesystem: Any = None
) -> list[CheckpointInfo]:
    """Complete checkpoints of a job, oldest step first. ``filesystem`` (a
    ``pyarrow.fs.FileSystem``) is taken for a path on it instead of opening a URI."""
    import pyarrow.fs as pafs

    filesystem, root, shown = _store(storage_path, filesystem)
    job_root = f"{root}/{job_id}"
    selector = pafs.FileSelector(job_root, allow_not_found=True, recursive=True)
    sizes = {
        i.path: i.size for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File
    }
    found = []
    for path in sizes:
        directory, _, name = path.rpartition("/")
        parent, _, dirname = directory.rpartition("/")
        if name != STATE_FILE or parent != job_root or not dirname.startswith(_PREFIX):
            continue
        try:
            with filesystem.open_input_stream(path) as stream:
                data = json.loads(stream.read())
        except (OSError, ValueError):
            continue  # being written or damaged: not a usable checkpoint
        present = {rel: sizes.get(f"{directory}/{rel}") for rel in data.get("files", {})}
        info = _info(shown + directory[len(root) :], data, present)
        if info is not None:
            found.append(info)
    return sorted(found, key=lambda c: c.step)


def _store(storage_path: str | Path, filesystem: Any = None) -> tuple[Any, str, str]:
    """(filesystem, root path on it, the root as rows show it) of a storage path."""
    import pyarrow.fs as pafs

    text = str(storage_path)
    if filesystem is not None:
        root = shown = text
    elif "://" in text:
        filesystem, root = pafs.FileSystem.from_uri(text)
        shown = text.split("?", 1)[0]  # what the rows show: the URI, no options
    else:
        filesystem, root, shown = (
            pafs.LocalFileSystem(),
            str(Path(text).absolute()),
            str(Path(text)),
        )
    return filesystem, root.rstrip("/"), shown.rstrip("/")


def request_pause(storage_path: str | Path, job_id: str) -> None:
    """Ask the job's run to checkpoint and stop after its current step."""
    filesystem, root, _ = _store(storage_path)
    filesystem.create_dir(f"{root}/{job_id}", recursive=True)
    with filesystem.open_output_stream(f"{root}/{job_id}/{PAUSE_FILE}") as out:
        out.write(json.dumps({"job_id": job_id}).encode())


def pause_requested(storage_path: str | Path, job_id: str) -> bool:
    import pyarrow.fs as pafs

    filesystem, root, _ = _store(storage_path)
    info = filesystem.get_file_info(f"{root}/{job_id}/{PAUSE_FILE}")
    return bool(info.type == pafs.FileType.File)


def clear_pause(storage_path: str | Path, job_id: str) -> None:
    if pause_requested(storage_path, job_id):
        filesystem, root, _ = _store(storage_path)
        filesystem.delete_file(f"{root}/{job_id}/{PAUSE_FILE}")


def _info(
    location: str, data: dict[str, Any], sizes: dict[str, int | None]
) -> CheckpointInfo | None:
    """The checkpoint, if every file its state lists is there at its full size."""
    if any(sizes.get(rel) != size for rel, size in data.get("files", {}).items()):
        return None  # Ray Train is still copying it, or it is damaged
    return CheckpointInfo(
        step=int(data["step"]),
        epoch=float(data.get("epoch", 0.0)),
        path=location,
        metrics=dict(data.get("metrics", {})),
    )


def latest_checkpoint(storage_path: str | Path, job_id: str) -> CheckpointInfo | None:
    found = list_checkpoints(storage_path, job_id)
    return found[-1] if found else None


def model_files(directory: str | Path) -> list[Path]:
    """The files of the Hugging Face model in a checkpoint (no training state), sorted."""
    root = Path(directory)
    skip = {STATE_FILE, TRAINER_STATE_FILE}
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name not in skip and p.relative_to(root).parts[0] != DCP_DIR
    )
