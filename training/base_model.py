"""What training and import know about a base model before any of its weights load: its native size.

    native_resolution("tiny")                                           # 64
    native_resolution("stable-diffusion-v1-5/stable-diffusion-v1-5")    # 512
    resolve_resolution("auto", "/models/sd21")                          # 768, from its config files

A model's native size is its VAE's scale (2 to the number of its down blocks less one) times its
UNet's sample size: 64 for the tiny model (one halving, 32), 512 for SD 1.5, 768 for SD 2.1-v,
1024 for SDXL. `[training] resolution = "auto"` means that size, for training, `dataset import`
and anything else that resizes images for training: a tiny-model run at SD's 512 spends a minute
a step on pixels its UNet never saw.

Floor: part of training/; the standard library and huggingface_hub (for a hub id's two config
files), `loraloop.tiny` for the tiny model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraloop.tiny import TINY_IMAGE_SIZE, TINY_MODEL_NAME, TINY_SDXL_NAME

AUTO = "auto"


class BaseModelError(Exception):
    """A base model whose native size cannot be read; the message says what to set instead."""


def _sizes_from(unet_config: dict, vae_config: dict) -> int:
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def native_resolution(model: str) -> int:
    """The native size of `model`: "tiny" or "tiny-sdxl", a diffusers directory, or a hub id (its two config files)."""
    if model in (TINY_MODEL_NAME, TINY_SDXL_NAME):
        return TINY_IMAGE_SIZE
    path = Path(model).expanduser()
    hint = ("; set [training] resolution (512 for SD 1.5, 768 for SD 2.x, 1024 for SDXL) "
            "or --resolution")
    if path.is_file():
        raise BaseModelError(f"{model}: the native size of a single-file checkpoint is not written in it{hint}")
    try:
        if path.is_dir():
            configs = [json.loads((path / part / "config.json").read_text()) for part in ("unet", "vae")]
        else:
            from huggingface_hub import hf_hub_download

            configs = [json.loads(Path(hf_hub_download(model, f"{part}/config.json")).read_text())
                       for part in ("unet", "vae")]
        return _sizes_from(*configs)
    except Exception as exc:  # noqa: BLE001  a missing file, a network failure, a config without the keys: one answer
        raise BaseModelError(f"cannot read the native size of base model {model} ({exc}){hint}") from None


def resolve_resolution(setting: int | str, model: str) -> int:
    """`[training] resolution` as a number of pixels: itself, or the model's native size for "auto"."""
    return native_resolution(model) if setting == AUTO else int(setting)
