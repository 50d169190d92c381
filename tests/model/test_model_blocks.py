"""Token mixing without activation copies, stochastic depth, dropout/eval behaviour, initialisation schemes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile
from torchvision.ops import StochasticDepth

from model import create_model, get_config
from model.mixer import LAYER_NORM_EPS, TokenMixingMlp, left_linear


def naive_token_mixing(mlp: TokenMixingMlp, x: torch.Tensor) -> torch.Tensor:
    """The textbook form: transpose (B, S, C) -> (B, C, S), Linear over S, transpose back."""
    return mlp.fc2(mlp.act(mlp.fc1(x.transpose(1, 2)))).transpose(1, 2)


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_token_mixing_equals_naive_transpose_form(gelu):
    torch.manual_seed(0)
    mlp = TokenMixingMlp(features=16, hidden=24, gelu=gelu, drop_rate=0.0)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    x = torch.randn(3, 16, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = mlp(x), naive_token_mixing(mlp, x_ref)
    assert out.shape == (3, 16, 40) and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *mlp.parameters()], grad_out)
    grads_ref = torch.autograd.grad(ref, [x_ref, *mlp.parameters()], grad_out)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)


def test_left_linear_under_autocast_matches_and_keeps_dtype():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 12), torch.randn(5, 8), torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = left_linear(x, w, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x.transpose(1, 2), w, b).transpose(1, 2), atol=0.1, rtol=0.02)


def test_token_mixing_makes_no_activation_copies():
    """No clone/contiguous of an activation-sized tensor in forward or backward (the naive form makes one)."""
    batch, tokens, channels = 4, 16, 40
    mlp = TokenMixingMlp(features=tokens, hidden=24, gelu="exact", drop_rate=0.0)
    x = torch.randn(batch, tokens, channels, requires_grad=True)

    def copies(fn):
        with profile(record_shapes=True) as prof:
            fn(x).sum().backward()
        return [
            (e.name, e.input_shapes)
            for e in prof.events()
            if e.name in ("aten::clone", "aten::contiguous") and any(len(s) == 3 for s in e.input_shapes)
        ]

    assert copies(lambda t: naive_token_mixing(mlp, t)), "the profiler should see the naive form's copy"
    assert copies(mlp) == []


def test_stochastic_depth_schedule_is_linear_per_block():
    model = create_model("mixer_tiny", depth=5, drop_path_rate=0.2)
    rates = [block.drop_path.p for block in model.blocks]
    assert all(isinstance(b.drop_path, StochasticDepth) and b.drop_path.mode == "row" for b in model.blocks)
    assert rates == pytest.approx([0.2 * i / 4 for i in range(5)])
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert [b.drop_path.p for b in create_model("mixer_tiny", depth=1, drop_path_rate=0.3).blocks] == [0.0]


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    drop = StochasticDepth(0.5, mode="row").train()
    out = drop(torch.ones(2000, 3, 4))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert 0.45 < (per_sample[:, 0] == 0).float().mean() < 0.55
    assert torch.equal(drop.eval()(torch.ones(3, 4)), torch.ones(3, 4))


def test_eval_is_deterministic_and_train_is_stochastic_with_regularisation():
    torch.manual_seed(0)
    model = create_model("mixer_tiny", drop_rate=0.2, head_drop_rate=0.3, drop_path_rate=0.5, init="timm")
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_layer_norm_eps_and_gelu_form():
    model = create_model("mixer_tiny", gelu="tanh")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * model.cfg.depth + 1
    assert all(m.eps == LAYER_NORM_EPS == 1e-6 for m in norms)
    assert model.blocks[0].mlp_tokens.act.approximate == "tanh"
    assert create_model("mixer_tiny").blocks[0].mlp_channels.act.approximate == "none"


def test_official_init_lecun_normal_zero_biases_zero_head():
    torch.manual_seed(0)
    model = create_model("mixer_tiny", hidden_dim=256, channels_mlp_dim=512)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name == "head.weight":
            assert torch.count_nonzero(p) == 0
        else:  # lecun normal: std sqrt(1/fan_in) after truncation at 2 std of the underlying normal
            fan_in = p[0].numel()
            std = math.sqrt(1 / fan_in)
            assert p.std().item() == pytest.approx(std, rel=0.06), name
            assert p.abs().max().item() <= 2 * std / 0.87962566 + 1e-6, name


def test_timm_init_scheme():
    torch.manual_seed(0)
    model = create_model("mixer_tiny", init="timm", hidden_dim=256, channels_mlp_dim=512)
    fc1 = model.blocks[0].mlp_channels.fc1
    bound = math.sqrt(6 / (fc1.in_features + fc1.out_features))  # xavier uniform
    assert fc1.weight.abs().max().item() <= bound
    assert fc1.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert 0 < fc1.bias.abs().max().item() < 1e-5  # N(0, 1e-6)
    assert torch.count_nonzero(model.stem.proj.bias) == 0
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0


@pytest.mark.parametrize("head_bias, expected", [(None, 0.0), (-2.5, -2.5), ("neg_log_k", -math.log(1000))])
def test_head_bias(head_bias, expected):
    cfg = get_config("mixer_tiny", num_classes=1000, head_bias=head_bias)
    assert cfg.resolved_head_bias == pytest.approx(expected)
    model = create_model("mixer_tiny", num_classes=1000, head_bias=head_bias)
    assert torch.allclose(model.head.bias, torch.full((1000,), expected))
    assert round(get_config("mixer_b16_224", head_bias="neg_log_k").resolved_head_bias, 1) == -6.9


def test_reset_classifier_reinitialises_and_updates_config():
    model = create_model("mixer_tiny", head_bias="neg_log_k")
    model.reset_classifier(5)
    assert model.cfg.num_classes == model.num_classes == 5
    assert model.head.weight.shape == (5, 64) and torch.count_nonzero(model.head.weight) == 0
    assert torch.allclose(model.head.bias, torch.full((5,), -math.log(5)))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_model_cfg_and_config_dict():
    cfg = get_config("mixer_digits")
    model = create_model("mixer_digits")
    assert model.cfg == cfg and model.cfg is not cfg
    assert cfg.num_tokens == 16 and cfg.grid_size == 4
    assert cfg.to_dict()["tokens_mlp_dim"] == 64
    assert type(cfg)(**cfg.to_dict()) == cfg
