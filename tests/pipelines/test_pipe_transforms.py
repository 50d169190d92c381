"""Transforms (paper recipe, digits preset) and batch mixup."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from pipelines.mixup import mixup_batch, one_hot_smoothed
from pipelines.transforms import (
    OneImage,
    decode_image,
    decode_image_pil,
    eval_transform,
    make_transform,
    train_pipeline,
)


def _img(h=40, w=56):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("impl", ["torchvision", "big_vision"])
def test_inception_shapes_and_range(training, impl):
    tf = make_transform(training, input_size=32, randaug_magnitude=15, randaug_impl=impl)
    y = tf(_img())
    assert y.shape == (3, 32, 32) and y.dtype == torch.float32
    assert y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6
    kinds = {type(t) for t in tf.transforms}
    if training:
        randaug = v2.RandAugment if impl == "torchvision" else OneImage
        assert {v2.RandomResizedCrop, v2.RandomHorizontalFlip, randaug} <= kinds
        assert (v2.RandAugment in kinds) == (impl == "torchvision")  # big_vision's is the paper's, not torchvision's
    else:
        assert {v2.Resize, v2.CenterCrop} <= kinds and v2.RandomHorizontalFlip not in kinds


def test_randaugment_skipped_without_magnitude():
    assert v2.RandAugment not in {type(t) for t in make_transform(True, input_size=16).transforms}
    assert OneImage not in {type(t) for t in make_transform(True, input_size=16).transforms}
    assert train_pipeline(input_size=16).batch_stage.randaug is None


def test_eval_deterministic_and_crop_pct():
    tf = make_transform(False, input_size=32, crop_pct=0.875)
    assert torch.equal(tf(_img()), tf(_img()))
    assert tf.transforms[0].size == [37]


def test_digits_preset_no_flip():
    tf = make_transform(True, input_size=16, preset="digits")
    assert all(not isinstance(t, v2.RandomHorizontalFlip) for t in tf.transforms)
    assert tf(_img(8, 8)).shape == (3, 16, 16)


def test_decoders_agree():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_img().permute(1, 2, 0).numpy()).save(buf, format="PNG")
    assert torch.equal(decode_image(buf.getvalue()), decode_image_pil(buf.getvalue()))
    with pytest.raises(RuntimeError):
        decode_image(b"not an image")


def test_mixup():
    x = torch.randn(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    xi, t = mixup_batch(x, y, 10, 0.0, torch.Generator().manual_seed(0), label_smoothing=0.1)
    assert xi is x and torch.allclose(t, one_hot_smoothed(y, 10, 0.1))
    assert torch.allclose(t.sum(1), torch.ones(6)) and abs(t.max().item() - 0.91) < 1e-6
    a = mixup_batch(x, y, 10, 0.5, torch.Generator().manual_seed(1))
    b = mixup_batch(x, y, 10, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lam = a[1][0, 0].item()  # sample 0 mixed with sample 5 (batch rolled by one)
    assert torch.allclose(a[0][0], lam * x[0] + (1 - lam) * x[5], atol=1e-6)
    assert abs(a[1][0, 5].item() - (1 - lam)) < 1e-6
    lams = {round(mixup_batch(x, y, 10, 0.5, torch.Generator().manual_seed(s))[1][0, 0].item(), 6) for s in range(5)}
    assert len(lams) > 1


@pytest.mark.parametrize("preset", ["inception", "digits"])
def test_eval_transform_from_a_models_data_config(preset):
    """Training's validation and orchestrator.evaluate build their transform here: same pixels as the recipe."""
    cfg = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear", crop_pct=0.9)
    got = eval_transform(cfg, input_size=24, preset=preset)
    want = make_transform(False, input_size=24, preset=preset, **cfg)
    x = _img()
    assert torch.equal(got(x), want(x))
    assert [type(t) for t in got.transforms] == [type(t) for t in want.transforms]
