"""Fine-tune job status: an enum with its transitions written down.

::

    validating_files ──► queued ──► running ──► succeeded
          │                │  │        │
          │                │  └────────┼──► succeeded   (Ray finished before we saw it run)
          ▼                ▼           ▼
        failed ◄──── cancelling ◄──────┘   (cancel of a launched job; Ray stops it)
          ▲                │
          └── any non-terminal state may fail; cancelling ends cancelled (or as Ray ended it)

Terminal states (succeeded, failed, cancelled) never change. A job not yet launched
(validating_files, or queued before submission) is cancelled at once.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
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
        {JobStatus.CANCELLING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.SUCCEEDED, JobStatus.FAILED}),
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
    LOST = "job_lost"
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    INTERNAL = "internal_error"
