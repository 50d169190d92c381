"""Artifacts and the model of a run (RunTracker's artifact half), logged by the driver; from the training loop
only the profiler window's files, once (rank 0, observe.profile_steps).

Each artifact is one synchronous MlflowClient call, made through RunTracker._call_or_keep: a refusal is
counted, an outage keeps the call and replays it once the store answers; the end-of-run summary lists the
artifacts that never arrived. What is written is scrubbed of secrets first (pipelines.redaction).
A file that comes as bytes from another node (log_artifact_bytes: the relay actor, relay.py) is held by the
tracker until it is logged, so it also moves with the relay's leftovers and into the replay file (replay.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from orchestrator.tracking.store import is_refused
from pipelines.cli import first_line
from pipelines.redaction import redact

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".txt", ".log", ".cfg", ".toml", ".ini", ".md", ".csv", ".env", ".sh"}


class ArtifactLogging:
    """Mixed into RunTracker: uses its `client`, `run_id`, `experiment_id`, `is_down`, `flush`, `set_tags`,
    `_call_or_keep`, `_blobs`, `_outage` and `_lost`."""

    def log_dict(self, obj, artifact_file: str) -> None:
        """A dict as YAML (.yaml/.yml) or JSON (anything else), with secret keys dropped and values masked."""
        obj = redact(obj)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
        else:
            text = json.dumps(obj, indent=2, default=str)
        self._call_or_keep(artifact_file, lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_figure(self, fig, artifact_file: str) -> None:
        def log():
            self.client.log_figure(self.run_id, fig, artifact_file, save_kwargs={"dpi": 120, "bbox_inches": "tight"})
            import matplotlib.pyplot as plt

            plt.close(fig)

        self._call_or_keep(artifact_file, log)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A local file (text files are scrubbed of secrets first) or directory, under `artifact_path`."""
        p = Path(local_path)
        dest = f"{artifact_path}/{p.name}" if artifact_path else p.name
        if not p.exists():
            self._lost.refused.append(f"artifact {local_path} (no such file)")
            logger.warning("artifact %s does not exist; not logged", redact(local_path))
            return
        if p.is_dir():
            self._call_or_keep(dest, lambda: self.client.log_artifacts(self.run_id, str(p), artifact_path))
        elif p.suffix.lower() in _TEXT_SUFFIXES and p.stat().st_size < 5 * 2**20:
            text = redact(p.read_text(errors="replace"))
            self._call_or_keep(dest, lambda: self.client.log_text(self.run_id, text, dest))
        else:
            self._call_or_keep(dest, lambda: self.client.log_artifact(self.run_id, str(p), artifact_path))

    def log_artifact_bytes(self, data: bytes, artifact_file: str) -> None:
        """A file's content as the artifact `artifact_file` (e.g. "profile/trace.json"), logged like log_artifact
        (text scrubbed of secrets). Its bytes stay in the tracker (`_blobs`) until MLflow has them: pending()
        hands them on (relay -> driver, driver -> replay file) instead of losing them with this process."""
        self._blobs[artifact_file] = bytes(data)
        self._call_or_keep(artifact_file, lambda: self._send_blob(artifact_file))

    def _send_blob(self, artifact_file: str) -> None:
        data = self._blobs[artifact_file]
        directory, _, name = artifact_file.rpartition("/")
        try:
            if Path(name).suffix.lower() in _TEXT_SUFFIXES and len(data) < 5 * 2**20:
                self.client.log_text(self.run_id, redact(data.decode(errors="replace")), artifact_file)
            else:
                spool = Path(tempfile.mkdtemp(prefix="mixer-mlflow-"))
                try:
                    (spool / name).write_bytes(data)
                    self.client.log_artifact(self.run_id, str(spool / name), directory or None)
                finally:
                    shutil.rmtree(spool, ignore_errors=True)
        except Exception as e:
            if is_refused(e):  # counted by the caller; never retried, so nothing to keep
                self._blobs.pop(artifact_file, None)
            raise
        self._blobs.pop(artifact_file, None)

    def log_model(self, model, input_example) -> str:
        """Log the model as MLflow's pytorch flavour (torch.export, "pt2", with the input example).

        If torch.export cannot trace the model, the state_dict is logged instead as model/state_dict.pt
        (load with torch.load(weights_only=True), no pickled code) and a warning says so.
        Returns "pt2", "state_dict", or "not logged".
        """
        if self.run_id is None:
            return "not logged"
        self.flush(force=True)
        if self.is_down:
            self._lost.model = "model (tracking unreachable)"
            return "not logged"
        import torch

        if isinstance(input_example, torch.Tensor):  # a numpy example gives the TensorSpec signature pt2 needs
            input_example = input_example.detach().cpu().numpy()
        if getattr(input_example, "ndim", 0) >= 1 and input_example.shape[0] == 1:
            # torch.export specialises a batch dimension of 1: the logged model would accept only batch 1.
            import numpy as np

            input_example = np.concatenate([input_example, input_example])
        try:
            log_pytorch_model(self.client, self.experiment_id, self.run_id, model, input_example)
            return "pt2"
        except Exception as e:
            from mlflow.exceptions import MlflowException

            if isinstance(e, MlflowException) and not is_refused(e):
                self._outage.failed(e)
                self._lost.model = "model (tracking unreachable)"
                return "not logged"
            logger.warning(
                "MLflow could not log the model with torch.export (%s: %s); logging its state_dict as "
                "model/state_dict.pt instead (torch.load(..., weights_only=True))", type(e).__name__,
                redact(first_line(e)),
            )
        spool = Path(tempfile.mkdtemp(prefix="mixer-mlflow-"))
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, spool / "state_dict.pt")

        def log():
            self.client.log_artifact(self.run_id, str(spool / "state_dict.pt"), "model")
            shutil.rmtree(spool, ignore_errors=True)

        self._call_or_keep("model/state_dict.pt", log)
        self.set_tags({"mixer.model_format": "state_dict (torch.export failed)"})
        return "state_dict"


def log_pytorch_model(client, experiment_id: str, run_id: str, model, input_example) -> None:
    """`mlflow.pytorch.log_model` into `run_id`'s experiment at `client`'s store (checked against MLflow 3.17.2).

    log_model takes no tracking URI: it reads the process-wide one (mlflow.set_tracking_uri), and it puts a new
    LoggedModel in the process's active experiment (the "Default" one unless set). The LoggedModel is created
    here with the explicit client in the run's experiment and handed over as `model_id`; the process-wide URI
    is pointed at the client's store for this call and put back after (public mlflow.* calls only).
    """
    import mlflow
    import torch

    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id,
                                        params=client.get_run(run_id).data.params)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        mlflow.pytorch.log_model(
            model, name="model", input_example=input_example, run_id=run_id, model_id=logged.model_id,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    finally:
        mlflow.set_tracking_uri(previous)
