"""Where the recipe runs: ``augment_on`` host vs device and ``decode_on`` device, through the real ShardLoader.

The device here is the CPU (the training device of a CPU run); the CUDA variants run where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch
from shard_samples import jpeg_bytes, jpeg_members, make_dataset

from pipelines.loader import ShardLoader
from pipelines.transforms import train_pipeline

SIZE = 32


def _loader(root, placement, device="cpu", **kw):
    p = train_pipeline(input_size=SIZE, randaug_magnitude=15, decode_on="device" if placement == "decode" else "host")
    args = dict(batch_size=8, num_workers=1, seed=3, mixup=0.5, num_classes=10, shuffle_buffer=16, return_keys=True)
    args.update(kw)
    return ShardLoader(root, decoder=p.decoder, transform=p.transform, batch_stage=p.batch_stage,
                       augment_on="host" if placement == "host" else "device", device=device,
                       decode_crop_on_device=p.decode_crop_on_device, **args)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("jpegs"))
    make_dataset(root, [20, 20], jpeg=True)
    return root


def _batches(loader):
    return [(x.clone(), t.clone(), keys) for x, t, keys in loader]


def test_host_and_device_placements_give_the_same_batches(jpeg_root):
    host, device = _batches(_loader(jpeg_root, "host")), _batches(_loader(jpeg_root, "device"))
    assert len(host) == len(device) == 5
    for (xh, th, kh), (xd, td, kd) in zip(host, device, strict=True):
        assert kh == kd
        assert xh.dtype == xd.dtype == torch.float32 and xh.shape == (8, 3, SIZE, SIZE)
        assert torch.equal(xh, xd) and torch.equal(th, td)
    # the recipe did something: RandAugment + mixup moved pixels away from a plain crop's value range
    assert not torch.equal(host[0][0], host[1][0])


def test_device_placement_hands_over_uint8_crops_with_per_image_draws(jpeg_root, monkeypatch):
    loader = _loader(jpeg_root, "device")
    seen = []
    inner = loader._device_stage

    def spy(images, labels, meta):
        seen.append((images.dtype, tuple(images.shape), {k: tuple(v.shape) for k, v in meta["draws"].items()}))
        return inner(images, labels, meta)

    monkeypatch.setattr(loader, "_device_stage", spy)
    out = _batches(loader)
    assert len(seen) == len(out) == 5
    for dtype, shape, draws in seen:
        assert dtype == torch.uint8 and shape == (8, 3, SIZE, SIZE)  # a quarter of float32's bytes
        assert draws == {"ops": (8, 2), "signs": (8, 2), "centers": (8, 2, 2)}


@pytest.mark.parametrize("placement", ["host", "device", "decode"])
def test_resume_mid_epoch_sees_the_same_augmented_pixels(jpeg_root, placement):
    whole = _batches(_loader(jpeg_root, placement))
    first = _loader(jpeg_root, placement)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    second = _loader(jpeg_root, placement)
    second.load_state_dict(state)
    rest = _batches(second)
    assert len(head) + len(rest) == len(whole)
    for (x, t, k), (xw, tw, kw) in zip([*head, *rest], whole, strict=True):
        assert k == kw and torch.equal(x, xw) and torch.equal(t, tw)


def test_device_decode_matches_the_host_decode(jpeg_root):
    """Same crops, flips and RandAugment draws; the pixels differ only by the decoders' rounding."""
    host, dec = _batches(_loader(jpeg_root, "device")), _batches(_loader(jpeg_root, "decode"))
    for (xh, th, kh), (xd, td, kd) in zip(host, dec, strict=True):
        assert kh == kd and torch.equal(th, td)
        assert (xh - xd).abs().mean() < 0.02  # normalised units: 2.5 levels of 255


def test_device_decode_counts_corrupt_images_like_the_host(tmp_path):
    members = jpeg_members(0, 16)
    good = jpeg_bytes(7)
    members[2] = (members[2][0], b"not an image at all")  # header unreadable: found on the host
    members[6] = (members[6][0], good[: len(good) // 3])  # header fine, data cut: found by the decoder
    root = str(tmp_path / "bad")
    make_dataset(root, [16], bad={0: members}, jpeg=True)
    for placement, batch_sizes in (("device", [8, 8]), ("decode", [7, 8])):
        loader = _loader(root, placement, max_bad_fraction=0.5, num_workers=0)
        sizes = [x.shape[0] for x, _, _ in loader]
        counts = loader.bad_sample_counts()
        assert sum(counts["corrupt_image"].values()) == 2, (placement, counts)
        # the host refills its batch (the epoch is padded to its planned batches); the device drops what it rejects
        assert sorted(sizes) == batch_sizes, placement


def test_loader_placement_arguments_are_checked(jpeg_root):
    with pytest.raises(ValueError, match="augment_on must be one of"):
        ShardLoader(jpeg_root, batch_size=4, augment_on="gpu")
    with pytest.raises(ValueError, match="needs a batch_stage"):
        ShardLoader(jpeg_root, batch_size=4, augment_on="device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("placement", ["device", "decode"])
def test_cuda_placements_agree_with_the_host(jpeg_root, placement):
    host = _batches(_loader(jpeg_root, "host"))
    cuda = _batches(_loader(jpeg_root, placement, device="cuda", pin_memory=True))
    for (xh, th, kh), (xc, tc, kc) in zip(host, cuda, strict=True):
        assert kh == kc and xc.device.type == "cuda"
        assert torch.allclose(th, tc.cpu())
        assert (xh - xc.cpu()).abs().mean() < 0.02
