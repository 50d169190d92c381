"""The next-step lines printed after pretrain, tune and evaluate (orchestrator/tracking/links.py)."""

from orchestrator.tracking.links import mlflow_ui_hint, report_command


def test_report_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert report_command("mixer-pretrain") == "python -m orchestrator.report --experiment mixer-pretrain"
    default = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert report_command("my exp", tracking_uri=default) == "python -m orchestrator.report --experiment 'my exp'"
    cmd = report_command("mixer-tune", parent_run_id="abc123", tracking_uri="http://u:pw@127.0.0.1:5000")
    assert cmd == ("python -m orchestrator.report --experiment mixer-tune --parent abc123 "
                   "--tracking-uri http://127.0.0.1:5000")


def test_mlflow_ui_hint_names_the_server_for_http_and_the_command_for_a_store(tmp_path):
    assert mlflow_ui_hint("http://alice:s3cr3t@mlflow.example:5000") == "http://mlflow.example:5000"
    assert mlflow_ui_hint("https://mlflow.example/") == "https://mlflow.example/"
    hint = mlflow_ui_hint(f"sqlite:///{tmp_path}/mlflow.db")
    assert hint.startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db")
