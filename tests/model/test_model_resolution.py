"""App. C resolution change: the adapted model on a K x K tiling of an image gives the original's logits."""

import pytest
import torch

from model import adapt_resolution, create_model
from model.resolution import part_major_token_order


def random_model(**overrides):
    torch.manual_seed(0)
    model = create_model("mixer_tiny", img_size=16, patch_size=4, hidden_dim=24, tokens_mlp_dim=10, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def pre_logits(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_part_major_token_order():
    # K=2, g=2: grid 4x4. Part (0,0) holds tokens 0,1,4,5; part (0,1) 2,3,6,7; part (1,0) 8,9,12,13; ...
    assert part_major_token_order(2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert sorted(part_major_token_order(3, 4).tolist()) == list(range(144))


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_adapted_model_on_tiled_image_gives_original_logits(factor, gelu):
    model = random_model(gelu=gelu)
    adapted = adapt_resolution(model, 16 * factor)
    cfg = adapted.cfg
    assert (cfg.img_size, cfg.num_tokens, cfg.tokens_mlp_dim) == (16 * factor, 16 * factor**2, 10 * factor**2)
    assert adapted.blocks[0].mlp_tokens.fc1.weight.shape == (10 * factor**2, 16 * factor**2)
    assert not adapted.training
    x = torch.randn(2, 3, 16, 16)
    tiled = x.repeat(1, 1, factor, factor)
    with torch.no_grad():
        torch.testing.assert_close(adapted(tiled), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pre_logits(adapted, tiled), pre_logits(model, x), atol=1e-5, rtol=1e-5)
    assert model.cfg.img_size == 16  # the source model is left as it was


def test_each_part_is_token_mixed_independently():
    """On a generic image, every K x K part's token-MLP output equals the original MLP on that part alone."""
    model = random_model()
    adapted = adapt_resolution(model, 32)
    tokens = torch.randn(1, 64, 24)  # (B, S', C) on the 8 x 8 grid
    with torch.no_grad():
        mixed = adapted.blocks[0].mlp_tokens(tokens).view(1, 8, 8, 24)
        grid = tokens.view(1, 8, 8, 24)
        for pi in range(2):
            for pj in range(2):
                part = grid[:, pi * 4:(pi + 1) * 4, pj * 4:(pj + 1) * 4].reshape(1, 16, 24)
                expected = model.blocks[0].mlp_tokens(part).view(1, 4, 4, 24)
                torch.testing.assert_close(mixed[:, pi * 4:(pi + 1) * 4, pj * 4:(pj + 1) * 4], expected, atol=1e-5, rtol=0)


def test_factor_one_is_a_copy_and_other_weights_are_kept():
    model = random_model()
    same = adapt_resolution(model, 16)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), same.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    bigger = adapt_resolution(model, 32)
    for key, value in model.state_dict().items():
        if "mlp_tokens" not in key:
            assert torch.equal(bigger.state_dict()[key], value), key
