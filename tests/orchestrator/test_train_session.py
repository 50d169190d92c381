"""The one private Ray use (quieting Ray Train's per-report log line), pinned so that a Ray upgrade that moves
it fails here, loudly, instead of silently flooding the training logs."""

from __future__ import annotations

import logging

from orchestrator.train.session import quiet_per_report_logs


def test_ray_train_per_report_logger_is_still_where_quiet_per_report_logs_looks():
    import ray
    from ray.train.v2._internal.execution import context  # what quiet_per_report_logs relies on (Ray 2.60.0)

    assert context.logger.name == context.__file__, (
        f"Ray {ray.__version__} no longer names its per-report logger after context.py: update "
        "orchestrator/train/session.quiet_per_report_logs"
    )
    previous = context.logger.level
    try:
        context.logger.setLevel(logging.NOTSET)
        quiet_per_report_logs()
        assert not context.logger.isEnabledFor(logging.INFO)
        assert context.logger.isEnabledFor(logging.WARNING)
    finally:
        context.logger.setLevel(previous)
