"""SIGTERM as a preemption notice (orchestrator/train/sigterm.py), without a cluster: the handler's first and
second signal and its grace deadline, the step boundary's agreement and leaving, the ledger's classification, the
Ray internals the worker side relies on, and the config keys' bad values (exit 2, nothing started).

The runs themselves (a worker's SIGTERM, the driver's, a rank killed during the checkpoint) are in
tests/cluster/test_sigterm_on_cluster.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from waiting import wait_until

from orchestrator.train.group_events import GroupEvents
from orchestrator.train.progress import Ledger
from orchestrator.train.sigterm import END, GO_ON, RESTART, SigtermNotice, SigtermRestart


@pytest.fixture
def previous_handler():
    """A recording SIGTERM handler in place of pytest's, put back afterwards."""
    calls = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(time.time()))
    yield calls
    signal.signal(signal.SIGTERM, old)


def test_first_sigterm_flags_and_the_second_goes_to_the_previous_handler(previous_handler):
    woke = []
    notice = SigtermNotice(grace_s=0, on_first=lambda: woke.append(1))
    assert notice.install()
    os.kill(os.getpid(), signal.SIGTERM)
    wait_until(lambda: notice.received is not None, 5, "the first SIGTERM flagged")
    assert woke == [1] and previous_handler == []  # the first only flags
    os.kill(os.getpid(), signal.SIGTERM)  # the second: what SIGTERM did before (Ray's handler exits)
    wait_until(lambda: previous_handler, 5, "the second SIGTERM at the previous handler")
    assert notice.received is not None


def test_grace_deadline_sends_the_second_sigterm(previous_handler):
    notice = SigtermNotice(grace_s=0.3)
    assert notice.install()
    t0 = time.time()
    os.kill(os.getpid(), signal.SIGTERM)
    wait_until(lambda: previous_handler, 5, "the grace deadline's SIGTERM at the previous handler")
    assert previous_handler[0] - t0 >= 0.25


def test_wakeup_fd_tells_any_thread_and_is_not_taken_from_another_owner(previous_handler):
    notice = SigtermNotice(grace_s=0)
    assert notice.install() and notice.watch_wakeup_fd()
    try:
        mine = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(mine)
        assert SigtermNotice(grace_s=0).watch_wakeup_fd() is False  # the fd is taken: left to its owner
        assert signal.set_wakeup_fd(mine) == mine
        assert notice.pending() is False
        os.kill(os.getpid(), signal.SIGTERM)
        seen = []
        t = threading.Thread(target=lambda: seen.append(wait_until(notice.pending, 5, "the wakeup fd")))
        t.start()
        t.join()
        assert seen == [True]
    finally:
        signal.set_wakeup_fd(-1)


def test_uninstall_restores_and_only_the_main_thread_installs(previous_handler):
    notice = SigtermNotice(grace_s=0)
    assert notice.install()
    notice.uninstall()
    os.kill(os.getpid(), signal.SIGTERM)
    wait_until(lambda: previous_handler, 5, "the SIGTERM at the previous handler")
    assert notice.received is None
    other = SigtermNotice(grace_s=0)
    result = []
    t = threading.Thread(target=lambda: result.append(other.install()))
    t.start()
    t.join()
    assert result == [False]


class _Session:
    """Two ranks' agreement stood in by fixed peers' values: agree_max folds them in."""

    world_rank, world_size = 0, 2

    def __init__(self, peers: list[int], received: bool = False):
        self.peers, self.calls = peers, []
        self.notice = SigtermNotice(grace_s=0)
        self.notice.received = time.time() if received else None

    def preemption_notice(self):
        return None

    def sigterm_notice(self, grace_s):
        return self.notice

    def agree_max(self, value):
        self.calls.append(value)
        return max([value, *self.peers])


class _Job:
    progress_actor = None
    startup = None


def _group(session, rank=1, on_sigterm=True):
    return GroupEvents(session, _Job(), rank, 2, 0, False, None, on_sigterm=on_sigterm, sigterm_grace_s=5)


def test_every_rank_agrees_on_the_step_of_another_ranks_sigterm():
    session = _Session(peers=[GO_ON])
    group = _group(session)
    assert group.preempted(1) is False and group.stopping == GO_ON
    session.peers = [RESTART]  # a SIGTERM on the other rank
    assert group.preempted(2) is True and group.stopping == RESTART
    with pytest.raises(SigtermRestart, match="checkpoint of step 2 is committed"):
        group.leave(2)
    assert session.calls == [GO_ON, GO_ON, GO_ON]  # two boundaries and the barrier after the commit


def test_own_sigterm_restarts_and_the_drivers_stop_ends():
    group = _group(_Session(peers=[GO_ON], received=True))
    assert group.preempted(3) and group.stopping == RESTART
    session = _Session(peers=[END], received=True)  # the driver's stop outranks a worker's SIGTERM
    group = _group(session)
    assert group.preempted(3) and group.stopping == END
    group.leave(3)  # returns: the run ends here
    assert session.calls == [RESTART, GO_ON]


def test_off_means_no_agreement_collective():
    session = _Session(peers=[RESTART], received=True)
    group = _group(session, on_sigterm=False)
    assert group.preempted(1) is False and session.calls == []


def test_ledger_counts_an_announced_restart_as_a_preemption_and_carries_the_stop():
    ledger = Ledger()
    ledger.begin(0, 2)
    assert ledger.step_done(5) is False
    ledger.preempted(5, "SIGTERM to a worker")
    ledger.begin(5, 2)  # the restart after it
    ledger.step_done(6)
    ledger.begin(4, 2)  # a failure: not announced
    summary = ledger.summary()
    assert summary["goodput/restarts"] == 2 and summary["goodput/preemptions"] == 1
    assert summary["goodput/steps_redone"] == 2
    ledger.request_stop()
    assert ledger.step_done(7) is True


def test_ray_worker_actor_runs_execute_on_its_main_thread():
    """What install_in_ray_worker relies on (Ray 2.60): the Train worker actor has execute(fn, *args), and its
    worker loop owns SIGTERM (a handler raising SystemExit). Fails when a Ray upgrade moves either."""
    import inspect

    import ray._private.worker as ray_worker
    from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

    assert list(inspect.signature(RayTrainWorker.execute).parameters)[:2] == ["self", "fn"]
    assert "set_sigterm_handler" in inspect.getsource(ray_worker.Worker.main_loop)


@pytest.mark.parametrize("override,words", [
    ("checkpoint.sigterm_grace_s=0", ["checkpoint.sigterm_grace_s", "> 0"]),
    ("checkpoint.sigterm_grace_s=-5", ["checkpoint.sigterm_grace_s", "> 0"]),
    ("checkpoint.sigterm_grace_s=.nan", ["checkpoint.sigterm_grace_s"]),
    ("checkpoint.sigterm_grace_s=soon", ["checkpoint.sigterm_grace_s", "soon"]),
    ("checkpoint.on_sigterm=maybe", ["checkpoint.on_sigterm", "maybe", "true/false"]),
])
def test_bad_sigterm_settings_exit_2_and_start_nothing(override, words, tmp_path, monkeypatch, capsys):
    from orchestrator import pretrain

    home, ray_tmp = tmp_path / "home", tmp_path / "ray"
    monkeypatch.setenv("MIXER_HOME", str(home))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        code = pretrain.main([override])
    except SystemExit as e:
        code = e.code
    assert code == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    for word in words:
        assert word in err, err
    assert not home.exists() and not ray_tmp.exists()


def test_end_summary_says_how_many_restarts_were_preemptions():
    from orchestrator.train.driver import figures_lines

    restarts = {"world_sizes": "2 -> 2 -> 2", "goodput/restarts": 2, "goodput/resizes": 0,
                "goodput/steps_redone": 3, "goodput/recovery_s": 20.0}
    (line,) = figures_lines({**restarts, "goodput/preemptions": 1})
    assert line.endswith("3 steps redone, 20.0s recovering, 1 of them preemptions (checkpointed first)")
    (line,) = figures_lines({**restarts, "goodput/preemptions": 0})
    assert line.endswith("20.0s recovering")
