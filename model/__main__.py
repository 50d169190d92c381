"""Smoke demo: python -m model [--name mixer_digits] [--batch-size 8] [key=value ...]

Prints the resolved config, parameter count, GFLOPs per image and one CPU forward pass's output shape and time.
"""

from __future__ import annotations

import argparse
import ast
import time

import torch

from model import count_params, create_model, forward_flops, list_models, train_flops_per_image


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise SystemExit(f"override {text!r} is not key=value (e.g. depth=2)")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mixer_digits", choices=list_models())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. depth=2 num_classes=10")
    args = parser.parse_args(argv)

    try:
        model = create_model(args.name, **dict(_parse_override(o) for o in args.overrides)).eval()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    cfg = model.cfg
    print(f"{args.name}: {cfg.to_dict()}")
    print(f"params        {count_params(cfg):,} ({count_params(cfg, include_head=False):,} without head)")
    print(f"GFLOPs/image  {forward_flops(cfg) / 1e9:.3f} forward, {train_flops_per_image(cfg) / 1e9:.3f} training")
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.inference_mode():
        model(x)  # warm-up
        start = time.perf_counter()
        logits = model(x)
        elapsed = time.perf_counter() - start
    print(f"forward       {tuple(x.shape)} -> {tuple(logits.shape)} in {elapsed * 1e3:.1f} ms on CPU")


if __name__ == "__main__":
    main()
