"""Every bad input raises ValueError naming the field or key, the bad value and what would be accepted."""

import re

import pytest
import torch

from model import MixerConfig, adapt_resolution, create_model, get_config, pretrained_data_config

BASE = dict(img_size=32, patch_size=8, depth=2, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)


@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("img_size", 0, "positive integer"),
        ("patch_size", -4, "positive integer"),
        ("depth", 2.5, "positive integer"),
        ("depth", True, "positive integer"),
        ("hidden_dim", "64", "positive integer"),
        ("tokens_mlp_dim", 0, "positive integer"),
        ("channels_mlp_dim", 8.0, "positive integer"),
        ("in_chans", 0, "positive integer"),
        ("num_classes", -1, "positive integer"),
        ("img_size", 30, "multiple of 8"),
        ("drop_rate", 1.0, "[0, 1)"),
        ("head_drop_rate", -0.1, "[0, 1)"),
        ("drop_path_rate", 1.5, "[0, 1)"),
        ("drop_path_rate", "0.1", "[0, 1)"),
        ("gelu", "relu", "['exact', 'tanh']"),
        ("init", "xavier", "['official', 'timm']"),
        ("head_bias", "neg_log", "neg_log_k"),
        ("head_bias", float("nan"), "finite number"),
    ],
)
def test_config_validation_names_field_value_and_accepted(field, value, accepted):
    with pytest.raises(ValueError) as err:
        MixerConfig(**{**BASE, field: value}).validate()
    message = str(err.value)
    assert field in message and repr(value) in message and accepted in message, message
    with pytest.raises(ValueError, match=re.escape(field)):  # the registry path validates too
        get_config("mixer_tiny", **{field: value})


def test_unknown_model_name_lists_valid_names():
    for call in (get_config, create_model, pretrained_data_config):
        with pytest.raises(ValueError, match=r"'mixer_b17_224'.*mixer_b16_224.*mixer_digits"):
            call("mixer_b17_224")


def test_unknown_override_lists_accepted_keys():
    with pytest.raises(ValueError, match=r"'hidden_size'.*768.*hidden_dim.*tokens_mlp_dim.*drop_path_rate"):
        get_config("mixer_b16_224", hidden_size=768)


def test_wrong_input_image_size_is_named():
    model = create_model("mixer_tiny")
    with pytest.raises(ValueError, match=r"\(48, 48\).*img_size=32"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("new_size", [48, 40, 16])
def test_non_integer_resolution_factor(new_size):
    model = create_model("mixer_tiny")
    with pytest.raises(ValueError, match=rf"resolution factor.*{new_size}/32.*not an integer.*\[32, 64, 96"):
        adapt_resolution(model, new_size)


@pytest.mark.parametrize("new_size", [0, 64.0, "64"])
def test_bad_resolution_value(new_size):
    with pytest.raises(ValueError, match=rf"new_img_size={re.escape(repr(new_size))}.*positive integer"):
        adapt_resolution(create_model("mixer_tiny"), new_size)
