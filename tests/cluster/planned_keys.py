"""The sample keys of every step as the data plan gives them, read in one process (world size 1, all slots):
what the cluster tests compare each rank's key trace (data.trace_keys_dir) against. The runs use the digits
preset, so the plan reads what its minival (data.minival_fraction) leaves of the training split."""

from __future__ import annotations

from collections import Counter


def planned_steps(data_url: str, *, epochs: int, slots: int, chunk: int, seed: int,
                  storage_options: dict | None = None) -> list[Counter]:
    from orchestrator.config.load import load_config
    from orchestrator.train.batches import subset_spec
    from pipelines.loader import ShardLoader

    cfg = load_config("digits")
    loader = ShardLoader(data_url, "train", batch_size=chunk, slots=slots, rank=0, world_size=1, num_workers=0,
                         seed=seed, shuffle_buffer=cfg.data.shuffle_buffer, return_keys=True,
                         storage_options=storage_options or {}, subset=subset_spec(cfg))
    steps = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        items = [keys for _x, _y, keys in loader]
        steps += [Counter(k for it in items[i:i + slots] for k in it) for i in range(0, len(items), slots)]
    return steps


def minival_keys(data_url: str, storage_options: dict | None = None) -> set[str]:
    """The digits preset's minival: held out of training, never trained on."""
    from orchestrator.config.load import load_config
    from orchestrator.train.batches import subset_spec
    from pipelines.loader import ShardLoader

    loader = ShardLoader(data_url, "train", batch_size=64, num_workers=0, training=False, return_keys=True,
                         storage_options=storage_options or {}, subset=subset_spec(load_config("digits"), "minival"))
    return {k for _x, _y, keys in loader for k in keys}
