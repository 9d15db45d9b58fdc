"""Run a function on the ranks of a fresh gloo process group: for tests of data-parallel
code (:mod:`spfa.distributed`) on one CPU machine.

    results = run_on_ranks(fn, 2, *args)   # [fn(*args) on rank 0, on rank 1]

``fn`` must be importable by the child processes (a module-level function); it is
called with the process group initialised, one torch thread per rank, and its
return value is pickled back. A rank that raises fails the call with its
traceback; a run that outlives ``timeout`` (a rank waiting on a collective that
another never reaches) is killed and is an error, never a hang.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_on_ranks", "leave_group_and_exit"]


def leave_group_and_exit() -> None:
    """End a rank that has done its work: destroy the process group, then exit without
    the interpreter's teardown, where gloo's worker threads can abort the process
    (SIGABRT, "terminate called without an active exception"; 4 times in about 40 runs
    here; pytorch/pytorch#179291)."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _entry(rank: int, fn, size: int, folder: str, args: tuple, timeout: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        out = fn(*args)
        with open(Path(folder) / f"rank{rank}.pkl", "wb") as fh:
            pickle.dump(out, fh)
        dist.barrier()  # no rank tears the group down while another still uses it
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group_and_exit()  # the result is safely written


def run_on_ranks(fn, size: int, *args, timeout: float = 120.0) -> list:
    """``[fn(*args) on rank r for r in range(size)]``, each rank a spawned process of one
    gloo group.

    Raises
    ------
    RuntimeError
        If the ranks have not all finished within ``timeout`` seconds (they are killed).
    torch.multiprocessing.ProcessRaisedException
        If a rank raised.
    """
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(
            _entry,
            args=(fn, size, folder, args, timeout),
            nprocs=size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for proc in context.processes:
                    if proc.is_alive():
                        proc.kill()
                raise RuntimeError(f"the ranks did not finish within {timeout:g} s")
        out = []
        for rank in range(size):
            with open(Path(folder) / f"rank{rank}.pkl", "rb") as fh:
                out.append(pickle.load(fh))
        return out
