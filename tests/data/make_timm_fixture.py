"""Generate tests/data/timm_mixer_fixture.pt: a small timm MlpMixer's weights, an input and timm's outputs.

Run once (timm is not a project dependency; it lives in a throwaway target directory):

    pip install --target /tmp/timm_site --no-deps timm==1.0.31 huggingface_hub safetensors
    PYTHONPATH=/tmp/timm_site .venv/bin/python tests/data/make_timm_fixture.py

Model: timm.models.mlp_mixer.MlpMixer(img_size=32, patch_size=8, in_chans=3, num_blocks=2, embed_dim=32,
mlp_ratio=(0.75, 2.0) -> tokens_mlp_dim 24 and channels_mlp_dim 64, num_classes=10), exact GELU (timm's default),
every parameter (biases, LayerNorm affine and the head included) overwritten with seeded random values.
Saved as a plain dict of tensors/ints/strings so it loads with torch.load(weights_only=True).
"""

from pathlib import Path

import timm
import torch
from timm.models.mlp_mixer import MlpMixer

OUT = Path(__file__).with_name("timm_mixer_fixture.pt")
CONFIG = dict(
    img_size=32, patch_size=8, in_chans=3, depth=2, hidden_dim=32, tokens_mlp_dim=24, channels_mlp_dim=64,
    num_classes=10, gelu="exact",
)


def main() -> None:
    torch.manual_seed(0)
    model = MlpMixer(
        num_classes=10, img_size=32, in_chans=3, patch_size=8, num_blocks=2, embed_dim=32, mlp_ratio=(0.75, 2.0)
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 4
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    fixture = {
        "timm_version": timm.__version__,
        "config": CONFIG,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "input": x,
        "pre_logits": pre_logits,
        "logits": logits,
    }
    torch.save(fixture, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes), timm {timm.__version__}, logits[0,:3]={logits[0, :3].tolist()}")


if __name__ == "__main__":
    main()
