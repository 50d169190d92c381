"""python -m pipelines.write_shards: every bad argument exits 2 with one message, before anything is written."""

from __future__ import annotations

import os

import pytest

from cluster.loopback import free_port
from pipelines.write_shards import main


def _tree(tmp_path, layout: dict[str, list[str]]) -> str:
    root = tmp_path / "src"
    root.mkdir()
    for folder, files in layout.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).write_bytes(b"not really an image")
    return str(root)


CASES = [
    # id, argv after SOURCE DEST (None: SOURCE/DEST from the case), words the message must hold
    ("maxcount-0", ["digits", "{dest}", "--maxcount", "0"], ["--maxcount=0", "integer >= 1"]),
    ("maxcount-negative", ["digits", "{dest}", "--maxcount", "-3"], ["--maxcount=-3", "integer >= 1"]),
    ("maxsize-negative", ["digits", "{dest}", "--maxsize", "-1"], ["--maxsize=-1", "integer >= 1"]),
    ("val-fraction-1.5", ["digits", "{dest}", "--val-fraction", "1.5"], ["--val-fraction=1.5", "[0, 1)"]),
    ("val-fraction-negative", ["digits", "{dest}", "--val-fraction", "-0.1"], ["--val-fraction=-0.1", "[0, 1)"]),
    ("seed-negative", ["digits", "{dest}", "--seed", "-1"], ["--seed=-1", "integer >= 0"]),
    ("missing-source", ["{tmp}/nowhere", "{dest}"], ["SOURCE=", "nowhere", "no such directory", "'digits'"]),
    ("source-without-class-folders", ["{flat}", "{dest}"], ["SOURCE=", "no class sub-folders", "one sub-folder per class"]),
    ("source-with-empty-class-folders", ["{empty_classes}", "{dest}"], ["SOURCE=", "no class sub-folders"]),
    ("dest-under-a-file", ["digits", "{file}/sub/out"], ["DEST", "regular file", "expected a directory"]),
    ("dest-is-a-file", ["digits", "{file}"], ["DEST", "is a regular file", "expected a directory"]),
    ("dest-unknown-protocol", ["digits", "nosuchproto://bucket/x"], ["DEST", "nosuchproto://bucket/x", "s3://bucket/prefix"]),
    ("dest-s3-refused", ["digits", "s3://bucket/x", "--endpoint-url", "http://127.0.0.1:{port}"],
     ["DEST", "s3://bucket/x", "cannot reach storage", "127.0.0.1"]),
]


@pytest.mark.parametrize("case_id, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_exits_2_with_one_message_and_writes_nothing(tmp_path, capsys, monkeypatch, case_id, argv, words):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"x")
    empty = tmp_path / "empty_classes"
    (empty / "cat").mkdir(parents=True)
    regular = tmp_path / "a_file"
    regular.write_text("x")
    fill = dict(dest=str(tmp_path / "out"), tmp=str(tmp_path), flat=str(flat), empty_classes=str(empty),
                file=str(regular), port=free_port())
    before = sorted(p for p in os.listdir(tmp_path))
    code = main([a.format(**fill) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, err
    for word in words:
        assert word.format(**fill) in message[0], message[0]
    assert "Traceback" not in out + err
    assert sorted(os.listdir(tmp_path)) == before  # no DEST (or anything else) appeared
    assert regular.read_text() == "x"


def test_missing_bucket_exits_2_and_creates_no_bucket(s3_server, capsys, monkeypatch, tmp_path):
    import s3fs

    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    code = main(["digits", "s3://no-such-bucket-xyz/digits", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bucket 'no-such-bucket-xyz' does not exist" in err and "Traceback" not in err
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    assert not fs.exists("no-such-bucket-xyz")


def test_maxcount_given_is_used_not_replaced_by_default(tmp_path, capsys):
    assert main(["digits", str(tmp_path / "out"), "--maxcount", "1000", "--no-progress"]) == 0
    assert "train: 2 shards" in capsys.readouterr().out
