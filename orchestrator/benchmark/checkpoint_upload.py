"""The step around a checkpoint under Ray Train with the run's storage on S3: does the upload stall training?

``python -m orchestrator.pretrain`` (Ray Train, 2 workers, a local Ray instance) trains a widened digits Mixer
(8.5 M parameters: a ~100 MB checkpoint with AdamW state) with ``run.storage_path`` on a loopback S3 server (moto,
through s3fs, in this process) and a checkpoint every ``EVERY`` steps. From the run's per-step progress lines
(``train.log_every_steps=1``: each line's img/s covers one step and whatever ran between it and the previous
line) it takes the time of the step after each checkpoint (the save, the report and, if synchronous, the
upload) against the median plain step of the same run. The upload runs in Ray Train's background thread
(``checkpoint_upload_mode=ASYNC``, orchestrator/train/session.py): what remains is the staging save, the states'
gather, Ray's report barrier and, on a small box, the CPU the upload thread and the S3 server take.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.loopback import create_bucket, moto_s3_server
from orchestrator.benchmark.common import STEP_LINE, spread, summary

REPO_ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 128
EVERY = 10
WIDE_DIGITS = ["model.hidden_dim=256", "model.channels_mlp_dim=2048", "model.tokens_mlp_dim=256", "model.depth=8"]


def run(tmp: Path, data_url: str, epochs: int = 4, wide: bool = True) -> dict[str, Any]:
    """One run; step seconds after each checkpoint vs plain steps (the first checkpoint interval dropped).
    ``wide=False``: the digits Mixer as it is (a ~1 MB checkpoint; a quick check that the measurement works)."""
    with moto_s3_server() as endpoint:
        bucket = create_bucket(endpoint, "bench-checkpoints")
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "PYTHONUNBUFFERED": "1", "MIXER_HOME": str(tmp / "home")}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "orchestrator.pretrain", "run.name=bench-upload", f"data.url={data_url}",
               f"run.storage_path=s3://{bucket}/runs", "tracking.enabled=false", "scaling.num_workers=2",
               f"optim.global_batch_size={GLOBAL_BATCH}", f"schedule.epochs={epochs}", "schedule.warmup_steps=5",
               f"checkpoint.every_steps={EVERY}", "train.log_every_steps=1", "eval.every_steps=1000000",
               "data.minival_fraction=0",  # the whole split: 11 steps an epoch, a checkpoint every 10
               *(WIDE_DIGITS if wide else [])]
        out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
        import s3fs

        runs = s3fs.S3FileSystem(endpoint_url=endpoint)
        checkpoints = len([p for p in runs.ls(f"{bucket}/runs/bench-upload") if "/checkpoint_" in p]) \
            if out.returncode == 0 else 0
    text = out.stdout + out.stderr
    step_s = {int(m.group(1)): GLOBAL_BATCH / max(int(m.group(3)), 1) for m in STEP_LINE.finditer(text)}
    after = [s for step, s in step_s.items() if step > EVERY and step % EVERY == 1]
    plain = [s for step, s in step_s.items() if step > EVERY and step % EVERY != 1]
    if out.returncode != 0 or not after or not plain:
        raise RuntimeError(f"checkpoint upload run failed (exit {out.returncode}); last output:\n{text[-2000:]}")
    median_plain = statistics.median(plain)
    mb = re.search(r"parameters\s+([\d,]+)", text)
    if not mb:
        raise RuntimeError(f"the run printed no parameter count; last output:\n{text[-2000:]}")
    params = int(mb.group(1).replace(",", ""))
    return {
        "setup": f"digits Mixer, {params:,} parameters, 2 workers, checkpoint every {EVERY} steps to loopback S3",
        "checkpoint_mb": params * 4 * 3 / 1e6,  # fp32 weights + AdamW's two moments
        "checkpoints_in_storage": checkpoints,
        "plain_step_s": summary(plain),
        "step_after_checkpoint_s": summary(after),
        "after_vs_plain": summary([s / median_plain for s in after]),
        "extra_steps": summary([(s - median_plain) / median_plain for s in after]),
    }


def table(result: dict[str, Any]):
    return (["checkpoint to S3 (Ray Train, ASYNC upload)", "MB", "plain step s", "step after a checkpoint s",
             "vs plain", "extra, in plain steps"],
            [[result["setup"], f"{result['checkpoint_mb']:.0f}",
              spread(result["plain_step_s"]), spread(result["step_after_checkpoint_s"]),
              spread(result["after_vs_plain"]) + "x", spread(result["extra_steps"])]])
