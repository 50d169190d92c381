"""Orchestration overhead: Ray Train vs the same loop without Ray, job submission latency, checkpoints.

- steps/s: the digits preset on 1 worker, run by ``python -m orchestrator.pretrain`` (Ray Train V2, 1 worker,
  1 CPU, against a local cluster) and by ``python -m orchestrator.benchmark.train local`` (the same
  orchestrator.train.loop.run_training with a LocalSession in one process, torch threads = the worker's
  CPUs, as Ray sets OMP_NUM_THREADS), interleaved run by run. Steps/s comes from the loop's own progress
  lines (img/s per logging window, evaluation time excluded); the first window (warm-up) is dropped.
  Start-up (process start to the first step) is reported beside it.
- submit -> first step: ``ray job submit --working-dir . -- python -m orchestrator.pretrain ...`` against a
  local cluster (cluster.local.LocalCluster: head with 0 CPUs + 1 worker node), wall time from launching the
  client to the job's first progress line (working-dir upload, driver start, worker group, data, step 1).
- the step around a checkpoint under Ray Train with the storage on loopback S3 (orchestrator/benchmark/
  checkpoint_upload.py; not with --quick);
- checkpoints: orchestrator.checkpoint.format.save_checkpoint of the state the loop saves (model, AdamW,
  schedule, RNG, data position) + LocalCheckpointStore.commit, load_checkpoint + load_state_dict, and the
  time of the step that saves a checkpoint and of the step after it, against plain steps (interleaved).
- observability overhead (``observe_overhead``; alone with ``--observe-only``): the same loop (run_training,
  LocalSession, in this process, tracked into a sqlite MLflow store) with observe's system-metrics sampler and
  step-time breakdown on (the defaults) vs off, interleaved run by run; steps/s from the progress lines (first
  window dropped) and steps per CPU-second of this process (the sampler's thread included), on/off per round.

    python -m orchestrator.benchmark.train local run.name=x data.url=/path ...   # the no-Ray loop (used above)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cluster.local import LocalCluster
from orchestrator.benchmark import checkpoint_upload
from orchestrator.benchmark.common import STEP_LINE, interleaved, ratios, spread, summary
from pipelines.cli import entry_point, say

REPO_ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 128
LOG_EVERY = 10


def _overrides(tmp: Path, data_url: str, name: str, steps: int, log_every: int = LOG_EVERY) -> list[str]:
    return [
        f"run.name={name}", f"run.storage_path={tmp / 'runs'}", f"data.url={data_url}",
        "tracking.enabled=false", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        f"optim.global_batch_size={GLOBAL_BATCH}", f"train.max_steps={steps}", f"train.log_every_steps={log_every}",
        "eval.every_steps=1000000", "checkpoint.every_steps=1000000",
    ]


def _run_and_parse(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a training command; steps/s per logging window from its progress lines, start-up time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    windows: list[float] = []
    first_step_s = None
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.search(line)
            if m:
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t0
                windows.append(int(m.group(3)) / GLOBAL_BATCH)
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError
        proc.wait(timeout=max(timeout - (time.perf_counter() - t0), 1))
    except (TimeoutError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd[:4])} ... timed out after {timeout:.0f}s; last output:\n"
                           + "".join(lines[-15:])) from None
    if proc.returncode != 0 or len(windows) < 2:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}, {len(windows)} progress "
                           "lines); last output:\n" + "".join(lines[-25:]))
    return {"steps_per_s": statistics.median(windows[1:]), "windows": windows,
            "first_step_s": first_step_s, "total_s": time.perf_counter() - t0}


def checkpoint_bench(model_name: str, batch: int, repeats: int, tmp: Path) -> dict[str, Any]:
    from model import create_model
    from orchestrator.checkpoint.format import load_checkpoint, save_checkpoint
    from orchestrator.config.tree import OptimSection, ScheduleSection
    from orchestrator.train.checkpoints import LocalCheckpointStore, rng_state
    from orchestrator.train.optim import build_optimizer, build_scheduler
    from orchestrator.train.step import train_step

    torch.manual_seed(0)
    model = create_model(model_name)
    cfg = model.cfg
    optimizer = build_optimizer(model, OptimSection())
    scheduler = build_scheduler(optimizer, 10_000, ScheduleSection(warmup_steps=10))
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (batch,))
    store = LocalCheckpointStore(tmp / f"ckpt-{model_name}", num_to_keep=2)
    step_no = [0]

    def step() -> None:
        train_step(model, [(x, y)], optimizer, scheduler).loss.item()
        step_no[0] += 1

    def save() -> Path:
        staged = Path(tempfile.mkdtemp(prefix="ckpt_", dir=tmp))
        save_checkpoint(staged, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step_no[0], "data": {"epoch": 0, "batches": step_no[0]}, "rng": [rng_state()],
            "mlflow_run_id": None, "accelerator_hours": 0.0, "config": {},
        })
        return store.commit(staged, step_no[0])

    def restore() -> None:
        state = load_checkpoint(max(store.root.glob("checkpoint_*")))  # checkpoint_<08d step>: newest last
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    step()  # warm-up (the optimizer state exists from here on)
    step()
    size = save().joinpath("state.pt").stat().st_size
    samples: dict[str, list[float]] = {k: [] for k in ("plain", "save", "step+save", "after", "restore")}

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(repeats):
        samples["plain"].append(timed(step))
        samples["plain"].append(timed(step))
        t_step = timed(step)
        t_save = timed(save)
        samples["save"].append(t_save)
        samples["step+save"].append(t_step + t_save)
        samples["after"].append(timed(step))
        samples["restore"].append(timed(restore))
    plain = statistics.median(samples["plain"])
    return {
        "model": model_name,
        "batch": batch,
        "checkpoint_mb": size / 1e6,
        "save_s": summary(samples["save"]),
        "restore_s": summary(samples["restore"]),
        "plain_step_s": summary(samples["plain"]),
        "step_with_save_s": summary(samples["step+save"]),
        "step_after_save_s": summary(samples["after"]),
        "slowdown_step_with_save": summary([s / plain for s in samples["step+save"]]),
        "slowdown_step_after_save": summary([s / plain for s in samples["after"]]),
    }


OBSERVE_CASES = {
    "observe off": ["observe.system_metrics=false", "observe.step_breakdown=false"],
    "observe on (defaults)": ["observe.system_metrics=true", "observe.step_breakdown=true"],
}


def observe_overhead(tmp: Path, data_url: str, steps: int, rounds: int, log_every: int = LOG_EVERY,
                     warmup: int = 1) -> dict[str, Any]:
    """steps/s of the training loop with observe's sampler (every 10 s, the default) and step breakdown on vs
    off: the same run_training in this process (LocalSession, torch threads 1, tracked into a sqlite store so
    that the sampler runs), one run of each case per round, in alternating order, after `warmup` rounds."""
    import contextlib
    import io

    from orchestrator.config.load import load_config
    from orchestrator.tracking.tracker import RunTracker
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    uri = f"sqlite:///{tmp / 'observe-mlflow.db'}"
    data = resolve_data(load_config(None, _overrides(tmp, data_url, "observe", steps)))
    walls: dict[str, list[float]] = {k: [] for k in OBSERVE_CASES}
    cpus: dict[str, list[float]] = {k: [] for k in OBSERVE_CASES}
    counter = [0]

    def one(case: str):
        def fn() -> float:
            counter[0] += 1
            cfg = load_config(None, [*_overrides(tmp, data_url, f"observe-{counter[0]}", steps, log_every),
                                     "tracking.enabled=true", f"tracking.uri={uri}",
                                     "tracking.experiment=bench-observe", *OBSERVE_CASES[case]])
            tracker = RunTracker(uri, cfg.tracking.experiment, cfg.run.name)
            job = Job(dataset_url=data.url, num_classes=data.num_classes, train_samples=data.train_samples,
                      mlflow_run_id=tracker.start(), tracking_uri=uri, storage_options=data.storage_options)
            printed = io.StringIO()
            c0 = time.process_time()
            with contextlib.redirect_stdout(printed):
                run_training(cfg, LocalSession(str(tmp / "observe-runs" / cfg.run.name), device="cpu"), job)
            cpu_s = time.process_time() - c0
            tracker.end("FINISHED")
            windows = [int(m.group(3)) / GLOBAL_BATCH for m in STEP_LINE.finditer(printed.getvalue())]
            if len(windows) < 2:
                raise RuntimeError("observe overhead: fewer than 2 progress lines:\n" + printed.getvalue()[-2000:])
            walls[case].append(statistics.median(windows[1:]))
            cpus[case].append(steps / cpu_s)
            return walls[case][-1]
        return fn

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray sets OMP_NUM_THREADS for a 1-CPU worker
    try:
        interleaved({case: one(case) for case in OBSERVE_CASES}, rounds, warmup=warmup)
    finally:
        torch.set_num_threads(saved)
    off, on = OBSERVE_CASES
    for figures in (walls, cpus):  # the warm-up rounds' runs are not figures
        for case in figures:
            figures[case] = figures[case][warmup:]
    return {
        "setup": f"run_training + LocalSession in one process, {steps} steps per run, {rounds} rounds",
        "steps_per_s": {case: summary(v) for case, v in walls.items()},
        "steps_per_cpu_s": {case: summary(v) for case, v in cpus.items()},
        "on_vs_off_steps_per_s": summary(ratios(walls[on], walls[off])),
        "on_vs_off_steps_per_cpu_s": summary(ratios(cpus[on], cpus[off])),
    }


def run(repeats: int = 5, quick: bool = False, submit: bool = True, steps: int | None = None,
        observe_only: bool = False) -> dict[str, Any]:
    from pipelines.digits import ensure_digits_dataset

    steps = steps or (30 if quick else 60)
    runs = max(2, min(repeats, 3 if quick else repeats))
    tmp = Path(tempfile.mkdtemp(prefix="mixer-bench-train-"))
    notes: list[str] = []
    result: dict[str, Any] = {
        "setup": (f"digits preset (mixer_digits, batch {GLOBAL_BATCH}, 1 loader worker), 1 worker x 1 CPU, "
                  f"{steps} steps per run, {runs} runs each, interleaved"),
        "notes": notes,
    }
    if observe_only:
        try:
            say(f"[train] observe on vs off, {runs} interleaved rounds of {steps} steps ...")
            result["observe"] = observe_overhead(tmp, ensure_digits_dataset(str(tmp / "digits")), steps, runs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result
    cluster = None
    try:
        data_url = ensure_digits_dataset(str(tmp / "digits"))
        try:
            t0 = time.perf_counter()
            cluster = LocalCluster.up(tmp / "cluster", workers=1, cpus_per_node=1, token_file=tmp / "ray_token")
            result["cluster_up_s"] = time.perf_counter() - t0
            ray_env = cluster.env
        except Exception as e:  # a loaded 2-core box can time out `ray start`: fall back to ray.init per run
            notes.append(f"local cluster did not start ({type(e).__name__}); Ray runs use ray.init() inside "
                         f"each run instead and `ray job submit` is skipped: {str(e)[-300:]}")
            ray_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        local_env = {**os.environ, "OMP_NUM_THREADS": "1"}
        local_env.pop("RAY_ADDRESS", None)
        samples: dict[str, list[dict[str, Any]]] = {"no Ray (LocalSession)": [], "Ray Train, 1 worker": []}
        counter = [0]

        def one(kind: str):
            def fn() -> float:
                counter[0] += 1
                ov = _overrides(tmp, data_url, f"bench-{counter[0]}", steps)
                if kind == "ray":
                    cmd, env = [sys.executable, "-m", "orchestrator.pretrain", *ov], ray_env
                    key = "Ray Train, 1 worker"
                else:
                    cmd, env = [sys.executable, "-m", "orchestrator.benchmark.train", "local", *ov], local_env
                    key = "no Ray (LocalSession)"
                r = _run_and_parse(cmd, env, timeout=600)
                samples[key].append(r)
                return r["steps_per_s"]  # interleaved() divides by the wall time; we keep our own figure
            return fn

        say(f"[train] {runs} interleaved runs each of the loop with and without Ray ({steps} steps) ...")
        interleaved({"local": one("local"), "ray": one("ray")}, runs, warmup=0)
        cases = {}
        for key, rs in samples.items():
            cases[key] = {
                "steps_per_s": summary([r["steps_per_s"] for r in rs]),
                "start_to_first_step_s": summary([r["first_step_s"] for r in rs]),
                "total_s": summary([r["total_s"] for r in rs]),
            }
        result["loop"] = cases
        result["ray_vs_local_steps_per_s"] = summary(ratios(
            [r["steps_per_s"] for r in samples["Ray Train, 1 worker"]],
            [r["steps_per_s"] for r in samples["no Ray (LocalSession)"]],
        ))

        if submit and cluster is not None:
            say("[train] ray job submit -> first step ...")
            subs = []
            for i in range(1 if quick else 2):
                ov = _overrides(tmp, data_url, f"bench-submit-{i}", 5, log_every=1)
                cmd = cluster.submit_command(["python", "-m", "orchestrator.pretrain", *ov], working_dir=".")
                try:
                    subs.append(_run_and_parse(cmd, cluster.env, timeout=600)["first_step_s"])
                except RuntimeError as e:
                    notes.append(f"ray job submit run {i} failed: {str(e)[-500:]}")
            if subs:
                result["submit_to_first_step_s"] = summary(subs)
        elif not submit:
            notes.append("`ray job submit` -> first step skipped (--no-submit)")
    finally:
        if cluster is not None:
            cluster.down(grace_s=2)

    say(f"[train] observe on vs off, {runs} interleaved rounds of {steps} steps ...")
    result["observe"] = observe_overhead(tmp, data_url, steps, runs)
    if not quick:
        say("[train] the step around a checkpoint under Ray Train, storage on loopback S3 ...")
        try:
            result["upload"] = checkpoint_upload.run(tmp, data_url)
        except Exception as e:  # the other figures stand without it
            notes.append(f"checkpoint upload run failed: {str(e)[-500:]}")
    say("[train] checkpoint save / restore ...")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ck_models = [("mixer_digits", 128)] if quick else [("mixer_digits", 128), ("mixer_s16_224", 4)]
        result["checkpoint"] = [checkpoint_bench(m, b, max(repeats, 3), tmp) for m, b in ck_models]
    finally:
        torch.set_num_threads(saved_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def tables(result: dict[str, Any]):
    out = []
    if "loop" in result:
        rows = []
        for key, c in result["loop"].items():
            rel = spread(result["ray_vs_local_steps_per_s"]) + "x" if key.startswith("Ray") else ""
            rows.append([key, spread(c["steps_per_s"]), rel, spread(c["start_to_first_step_s"])])
        if "submit_to_first_step_s" in result:
            rows.append(["ray job submit (local cluster)", "", "", spread(result["submit_to_first_step_s"])])
        out.append((["run", "steps/s median [min-max]", "vs no Ray (same round)", "start -> first step s"], rows))
    if "observe" in result:
        ob = result["observe"]
        rows = [[case, spread(ob["steps_per_s"][case]), spread(ob["steps_per_cpu_s"][case])]
                for case in OBSERVE_CASES]
        rows.append(["on / off (same round)", spread(ob["on_vs_off_steps_per_s"]) + "x",
                     spread(ob["on_vs_off_steps_per_cpu_s"]) + "x"])
        out.append((["observability (" + ob["setup"] + ")", "steps/s (wall)", "steps per CPU-s"], rows))
    if "checkpoint" not in result:
        return out
    rows = []
    for c in result.get("checkpoint", []):
        rows.append([f"{c['model']} (batch {c['batch']})", f"{c['checkpoint_mb']:.1f}", spread(c["save_s"]),
                     spread(c["restore_s"]), spread(c["plain_step_s"]),
                     spread(c["slowdown_step_with_save"]) + "x", spread(c["slowdown_step_after_save"]) + "x"])
    out.append((["checkpoint", "MB", "save s", "restore s", "plain step s", "step+save vs plain",
                 "next step vs plain"], rows))
    if "upload" in result:
        out.append(checkpoint_upload.table(result["upload"]))
    return out


@entry_point
def local_main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.benchmark.train local key=value ...`: the training loop without Ray, one process,
    what `Ray Train, 1 worker` is compared with."""
    import argparse

    from orchestrator.config.load import load_config
    from orchestrator.train.launch import resolve_data
    from orchestrator.train.loop import Job, run_training
    from orchestrator.train.session import LocalSession

    p = argparse.ArgumentParser(prog="python -m orchestrator.benchmark.train",
                                description="The training loop without Ray, in this process (used by the benchmark).")
    p.add_argument("mode", choices=["local"], help="local: run_training with a LocalSession")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value, as for orchestrator.pretrain")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(None, args.overrides)
    torch.set_num_threads(max(int(cfg.scaling.cpus_per_worker), 1))  # as Ray sets OMP_NUM_THREADS per worker
    data = resolve_data(cfg)
    job = Job(dataset_url=data.url, num_classes=data.num_classes, train_samples=data.train_samples,
              mlflow_run_id=None, tracking_uri=None, storage_options=data.storage_options)
    session = LocalSession(str(Path(cfg.resolved_storage_path()) / cfg.run.name), device="cpu")
    run_training(cfg, session, job)
    return 0


if __name__ == "__main__":
    sys.exit(local_main())
