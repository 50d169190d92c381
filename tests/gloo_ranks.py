"""Ending a rank of a gloo group that a test spawned (torch.multiprocessing.spawn), once its results are on disk.

Importable from every test module as `from gloo_ranks import leave_group` (tests/ is on sys.path, see
tests/waiting.py).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def leave_group(dist) -> NoReturn:
    """A barrier (every rank is done with the group), then this process ends at once.

    Tearing gloo down (destroy_process_group, then the interpreter's exit) aborted one rank in a full-suite run
    ("terminate called without an active exception", SIGABRT) after every rank had finished and written its
    results, failing the test. Nothing after the barrier is under test, so the ranks leave without the teardown;
    spawn's parent sees exit status 0. Results must be in files that are closed, not in a multiprocessing queue
    (its feeder thread would not flush).
    """
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
