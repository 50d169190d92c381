"""Secret redaction (one set of patterns for storage messages and MLflow params/tags/artifacts)."""

from __future__ import annotations

from pipelines.redaction import is_secret_key, redact, redact_url, redacted_options, scrub

FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzTESTKEY1"


def test_secret_keys_and_values():
    for k in ["data.key", "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "api_key", "tracking.token",
              "db.password", "gcp.credentials", "storage_options.secret", "MLFLOW_TRACKING_PASSWORD"]:
        assert is_secret_key(k), k
    for k in ["model.tokens_mlp_dim", "model.hidden_dim", "data.url", "optim.lr", "model.name", "run.seed"]:
        assert not is_secret_key(k), k
    text = f"id AKIAIOSFODNN7EXAMPLE secret {FAKE_SECRET} at https://bob:hunter22@host/x password=abc"
    out = redact(text)
    for s in ["AKIAIOSFODNN7EXAMPLE", FAKE_SECRET, "hunter22", "abc"]:
        assert s not in out
    sha = "0123456789abcdef0123456789abcdef01234567"  # a git commit is not a secret
    assert redact(sha) == sha
    assert redact({"a": 1, "password": "x", "n": {"token": "y", "b": "s3://u:p@h/b"}}) == {
        "a": 1, "n": {"b": "s3://u:****@h/b"}}


def test_storage_options_and_urls():
    opts = {"endpoint_url": "http://u:pw-123@127.0.0.1:9", "key": "AKIDEXAMPLE", "secret": "s3cr",
            "client_kwargs": {"aws_session_token": "sess-token-1"}, "anon": False}
    assert redacted_options(opts) == {"endpoint_url": "http://u:****@127.0.0.1:9", "key": "****",
                                      "secret": "****", "client_kwargs": {"aws_session_token": "****"},
                                      "anon": False}
    msg = "denied for AKIDEXAMPLE with s3cr and sess-token-1 at https://tok123@host/x"
    out = scrub(msg, opts)
    assert out == "denied for **** with **** and **** at https://****@host/x"
    assert redact_url("s3://bucket/key") == "s3://bucket/key"


def test_secret_environment_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a short setting, not a secret
    assert scrub("key testing-secret-key, mode token") == "key ****, mode token"
    assert redact({"note": "testing-secret-key"}) == {"note": "****"}


def test_working_directory_variables_are_not_secrets(monkeypatch):
    """PWD names a directory, not a password: paths under it stay readable in messages and MLflow params."""
    monkeypatch.setenv("PWD", "/tmp/clean-checkout")
    monkeypatch.setenv("OLDPWD", "/tmp/previous-checkout")
    monkeypatch.setenv("DB_PWD", "hunter2hunter2")
    assert not is_secret_key("PWD") and not is_secret_key("OLDPWD") and is_secret_key("DB_PWD")
    uri = "sqlite:////tmp/clean-checkout_home/mlflow.db and /tmp/previous-checkout/x"
    assert redact(uri) == uri
    assert redact("pw hunter2hunter2") == "pw ****"
