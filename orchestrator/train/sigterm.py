"""SIGTERM as a preemption notice (checkpoint.on_sigterm): checkpoint at the next step boundary, then go.

Kubernetes evictions, spot terminations handled by a cloud agent and `kubectl delete pod` send SIGTERM and wait
the grace period; Ray sees no drain. So a SIGTERM is taken as a notice:

- to a training worker: the process's handler only sets a flag (`SigtermNotice`; the interpreter's wakeup fd
  tells the training thread at once, the handler itself runs when the actor's main thread next runs Python). At
  the next step boundary
  every rank folds its flag into one all_reduce(MAX) (`Session.agree_max`, beside the per-step preemption
  barrier), so all ranks checkpoint the same step; rank 0 waits until Ray Train has committed it, every rank
  waits for rank 0 (a second agree_max), rank 0 tells the progress ledger, and every rank raises
  `SigtermRestart`: Ray Train restarts the group, which resumes from that checkpoint (at most one step redone).
- to the driver (`ray job` entrypoint): the handler wakes a thread that sets a flag in the driver's progress
  ledger; rank 0 reads it from the reply to its per-step `step_done` (never waiting on it), the same
  all_reduce spreads it, and after the committed checkpoint every rank returns: fit() ends and the driver
  exits 143, saying that the next submission with the same run.name resumes.

The first SIGTERM puts the previous handler back (Ray's, which exits the process), so a second SIGTERM exits at
once; so does the grace deadline (checkpoint.sigterm_grace_s after the first), which sends that second SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from pipelines.cli import say

# what a step boundary can agree on (all_reduce MAX: the driver's stop outranks a worker's SIGTERM)
GO_ON, RESTART, END = 0, 1, 2


class SigtermRestart(RuntimeError):
    """Raised by every rank after a SIGTERM's checkpoint is committed: Ray Train restarts the group from it."""


class SigtermNotice:
    """One process's SIGTERM handler: the first sets `received` (the time) and puts the previous handler back;
    a second SIGTERM, or the grace deadline (which sends one), goes to that previous handler."""

    def __init__(self, grace_s: float, on_first: Callable[[], None] | None = None):
        self.grace_s, self.on_first = grace_s, on_first
        self.received: float | None = None
        self._previous = None
        self._installed = False
        self._wakeup: int | None = None

    def install(self) -> bool:
        """Take SIGTERM over; only the main thread can (False elsewhere, and nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return True

    def watch_wakeup_fd(self) -> bool:
        """Also learn of a SIGTERM from the interpreter's wakeup fd, which its C-level handler writes at once from
        any thread, while the Python handler waits until the main thread next runs Python (in a Ray worker: the
        controller's next poll, up to seconds later). Main thread only; not when another wakeup fd is set."""
        if threading.current_thread() is not threading.main_thread():
            return False
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if previous != -1:  # someone else's: leave it theirs
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return False
        self._wakeup = read_fd
        return True

    def pending(self) -> bool:
        """Whether a SIGTERM came (read by any thread: the training loop asks at every step boundary)."""
        if self.received is None and self._wakeup is not None:
            try:
                got = os.read(self._wakeup, 512)
            except BlockingIOError:
                got = b""
            if signal.SIGTERM in got:
                self.received = time.time()  # the Python handler (main thread) follows
        return self.received is not None

    def uninstall(self) -> None:
        if self._installed and self.received is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._restorable())
        self._installed = False

    def _restorable(self):
        """The handler to put back: signal.signal returns None for one installed from C (not restorable)."""
        return self._previous if self._previous is not None else signal.SIG_DFL

    def _handle(self, signum, frame) -> None:
        # Python runs this between bytecodes of the main thread: flag, hand SIGTERM back, arm the deadline
        self.received = time.time()
        signal.signal(signal.SIGTERM, self._restorable())
        if self.grace_s > 0:
            timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()
        if self.on_first is not None:
            self.on_first()


# The worker process's notice: installed on the actor's main thread, read by the training thread.
_worker_notice: SigtermNotice | None = None


def _install_worker_notice(grace_s: float) -> bool:
    global _worker_notice
    if _worker_notice is None:
        notice = SigtermNotice(grace_s)
        if not notice.install():
            return False
        notice.watch_wakeup_fd()
        _worker_notice = notice
    return True


def install_in_ray_worker(grace_s: float) -> SigtermNotice | None:
    """This Ray Train worker's SIGTERM notice, or None when it cannot be installed.

    Checked against Ray 2.60.0: the training function runs in a thread of the worker actor, and only the main
    thread may install a signal handler; there Ray's worker loop has installed one that raises SystemExit (the
    process exits, a failure to Ray Train). The actor's `execute(fn)` method (RayTrainWorker, what Ray's own
    backends use to run set-up on every worker) runs `fn` on the main thread; called on the actor itself, it
    installs our handler there, with Ray's kept as the previous one. No public API does this;
    tests/orchestrator/train/test_sigterm.py fails when a Ray upgrade moves it, and here it only means no notice.
    """
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
        installed = ray.get(actor.execute.remote(_install_worker_notice, grace_s), timeout=60)
    except Exception as e:  # noqa: BLE001 - a missing notice must not stop the training
        say(f"[preemption] SIGTERM handler not installed ({type(e).__name__}: {e}); a SIGTERM ends the worker")
        return None
    return _worker_notice if installed else None


@contextlib.contextmanager
def stop_on_sigterm(ledger, grace_s: float) -> Iterator[SigtermNotice | None]:
    """The driver during fit(): a SIGTERM asks the workers, through the ledger, to checkpoint and end.
    Outside the block (before training starts) SIGTERM does what it did before."""
    woke = threading.Event()
    notice = SigtermNotice(grace_s, on_first=woke.set)
    if ledger is None or not notice.install():
        yield None
        return
    done = False

    def relay() -> None:
        woke.wait()
        if not done:
            say("[preemption] SIGTERM: the workers checkpoint at the next step, then the run stops "
                "(a second SIGTERM stops it now)")
            with contextlib.suppress(Exception):
                ledger.request_stop.remote()

    thread = threading.Thread(target=relay, name="sigterm-relay", daemon=True)
    thread.start()
    try:
        yield notice
    finally:
        done = True
        woke.set()
        notice.uninstall()
        thread.join(timeout=5)
