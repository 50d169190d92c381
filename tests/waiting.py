"""Waiting in tests for something that can be observed, instead of sleeping a fixed time.

Importable from every test module as `from waiting import wait_until`: tests/ is on sys.path, put there by
pytest for tests/conftest.py (the default "prepend" import mode, no __init__.py files).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str | Callable[[], str],
               interval: float = 0.1) -> T:
    """Call `condition` every `interval` seconds until it returns something true, and return that. When it has
    not by `timeout` seconds (checked once more at the deadline), fail naming `what` we waited for (a callable
    gives the text at that moment, e.g. a log's tail)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what() if callable(what) else what}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
