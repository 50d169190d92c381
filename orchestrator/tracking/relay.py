"""Rank 0's tracking goes through a Ray actor owned by the driver, so a dead worker loses nothing buffered.

    relay = start_relay(tracker)            # driver, after ray.init: an actor holding a RunTracker of the run
    Job(..., tracker_actor=relay.name)      # rank 0: RelayedTracker(name).log_metrics(...) (does not wait)
    collect_relay(tracker, relay)           # driver, after fit: the actor's leftovers move to `tracker`

The actor is not detached: it lives as long as the driver that owns it, whatever happens to the workers.
While the store is away its RunTracker keeps what rank 0 sent and sends it once the store answers; after a
worker restart it drops the steps the loop sends again (those between the checkpoint and the crash were
logged already). What it still holds at the end goes to the driver's tracker, which sends it with the run's
last flush or writes it to the replay file (replay.py). Files (the profiler's) travel as bytes: the actor
lives on the driver's node, the file on the worker's.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.tracking.tracker import RunTracker

logger = logging.getLogger(__name__)

NAMESPACE = "mixer-tracking"
# A file sent through the actor travels in one Ray call and is held in the actor's memory until logged: the
# profiler's trace of a few steps is well under this.
MAX_RELAYED_ARTIFACT_BYTES = 256 * 2**20


@dataclass
class Relay:
    name: str
    actor: Any  # the ActorHandle; holding it keeps the actor alive until collect_relay


def start_relay(tracker: RunTracker) -> Relay:
    """An actor holding a RunTracker that continues `tracker`'s run (which must be started)."""
    import ray

    name = f"tracker-{tracker.run_id}-{uuid.uuid4().hex[:8]}"
    # num_cpus=0: the workers get every CPU; max_restarts=0: a restarted actor would have lost its buffer.
    # on the driver's node: a lost worker node must not take what the relay buffers with it
    actor = ray.remote(RunTracker).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                                           scheduling_strategy=on_this_node()).remote(
        tracker.tracking_uri, tracker.experiment, tracker.run_name, run_id=tracker.run_id,
        retry_seconds=tracker.retry_seconds)
    ray.get(actor.start.remote())
    return Relay(name, actor)


def on_this_node():
    """A scheduling strategy that keeps an actor on the calling process's node (the driver's): driver-owned
    actors (this relay, the progress ledger) must not go down with a lost worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def collect_relay(tracker: RunTracker, relay: Relay | None) -> None:
    """Move what the actor could not log into `tracker`, then end the actor."""
    if relay is None:
        return
    import ray

    try:
        tracker.adopt(*ray.get(relay.actor.hand_over.remote()))
    except Exception as e:  # the actor died with the driver's node: what it held is gone, say so
        logger.warning("the tracking relay %s is gone (%s: %s); what it had not logged is lost",
                       relay.name, type(e).__name__, e)
    ray.kill(relay.actor)


class RelayedTracker:
    """Rank 0's side: sends to the driver's actor without waiting (calls run in the order they were made)."""

    def __init__(self, name: str):
        import ray

        self._actor = ray.get_actor(name, namespace=NAMESPACE)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._actor.log_metrics.remote(dict(metrics), int(step))

    def log_params(self, params: dict) -> None:
        self._actor.log_params.remote(params)

    def sync(self, timeout_s: float = 30.0) -> None:
        """Return once the actor has run every call this process sent it (one caller's calls run in order), so
        that nothing is still on its way when the worker returns; a gone or stuck actor is a warning."""
        import ray

        try:
            ray.get(self._actor.is_reachable.remote(), timeout=timeout_s)
        except Exception as e:
            logger.warning("the tracking relay did not answer (%s: %s); the last calls may not have arrived",
                           type(e).__name__, e)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A file of this worker's node (the actor may run on another): its bytes travel with the call and the
        actor logs them (RunTracker.log_artifact_bytes, which keeps them through an outage). At most
        MAX_RELAYED_ARTIFACT_BYTES; a larger file is not sent and a warning names where it stays."""
        p = Path(local_path)
        size = p.stat().st_size
        if size > MAX_RELAYED_ARTIFACT_BYTES:
            logger.warning("artifact %s is %.0f MB, over the relay's %.0f MB: not logged to MLflow; it stays on "
                           "this node", p, size / 1e6, MAX_RELAYED_ARTIFACT_BYTES / 1e6)
            return
        dest = f"{artifact_path}/{p.name}" if artifact_path else p.name
        self._actor.log_artifact_bytes.remote(p.read_bytes(), dest)
