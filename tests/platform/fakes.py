"""An in-memory JobLauncher for unit and API tests: scripted states, recorded calls."""

from __future__ import annotations

import threading

from thinkforge.platform.launcher import LaunchSpec, LaunchState, LaunchStatus


class FakeLauncher:
    def __init__(self) -> None:
        self.submissions: list[LaunchSpec] = []
        self.cancelled: list[str] = []
        self.states: dict[str, LaunchStatus] = {}
        self.fail_submit: Exception | None = None
        # Set ``gate`` to hold submissions until it is set; ``entered`` says one is held.
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def submit(self, spec: LaunchSpec) -> None:
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(timeout=30)
        if self.fail_submit is not None:
            raise self.fail_submit
        with self._lock:
            if spec.submission_id in self.states:
                return
            self.submissions.append(spec)
            self.states[spec.submission_id] = LaunchStatus(LaunchState.PENDING)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self.cancelled.append(job_id)
            if job_id in self.states:
                self.states[job_id] = LaunchStatus(LaunchState.STOPPED)

    def status(self, job_id: str) -> LaunchStatus:
        with self._lock:
            return self.states.get(job_id, LaunchStatus(LaunchState.UNKNOWN))

    def set(self, job_id: str, state: LaunchState, message: str | None = None) -> None:
        with self._lock:
            self.states[job_id] = LaunchStatus(state, message)


class FakeServe:
    """Records the configs it is given; reports every app RUNNING with those args."""

    def __init__(self) -> None:
        self.configs: list[dict] = []
        # Set ``gate`` to hold applies until it is set; ``entered`` says one is held.
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def apply(self, config: dict) -> None:
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(timeout=30)
        self.configs.append(config)

    def statuses(self) -> dict:
        from thinkforge.platform.serving import AppStatus

        if not self.configs:
            return {}
        return {
            app["name"]: AppStatus("RUNNING", "", {}, app["args"])
            for app in self.configs[-1]["applications"]
        }
