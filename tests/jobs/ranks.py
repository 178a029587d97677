"""Spawn a few CPU ranks over gloo, without Ray, for the sharded-training tests.

    spawn_ranks(_worker, 2, out_dir)  # _worker(rank, world, out_dir) runs in each rank

Each rank joins a gloo process group (``MASTER_ADDR``/``MASTER_PORT`` set here), runs the
worker, and destroys the group. A rank whose worker returned then leaves with
``os._exit(0)``: gloo's threads outlive ``destroy_process_group``, and now and then the
interpreter's exit aborted a rank that had finished and saved its results
(``terminate called without an active exception``, SIGABRT, seen in CI on
``test_moe``). A worker that raises exits the usual way, so its traceback reaches the
test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tests.conftest import free_port

__all__ = ["spawn_ranks"]


def spawn_ranks(worker: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned processes; raises the first
    rank's error. ``worker`` must be a module-level function (it is pickled)."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _rank_main,
        args=(worker, world, free_port(), args),
        nprocs=world,
        start_method="spawn",
    )


def _rank_main(
    rank: int, worker: Callable[..., None], world: int, port: int, args: tuple[Any, ...]
) -> None:
    import sys

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
