"""model.load_npz on files that are not a usable .npz: always NpzError naming the file and the problem."""

import io
import zipfile

import numpy as np
import pytest

from model import load_npz
from model.jax_checkpoint import NpzError


def _good_npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"head/kernel": np.arange(64, dtype=np.float32).reshape(8, 8), "head/bias": np.zeros(8)})
    return buf.getvalue()


def _bit_flipped() -> bytes:
    data = bytearray(_good_npz_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo("head/kernel.npy")
    data[info.header_offset + 30 + len(info.filename) + 100] ^= 0x01  # inside the member's array data
    return bytes(data)


def _plain_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(4))
    return buf.getvalue()


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "is empty"),
        (_good_npz_bytes()[:200], "damaged or truncated"),
        (np.random.default_rng(0).bytes(4096), "no zip signature"),
        (_bit_flipped(), "damaged"),
        (_plain_npy(), "single .npy array"),
    ],
    ids=["empty", "truncated", "random-bytes", "bit-flipped-member", "plain-npy"],
)
def test_bad_npz_file_is_one_error_naming_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "Mixer-B_16.npz"
    path.write_bytes(content)
    with pytest.raises(NpzError) as info:
        load_npz(path)
    message = str(info.value)
    assert str(path) in message and problem in message
    assert "pickle=True" not in message  # never numpy's advice to load it with pickle
    assert isinstance(info.value, ValueError)


def test_missing_npz_file_is_npz_error(tmp_path):
    with pytest.raises(NpzError, match="cannot be read"):
        load_npz(tmp_path / "absent.npz")


def test_layout_error_names_the_file(tmp_path):
    path = tmp_path / "headless.npz"
    np.savez(path, **{"stem/kernel": np.zeros((4, 4, 3, 8), np.float32)})
    with pytest.raises(NpzError, match=r"headless\.npz.*head/kernel.*missing"):
        load_npz(path)
