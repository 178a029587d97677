"""How the control plane starts, stops and asks after training runs: the JobLauncher Protocol.

The API and the reconciler only speak to this Protocol. ``RayJobLauncher`` (in
``thinkforge.platform.ray_launcher``) submits Ray Jobs; unit tests use an in-memory fake.
Submissions are idempotent on the job id, so asking twice never starts two runs.

A run whose workers are not placed yet is ``PENDING``, with ``waiting`` saying what it
asked for, what is free and who holds the rest. Errors:

    CannotFit     submit: the run asks for more than the whole cluster has
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class LaunchState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"  # the launcher has no record of this job


@dataclass(frozen=True)
class TrainingLaunch:
    """A fine-tune job: the launcher adds where runs keep their state and MLflow."""

    job_id: str
    config: dict[str, Any]  # a resolved SFTConfig, as JSON
    submission: str | None = None  # the Ray submission id when not the job id (a resume)

    @property
    def submission_id(self) -> str:
        return self.submission or self.job_id


@dataclass(frozen=True)
class ModuleLaunch:
    """Any other run (evaluations): ``python -m module *args``, exactly as given."""

    job_id: str
    module: str
    args: tuple[str, ...] = ()
    # Secrets for the run (an evaluation's front-door key): its environment, never its
    # command line, which the Ray dashboard shows.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def submission_id(self) -> str:
        return self.job_id


# Only what the launcher reads; the training workers' resources are in the SFT config.
LaunchSpec = TrainingLaunch | ModuleLaunch


@dataclass(frozen=True)
class LaunchStatus:
    state: LaunchState
    message: str | None = None
    log_tail: str | None = None
    # PENDING for want of resources: {"asked", "free", "total", "held_by"}; the message
    # says the same in words.
    waiting: dict[str, Any] | None = None


class CannotFit(Exception):
    """The run can never be placed on this cluster; ``str(exc)`` says what it asked for
    and what the cluster has."""


class JobLauncher(Protocol):
    def submit(self, spec: LaunchSpec) -> None:
        """Start the run; a second call for the same job id does nothing."""

    def cancel(self, job_id: str) -> None:
        """Ask the run to stop; safe to call for a run that already ended."""

    def status(self, job_id: str) -> LaunchStatus: ...
