"""A rank's position in a training epoch over its canonical slots, and the data state a checkpoint holds.

The position is (epoch, steps consumed) plus, per canonical slot, the raw samples its stream took
(``raw_pos``: a resume skips raw bytes without decoding), its bad-sample/padded tallies and the bytes it read
from storage and from the node-local shard cache. A rank saves the slots it owns; merge_state_dicts joins all
ranks' states by slot id, so a checkpoint holds every slot and a restart at any world size continues it: each
rank picks its (new) owned slots out of it. Slots are only at
the same chunk at a step boundary, so a state is only taken there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .bad_samples import BadSampleTally

# 2: canonical slots (positions per slot id, steps consumed); 1: positions per rank x loader worker.
STATE_VERSION = 2
# The shuffle's algorithm is a plan input: a position saved under another one (before webdataset's shuffle
# was used) cannot be continued exactly, so such a resume restarts the epoch like any other plan change.
SHUFFLE = "webdataset"


class ResumeMismatchError(ValueError):
    """A state_dict was made with different plan inputs and on_plan_change='error'."""


class RankPosition:
    """Items this rank consumed in the epoch; per slot its raw position (None: unknown) and bad-sample tally."""

    def __init__(self, rank: int, owned: Sequence[int], max_bad_fraction: float):
        self.rank, self.max_bad_fraction = rank, max_bad_fraction
        self.items = 0
        self.raw_pos: dict[int, int | None] = {k: 0 for k in owned}
        self.slot_tally: dict[int, BadSampleTally] = {}
        self.tally = BadSampleTally(rank, max_bad_fraction)  # the rank's: the sum of its slots'
        self.slot_bytes: dict[int, list[int]] = {}  # slot -> [bytes from storage, bytes from cache]
        self.just_loaded = False

    def add_bad(self, slot: int, bad: Iterable[Sequence[Any]], padded: int = 0) -> None:
        bad = list(bad)
        self.tally.add(bad, padded)
        if slot not in self.slot_tally:
            self.slot_tally[slot] = BadSampleTally(self.rank, self.max_bad_fraction)
        self.slot_tally[slot].add(bad, padded)

    def add_bytes(self, slot: int, read: Sequence[int]) -> None:
        b = self.slot_bytes.setdefault(slot, [0, 0])
        b[0] += int(read[0])
        b[1] += int(read[1])

    def bytes_read(self) -> tuple[int, int]:
        """(bytes from storage, bytes from the node-local cache) this rank's streams read in the epoch."""
        return sum(b[0] for b in self.slot_bytes.values()), sum(b[1] for b in self.slot_bytes.values())

    def took(self, meta: Mapping[str, Any]) -> None:
        """One item handed out: its slot's raw position and the bad samples its stream met."""
        self.add_bad(meta["slot"], meta["bad"], meta["padded"])
        self.add_bytes(meta["slot"], meta.get("bytes", (0, 0)))
        self.raw_pos[meta["slot"]] = meta["raw_pos"]
        self.items += 1

    def state(self, epoch: int, steps: int, plan_inputs: Mapping[str, Any]) -> dict[str, Any]:
        slots: dict[str, dict[str, Any]] = {}
        for k, raw in self.raw_pos.items():
            t = self.slot_tally.get(k)
            entry: dict[str, Any] = {"bad": t.triples() if t else [], "padded": t.padded if t else 0}
            if raw is not None:
                entry["raw_pos"] = raw
            if any(self.slot_bytes.get(k, ())):
                entry["bytes"] = list(self.slot_bytes[k])
            slots[str(k)] = entry
        return {"version": STATE_VERSION, "epoch": epoch, "steps_consumed": steps, "plan": dict(plan_inputs),
                "slots": slots}

    def load(self, sd: Mapping[str, Any], owned: Sequence[int], steps_per_epoch: int) -> None:
        """Continue at the saved step; a slot without a saved raw position is skipped by decoding."""
        steps = int(sd["steps_consumed"])
        if not 0 <= steps <= steps_per_epoch:
            raise ValueError(f"data state at step {steps} of an epoch of {steps_per_epoch} steps")
        self.items = steps * len(owned)
        saved = sd.get("slots", {})
        for k in owned:
            entry = saved.get(str(k))
            self.raw_pos[k] = 0 if steps == 0 else (int(entry["raw_pos"]) if entry and "raw_pos" in entry else None)
            if entry:
                self.add_bad(k, entry.get("bad", []), entry.get("padded", 0))
                self.add_bytes(k, entry.get("bytes", (0, 0)))
        self.just_loaded = True


def merge_state_dicts(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One state holding every rank's slots (e.g. after all_gather_object); the ranks must be at one step."""
    where = {(s.get("version"), s.get("epoch"), s.get("steps_consumed")) for s in states}
    if len(where) > 1:
        raise ValueError(f"data states of different positions (version, epoch, step): {sorted(where, key=str)}")
    out = dict(states[0])
    out["slots"] = {k: v for st in states for k, v in st.get("slots", {}).items()}
    return out


def plan_changes(sd: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What differs between the saved plan inputs and ours (a state of another version differs as a whole)."""
    if int(sd.get("version", 0)) != STATE_VERSION:
        return {"state version": (sd.get("version"), STATE_VERSION)}
    theirs = dict(sd.get("plan", {}))
    return {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}


def restart_note(diffs: Mapping[str, tuple[Any, Any]], sd: Mapping[str, Any], on_plan_change: str) -> str:
    """The warning for restarting the saved epoch, or ResumeMismatchError with on_plan_change='error'."""
    epoch = int(sd["epoch"])
    desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
    if on_plan_change == "error":
        raise ResumeMismatchError(
            f"data position was saved with other plan inputs ({desc}); cannot continue the epoch "
            f"exactly. Use on_plan_change='restart_epoch' to restart epoch {epoch} from its start."
        )
    done = sd.get("steps_consumed", sd.get("batches_consumed", 0))
    return (f"plan inputs changed ({desc}): restarting epoch {epoch} from its first step; the samples this "
            f"epoch already consumed (position {done}) will be seen again")
