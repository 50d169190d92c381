"""The MLP-Mixer family in plain PyTorch: config, modules, registry, accounting, checkpoint import, resolution.

    from model import create_model, count_params, get_config
    model = create_model("mixer_b16_224", num_classes=10)
    count_params(get_config("mixer_b16_224"))  # 59,880,472

Smoke demo: python -m model --name mixer_digits
"""

from model.accounting import count_params, forward_flops, forward_macs, train_flops_per_image
from model.config import MixerConfig
from model.jax_checkpoint import NpzImport, infer_config_from_npz, load_npz
from model.mixer import MlpMixer
from model.registry import create_model, get_config, list_models, official_data_config, pretrained_data_config
from model.resolution import adapt_resolution
from model.state_dict_loading import load_state_dict_checked

__all__ = [
    "MixerConfig",
    "MlpMixer",
    "NpzImport",
    "adapt_resolution",
    "count_params",
    "create_model",
    "forward_flops",
    "forward_macs",
    "get_config",
    "infer_config_from_npz",
    "list_models",
    "load_npz",
    "load_state_dict_checked",
    "official_data_config",
    "pretrained_data_config",
    "train_flops_per_image",
]
