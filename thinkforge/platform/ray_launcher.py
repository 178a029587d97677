"""RayJobLauncher: fine-tune jobs as Ray Jobs, with submission id = job id."""

from __future__ import annotations

from thinkforge.platform.launcher import LaunchSpec, LaunchState, LaunchStatus
from thinkforge.platform.settings import Settings


class RayJobLauncher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def submit(self, spec: LaunchSpec) -> None:
        raise NotImplementedError("RayJobLauncher.submit")

    def cancel(self, job_id: str) -> None:
        raise NotImplementedError("RayJobLauncher.cancel")

    def status(self, job_id: str) -> LaunchStatus:
        return LaunchStatus(LaunchState.UNKNOWN)
