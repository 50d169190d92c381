"""What every command-line entry point shares: how it logs, how its progress lines reach the user, how it exits.

    from pipelines.cli import InputError, entry_point, say

    @entry_point                                      # logging set up; a CommandError -> one line + exit code
    def main(argv: list[str] | None = None) -> int:
        args = parse_args(argv)
        if args.batch_size < 1:
            raise InputError(f"--batch-size={args.batch_size} is not accepted; expected an integer >= 1")
        say(f"[plan] {name}: {steps} steps")          # a progress line on stdout, in any process
        logging.getLogger(__name__).warning("...")    # a notice on stderr
        print(summary)                                # the command's result
        return 0

Which route a line takes (one rule for the whole project):
- the command's result (a summary, a table, a dry-run plan, written files, JSON): print() to stdout;
- a progress line while the command works (`step N/M ...`, `eval step ...`, `[resume] ...`, `[tune] ...`):
  `say()`, i.e. the "mixer.progress" logger, written as the bare message to stdout and flushed at once;
- a notice that something is missing or was worked around: the module's logger, WARNING, on stderr;
- the reason the command stops: raise a CommandError; `entry_point` prints `error: <message>` on stderr.

Exit status, the one table: 0 done; 2 InputError (a bad flag, config value, checkpoint, dataset, storage
target or cluster state, found before anything is started: ConfigError, CheckpointError, StorageError, ...
derive from it); 3 CapacityError (the Ray cluster cannot fit the run); 1 any other CommandError, and a failed
run. Any other exception keeps its traceback. argparse's own usage errors exit 2 as argparse does.

- setup_logging(): one handler on the root logger that writes WARNING and above as the bare message to the
  current sys.stderr: what Python prints for them when nothing is set up (its "last resort" handler), so the
  text the user reads is the same, now in one place for every entry point. Idempotent.
- first_line(exc): the first line of an exception's message, for quoting it in a one-line message.
- The progress logger needs no setup: its handler is installed when this module is imported, so rank 0 of a
  Ray Train worker group (where no entry point ran) writes its lines the same way, and Ray forwards them to the
  driver. Their shapes are the ones orchestrator/train/startup.py exempts from Ray's log deduplication.
  It does not propagate: a root handler (Ray Train's on a worker, a notebook's) never prints a line twice.

Lives in pipelines, the lowest package every entry point imports (orchestrator's commands, pipelines.write_shards,
cluster.local_cluster). `python -m model` is a smoke demo in a package that imports nothing of ours; it prints
and exits through SystemExit itself.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

PROGRESS_LOGGER = "mixer.progress"


class ConsoleHandler(logging.Handler):
    """The bare message to sys.stdout or sys.stderr as they are at each record (pytest's capture, a redirect),
    flushed at once."""

    def __init__(self, stream_name: str, level: int):
        super().__init__(level)
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _progress_logger() -> logging.Logger:
    log = logging.getLogger(PROGRESS_LOGGER)
    if not any(isinstance(h, ConsoleHandler) for h in log.handlers):
        log.addHandler(ConsoleHandler("stdout", logging.INFO))
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


_progress = _progress_logger()


def say(message: str) -> None:
    """Write one progress line (it may hold several lines) to stdout."""
    _progress.info(message)


def setup_logging() -> None:
    """Warnings and errors of every logger on stderr, as the bare message; once per process."""
    root = logging.getLogger()
    if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
        root.addHandler(ConsoleHandler("stderr", logging.WARNING))


class CommandError(Exception):
    """The command cannot go on: `error: <message>` on stderr, no traceback, exit status `exit_code`."""

    exit_code = 1


class InputError(CommandError):
    """A bad flag, config value, checkpoint, dataset, storage target or cluster state, before anything starts."""

    exit_code = 2


class CapacityError(CommandError):
    """The Ray cluster cannot fit what was asked."""

    exit_code = 3


def report_error(error: BaseException | str) -> int:
    """Print `error: <error>` on stderr; return its exit status (a CommandError's, else 1)."""
    print(f"error: {error}", file=sys.stderr)
    return getattr(error, "exit_code", 1)


def entry_point(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap an entry point's main(argv): logging set up first; a CommandError ends it as report_error says."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv) or 0
        except CommandError as e:
            return report_error(e)

    return run


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message ("" when it has none), at most `limit` characters: how an
    error is quoted inside a one-line message."""
    return (str(exc).splitlines() or [""])[0][:limit]
