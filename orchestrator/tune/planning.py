"""How a search is laid out before it starts: its objective, how many trials, how often each reports (ASHA's
max_t), how many run at once, and Tune's search algorithm and scheduler."""

from __future__ import annotations

import math

from orchestrator.config.checks import selection_split
from orchestrator.config.search_space import SearchSpace
from orchestrator.config.tree import Config
from orchestrator.train.plan import worker_group_resources

MODE = "max"
REPORTED = "val/top1"  # shown beside the objective, never selected on when the run holds a minival


def objective(cfg: Config) -> str:
    """What trials are compared on (Tune's metric, ASHA's early stopping, the best trial): the minival's top-1
    when the runs hold one out of the training split (data.minival_fraction > 0), else val's."""
    return f"{selection_split(cfg)}/top1"


def expected_trials(space: SearchSpace, search: str, num_samples: int) -> int:
    """Trials Tune generates: random/grid repeat the grid per sample; optuna makes `num_samples` trials."""
    return space.grid_size(search) * num_samples if search != "optuna" else num_samples


def num_reports(plan) -> int:
    """How many times a run reports to Tune (train_loop: at every evaluation or checkpoint, and at the end)."""
    total, e, c = plan.total_steps, plan.eval_every_steps, plan.checkpoint_every_steps
    lcm = e * c // math.gcd(e, c)
    return total // e + total // c - total // lcm + (0 if total % e == 0 or total % c == 0 else 1)


def trial_plan(cfg: Config, data):
    """The run plan of one trial's config on the search's dataset (what make_plan says for it)."""
    from orchestrator.train.plan import make_plan

    return make_plan(cfg, data.num_classes, data.train_samples)


def derive_concurrency(trial_cfgs: list[Config]) -> tuple[int | None, dict[str, float]]:
    """Trials the cluster fits at once (the biggest trial's worker group counts), and that group's needs."""
    import ray

    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for cfg in trial_cfgs:
        for k, v in worker_group_resources(cfg).items():
            need[k] = max(need.get(k, 0.0), v)
    fits = [int(total.get(k, 0.0) // v) for k, v in need.items() if v > 0]
    return (min(fits) if fits else None), need


def make_search_alg(search: str, seed: int, max_concurrent: int | None):
    """Seeded, so the same space and run.seed sample the same trials."""
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)  # TPE sampler; metric/mode come from TuneConfig
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)


def make_scheduler(name: str, max_t: int, grace_period: int, reduction_factor: float):
    if name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that reaches max_t ends on its own, so its MLflow run is finished properly.
    return ASHAScheduler(
        time_attr="training_iteration", max_t=max(max_t, 1), grace_period=min(grace_period, max(max_t, 1)),
        reduction_factor=reduction_factor, stop_last_trials=False,
    )
