"""The sample keys of every step as the data plan gives them, read in one process (world size 1, all slots):
what the cluster tests compare each rank's key trace (data.trace_keys_dir) against."""

from __future__ import annotations

from collections import Counter


def planned_steps(data_url: str, *, epochs: int, slots: int, chunk: int, seed: int,
                  storage_options: dict | None = None) -> list[Counter]:
    from orchestrator.config.load import load_config
    from pipelines.loader import ShardLoader

    shuffle = load_config("digits").data.shuffle_buffer
    loader = ShardLoader(data_url, "train", batch_size=chunk, slots=slots, rank=0, world_size=1, num_workers=0,
                         seed=seed, shuffle_buffer=shuffle, return_keys=True, storage_options=storage_options or {})
    steps = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        items = [keys for _x, _y, keys in loader]
        steps += [Counter(k for it in items[i:i + slots] for k in it) for i in range(0, len(items), slots)]
    return steps
