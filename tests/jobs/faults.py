"""Fault injection from outside the training loop: ``StepCallback``s that tests hand to
``run_training``. Ray ships them to the workers by value (``ship``), so the workers need
not import the tests package."""

from __future__ import annotations

import os
import signal
from pathlib import Path


class KillWorkerOnce:
    """After step ``after_step`` the last rank's process dies as if OOM-killed (no
    exception, no cleanup); the others wait in the next all-reduce until Ray Train restarts
    the group. Once per job: the ``marker`` file outlives the killed attempt."""

    def __init__(self, *, after_step: int, marker: Path) -> None:
        self.after_step = after_step
        self.marker = str(marker)

    def __call__(self, *, step: int, rank: int, world_size: int) -> None:
        if step != self.after_step or rank != world_size - 1 or Path(self.marker).exists():
            return
        Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
        Path(self.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


class RecordSteps:
    """Rank 0 appends each step it finished to ``path``, one a line, across attempts: a
    retry that resumes from the checkpoint of step ``s`` goes on with ``s + 1``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __call__(self, *, step: int, rank: int, world_size: int) -> None:
        if rank == 0:
            with open(self.path, "a") as fh:
                fh.write(f"{step}\n")


def ship() -> None:
    """Pickle this module's callbacks by value, so Ray workers can load them."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class PauseAfter:
    """After step ``after_step``, rank 0 asks the run to pause, as the control plane's
    ``POST .../pause`` does (the pause file in the job's storage folder)."""

    def __init__(self, *, after_step: int, storage: Path, job_id: str) -> None:
        self.after_step = after_step
        self.storage = str(storage)
        self.job_id = job_id

    def __call__(self, *, step: int, rank: int, world_size: int) -> None:
        from thinkforge.jobs.checkpoints import request_pause

        if step == self.after_step and rank == 0:
            request_pause(self.storage, self.job_id)
