"""The entry points' shared plumbing (pipelines/cli.py): progress lines, the logging setup."""

from __future__ import annotations

import logging
import subprocess
import sys

from pipelines.cli import PROGRESS_LOGGER, ConsoleHandler, say, setup_logging


def test_progress_lines_are_the_bare_text_on_the_current_stdout(capsys):
    say("step 3/10 epoch 0 loss 2.3026 lr 1.00e-03 512 img/s ETA 7s")
    say("[resume] from checkpoint_000002: 100% done")  # a % sign is text, not a format
    out, err = capsys.readouterr()
    assert out == "step 3/10 epoch 0 loss 2.3026 lr 1.00e-03 512 img/s ETA 7s\n[resume] from checkpoint_000002: 100% done\n"
    assert err == ""
    # not propagated: a root handler (Ray Train's on a worker, a notebook's) never prints it twice
    assert logging.getLogger(PROGRESS_LOGGER).propagate is False


def test_setup_logging_shows_warnings_bare_on_stderr_once_and_hides_info(capsys):
    setup_logging()
    setup_logging()
    assert sum(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers) == 1
    log = logging.getLogger("orchestrator.some.module")
    log.info("not shown")
    log.warning("MLflow tracking at %s is unreachable", "http://127.0.0.1:1")
    out, err = capsys.readouterr()
    assert out == "" and err == "MLflow tracking at http://127.0.0.1:1 is unreachable\n"


def test_progress_lines_need_no_setup_and_come_before_later_output_in_a_fresh_process():
    """A Ray worker runs no entry point: importing the module is enough, and each line is flushed at once."""
    code = ("import sys\nfrom pipelines.cli import say\nsay('[ray] starting')\nsys.stdout.write('after\\n')\n"
            f"import logging\nassert logging.getLogger({PROGRESS_LOGGER!r}).handlers\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "[ray] starting\nafter\n" and out.stderr == ""


def test_entry_point_maps_each_kind_of_error_to_its_one_line_and_exit_status(capsys):
    from pipelines.cli import CapacityError, CommandError, InputError, entry_point

    def command(error):
        @entry_point
        def main(argv):
            if error:
                raise error
            print(f"done {argv}")
        return main

    assert command(None)(["x"]) == 0 and capsys.readouterr().out == "done ['x']\n"
    for error, code in ((InputError("optim.lr=-1.0 is not accepted"), 2), (CapacityError("cannot fit"), 3),
                        (CommandError("nothing was replayed"), 1)):
        assert command(error)([]) == code
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: {error}\n"


def test_every_bad_input_error_of_the_project_exits_2_and_a_too_small_cluster_3():
    """The one table: each package's errors say their exit status by what they derive from."""
    from cluster.processes import ClusterError
    from orchestrator.config.search_space import SpaceError
    from orchestrator.config.tree import ConfigError
    from orchestrator.eval.sources import CheckpointError
    from orchestrator.evaluate import EvalError
    from orchestrator.report.runs import ReportError
    from orchestrator.train.launch import ClusterTooSmallError, RayAddressError
    from pipelines.storage import DatasetNotFoundError, StorageError, StorageUnreachableError
    from pipelines.write_shards import ShardInputError

    for cls in (ConfigError, SpaceError, RayAddressError, CheckpointError, EvalError, ReportError, StorageError,
                DatasetNotFoundError, StorageUnreachableError, ShardInputError, ClusterError):
        assert cls("x").exit_code == 2, cls
    assert ClusterTooSmallError("x").exit_code == 3
    # what they were before stays true: callers catching ValueError / OSError / RuntimeError still do
    assert isinstance(ConfigError("x"), ValueError) and isinstance(DatasetNotFoundError("x"), FileNotFoundError)
    assert isinstance(ClusterTooSmallError("x"), RuntimeError) and str(StorageError("no bucket")) == "no bucket"


def test_first_line_quotes_an_error_in_one_line():
    from pipelines.cli import first_line

    assert first_line(ValueError("bad zip\n  at offset 12")) == "bad zip"
    assert first_line(ValueError("")) == "" and first_line(ValueError("\nsecond")) == ""
    assert first_line(ValueError("x" * 500), 200) == "x" * 200
