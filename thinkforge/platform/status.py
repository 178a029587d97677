"""Every lifecycle's status: an enum with its transitions written down, ``is_terminal()``
and its failure kinds. Fine-tune jobs first (``jobs.set_status`` moves them), then
evaluations (``evals.set_status``), distillations (``distill.set_status``) and deployments (``deployments.set_status``).

::

    validating_files ──► queued ──► running ──► succeeded
          │                │  │        │
          │                │  └────────┼──► succeeded   (Ray finished before we saw it run)
          ▼                ▼           ▼
        failed ◄──── cancelling ◄──────┘   (cancel of a launched job; Ray stops it)
          ▲                │
          └── any non-terminal state may fail; cancelling ends cancelled (or as Ray ended it)

    running ──► pausing ──► paused ──► queued ──► running ...   (pause, then resume)
                   │           │
                   │           └──► cancelled   (nothing runs: cancelled at once)
                   └──► succeeded | failed | cancelling   (the run ended before it paused)

Terminal states (succeeded, failed, cancelled) never change. A job not yet launched
(validating_files, or queued before submission) is cancelled at once. ``pausing``: the
run was asked to checkpoint and stop; ``paused``: it did, and its checkpoint is where a
resume starts (the job is submitted again and Ray Train resumes from its checkpoints).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import TypeVar

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    PAUSING = "pausing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL

    def can_become(self, target: JobStatus) -> bool:
        return target in TRANSITIONS[self]


_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset(
        {JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.QUEUED: frozenset(
        {
            JobStatus.RUNNING,
            JobStatus.CANCELLING,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
        }
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.CANCELLING,
            JobStatus.PAUSING,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
        }
    ),
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.SUCCEEDED, JobStatus.FAILED}),
    JobStatus.PAUSING: frozenset(
        {
            JobStatus.PAUSED,
            JobStatus.CANCELLING,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
        }
    ),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class FailureKind(StrEnum):
    """Why a job failed: the ``error.code`` of a failed job."""

    INVALID_FILE = "invalid_file"
    INVALID_MODEL = "invalid_model"
    LAUNCH_FAILED = "launch_failed"
    TRAINING_FAILED = "training_failed"
    # The job would resume from a checkpoint of another model or global batch, or of an
    # older layout; the entrypoint tags its error line "[checkpoint_incompatible]".
    CHECKPOINT_INCOMPATIBLE = "checkpoint_incompatible"
    LOST = "job_lost"
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    INTERNAL = "internal_error"


class EvalStatus(StrEnum):
    """An evaluation's status.

    ::

        queued ──► running ──► succeeded | failed
           │  │       │
           │  └───────┼──► succeeded | failed   (Ray finished before we saw it run)
           ▼          ▼
        cancelled ◄─ cancelling ──► succeeded | failed   (the run ended before it stopped)

    A run not yet submitted is cancelled at once; a launched one goes through cancelling
    until Ray has stopped it. Terminal states never change.
    """

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _EVAL_TERMINAL

    def can_become(self, target: EvalStatus) -> bool:
        return target in EVAL_TRANSITIONS[self]


_EVAL_TERMINAL = frozenset({EvalStatus.SUCCEEDED, EvalStatus.FAILED, EvalStatus.CANCELLED})

EVAL_TRANSITIONS: dict[EvalStatus, frozenset[EvalStatus]] = {
    EvalStatus.QUEUED: _EVAL_TERMINAL | {EvalStatus.RUNNING, EvalStatus.CANCELLING},
    EvalStatus.RUNNING: _EVAL_TERMINAL | {EvalStatus.CANCELLING},
    EvalStatus.CANCELLING: _EVAL_TERMINAL,
    EvalStatus.SUCCEEDED: frozenset(),
    EvalStatus.FAILED: frozenset(),
    EvalStatus.CANCELLED: frozenset(),
}


class EvalFailureKind(StrEnum):
    """Why an evaluation failed: the ``error.code`` of a failed (or stopped) evaluation."""

    LAUNCH_FAILED = "launch_failed"
    EVAL_FAILED = "eval_failed"


class DistillStatus(StrEnum):
    """A distillation's status: the evaluation's machine (one Ray Job, cancellable).

    ::

        queued ──► running ──► succeeded | failed
           │  │       │
           │  └───────┼──► succeeded | failed   (Ray finished before we saw it run)
           ▼          ▼
        cancelled ◄─ cancelling ──► succeeded | failed   (the run ended before it stopped)

    Succeeded means the curated file exists (``output_file``); a failed run keeps the
    traces it generated as ``traces_file``.
    """

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _DISTILL_TERMINAL

    def can_become(self, target: DistillStatus) -> bool:
        return target in DISTILL_TRANSITIONS[self]


_DISTILL_TERMINAL = frozenset(
    {DistillStatus.SUCCEEDED, DistillStatus.FAILED, DistillStatus.CANCELLED}
)

DISTILL_TRANSITIONS: dict[DistillStatus, frozenset[DistillStatus]] = {
    DistillStatus.QUEUED: _DISTILL_TERMINAL | {DistillStatus.RUNNING, DistillStatus.CANCELLING},
    DistillStatus.RUNNING: _DISTILL_TERMINAL | {DistillStatus.CANCELLING},
    DistillStatus.CANCELLING: _DISTILL_TERMINAL,
    DistillStatus.SUCCEEDED: frozenset(),
    DistillStatus.FAILED: frozenset(),
    DistillStatus.CANCELLED: frozenset(),
}


class DistillFailureKind(StrEnum):
    """Why a distillation failed: the ``error.code`` of a failed one."""

    LAUNCH_FAILED = "launch_failed"
    # A request to the teacher (or the weaker model) failed past its retries.
    TEACHER_FAILED = "teacher_failed"
    # Curation kept nothing: no file to train on (the traces are still kept).
    NOTHING_KEPT = "nothing_kept"
    DISTILL_FAILED = "distill_failed"


class DeploymentStatus(StrEnum):
    """A deployment's status: the API's desired state (pending, updating, deleting) and
    Ray Serve's view of it, copied back by the reconciler (deploying, running, degraded,
    failed).

    ::

        pending ──► deploying ◄──► running            (any live state may become any other
           │            ▲  ▲          │                 live state but pending; a PATCH
           ▼            │  │          ▼                 makes it updating)
        updating ───────┘  └──── degraded | failed
           │
           └──► deleting   (from any state; the row goes once the front door no longer
                            routes to it, so deleting never changes)

    Two failure kinds: ``degraded`` (the new replicas failed; the old version still
    serves) and ``failed`` (nothing serves).
    """

    PENDING = "pending"
    UPDATING = "updating"
    DEPLOYING = "deploying"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED = "failed"
    DELETING = "deleting"

    def is_terminal(self) -> bool:
        return self is DeploymentStatus.DELETING

    def can_become(self, target: DeploymentStatus) -> bool:
        return target in DEPLOYMENT_TRANSITIONS[self]


_LIVE = frozenset(
    {
        DeploymentStatus.UPDATING,
        DeploymentStatus.DEPLOYING,
        DeploymentStatus.RUNNING,
        DeploymentStatus.DEGRADED,
        DeploymentStatus.FAILED,
    }
)

DEPLOYMENT_TRANSITIONS: dict[DeploymentStatus, frozenset[DeploymentStatus]] = {
    **{s: (_LIVE - {s}) | {DeploymentStatus.DELETING} for s in _LIVE},
    DeploymentStatus.PENDING: _LIVE | {DeploymentStatus.DELETING},
    DeploymentStatus.DELETING: frozenset(),
}


Status = TypeVar("Status", JobStatus, EvalStatus, DeploymentStatus, DistillStatus)


def moves(current: Status, target: Status, *, what: str) -> bool:
    """Whether ``current`` becomes ``target`` (every ``set_status`` asks this first). A
    move the machine forbids is logged and ignored, not raised: the reconciler may act on
    a view of the cluster older than the row."""
    if current == target:
        return False
    if not current.can_become(target):
        log.info("%s: ignoring %s -> %s", what, current.value, target.value)
        return False
    return True
