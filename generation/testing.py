"""Helpers for tests and benchmarks that need real LoRA adapter files (not shipped code paths).

    write_lora(tiny_model_dir, adapters_dir / "pixel" / "v1.safetensors", seed=1)
    write_lora(tiny_model_dir, adapters_dir / "ink.safetensors", kohya=True)
    write_lora(tiny_model_dir, adapters_dir / "clip.safetensors", text_encoder=True)  # + text-encoder layers

The adapter is a real peft LoRA on the UNet's attention projections with random, non-zero
weights (a freshly initialised LoRA is a no-op, which would make "the adapter changes the
image" impossible to test), saved as safetensors in the diffusers layout or in the kohya/A1111
layout that Civitai files use.
"""

from __future__ import annotations

import os
from pathlib import Path

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_state_dict(model_dir: str | os.PathLike, seed: int = 0, rank: int = 4, scale: float = 0.5,
                    component: str = "unet") -> dict:
    """A random LoRA for the UNet (or "text_encoder") at `model_dir`, as peft state-dict keys (no prefix)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    if component == "unet":
        model = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, init_lora_weights=False))
    else:
        # peft directly: transformers' own add_adapter asks for a newer peft than the one installed here
        model = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGET_MODULES, init_lora_weights=False),
            CLIPTextModel.from_pretrained(Path(model_dir) / component))
    generator = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(model)
    return {key: (torch.randn(value.shape, generator=generator) * scale).contiguous() for key, value in state.items()}


def write_lora(
    model_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    rank: int = 4,
    kohya: bool = False,
    text_encoder: bool = False,
    description: str = "",
    base_model: str = "tiny",
) -> Path:
    """Write a random LoRA for the tiny (or any SD 1.x) UNet to `path`; returns the path.

    `text_encoder` adds LoRA layers on the text encoder's attention too (diffusers layout only).
    """
    import torch
    from safetensors.torch import save_file

    if kohya and text_encoder:
        raise ValueError("text_encoder layers are written in the diffusers layout only")
    state = lora_state_dict(model_dir, seed=seed, rank=rank)
    if kohya:
        tensors = {}
        for key, value in state.items():
            module, _, kind = key.rpartition(".lora_")  # "down_blocks.1...to_q", "A.weight"
            prefix = "lora_unet_" + module.replace(".", "_")
            tensors[f"{prefix}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    else:
        tensors = {f"unet.{key}": value for key, value in state.items()}
        if text_encoder:
            text_state = lora_state_dict(model_dir, seed=seed, rank=rank, component="text_encoder")
            tensors.update({f"text_encoder.{key}": value for key, value in text_state.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"base_model": base_model}
    if description:
        metadata["description"] = description
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
