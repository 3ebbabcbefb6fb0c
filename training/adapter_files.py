"""Adapter files: the one place a trained LoRA is written to disk, and where its provenance is read back.

    save_adapter(unet, lora_config, run_dir, provenance, kohya=True)  # adapter.safetensors (+ the kohya copy)
    read_provenance(run_dir / ADAPTER_FILE)                           # {"dataset_hash": ..., "steps": 800, ...}

adapter.safetensors is the diffusers LoRA format (`pipe.load_lora_weights` loads it): the PEFT
state dict, the LoRA config (so diffusers rebuilds alpha), the run's provenance as `loraloop.*`
keys and the plain `base_model`/`description` keys the service's adapter list shows
(generation/adapters.py). adapter.kohya.safetensors is the same weights for A1111 and ComfyUI.
Each file is written to a hidden temp file and renamed into place, so no reader sees half of one.

Floor: part of training/; imports only safetensors at module level, so publishing and listing
adapters (which only read) start in a fraction of a second. torch, diffusers and peft are imported
when an adapter is written, during training, when they are loaded already.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

ADAPTER_FILE = "adapter.safetensors"
KOHYA_FILE = "adapter.kohya.safetensors"
# Provenance keys in an adapter's metadata start with this; values that are not strings are JSON.
PROVENANCE_PREFIX = "loraloop."


def lora_state_dict(unet: Any) -> dict[str, Any]:
    """The LoRA weights of a UNet with an adapter, as contiguous fp32 CPU tensors (what every file stores)."""
    from peft import get_peft_model_state_dict  # written during training only, see the module docstring

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_adapter(unet: Any, lora_config: Any, directory: Path, provenance: dict[str, Any], kohya: bool) -> Path:
    """Write adapter.safetensors that `pipe.load_lora_weights` loads, provenance in its metadata (atomically)."""
    from diffusers import StableDiffusionPipeline  # written during training only, see the module docstring
    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True, exist_ok=True)
    peft_state = lora_state_dict(unet)
    tmp = directory / f".{ADAPTER_FILE}.tmp{os.getpid()}"
    # The adapter config travels in the metadata so diffusers rebuilds alpha (which need not equal rank).
    # Keys stay in PEFT's lora_A/lora_B form: convert_state_dict_to_diffusers renames only attention
    # layers (to the old lora.down form), and diffusers' loader, seeing a lora_A key first, then skips
    # every renamed one, so an adapter on attention + resnet/proj would load without its attention part.
    StableDiffusionPipeline.save_lora_weights(
        str(directory), unet_lora_layers=peft_state,
        weight_name=tmp.name, unet_lora_adapter_metadata=lora_config.to_dict(),
    )
    with safe_open(str(tmp), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata.update(_provenance_metadata(provenance))
    # The plain keys the service's adapter list shows (generation/adapters.py).
    metadata["base_model"] = str(provenance.get("base_model", ""))
    metadata["description"] = (f"{provenance.get('objective', '')} LoRA, rank {provenance.get('rank')}, "
                               f"{provenance.get('steps')} steps on {Path(str(provenance.get('dataset', ''))).name}")
    save_file(load_file(tmp), tmp, metadata=metadata)
    os.replace(tmp, directory / ADAPTER_FILE)
    if kohya:
        _save_kohya_copy(peft_state, lora_config, directory, provenance)
    return directory / ADAPTER_FILE


def _save_kohya_copy(peft_state: dict[str, Any], lora_config: Any, directory: Path,
                     provenance: dict[str, Any]) -> Path:
    """adapter.kohya.safetensors: the same weights under A1111's lora_unet_* keys, with the real alpha."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya_state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    # diffusers writes alpha = rank here; ours may differ, and A1111 scales by alpha/rank.
    for key in kohya_state:
        if key.endswith(".alpha"):
            kohya_state[key] = kohya_state[key].new_tensor(float(lora_config.lora_alpha))
    kohya_meta = {"ss_network_dim": str(lora_config.r), "ss_network_alpha": str(lora_config.lora_alpha),
                  **_provenance_metadata(provenance)}
    kohya_tmp = directory / f".{KOHYA_FILE}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in kohya_state.items()}, kohya_tmp, metadata=kohya_meta)
    os.replace(kohya_tmp, directory / KOHYA_FILE)
    return directory / KOHYA_FILE


def _provenance_metadata(provenance: dict[str, Any]) -> dict[str, str]:
    """Provenance as safetensors metadata, which holds strings only."""
    return {f"{PROVENANCE_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in provenance.items()}


def read_provenance(adapter: Path) -> dict[str, Any]:
    """The loraloop.* metadata of an adapter file, values decoded."""
    with safe_open(str(adapter), framework="pt") as handle:
        metadata = handle.metadata() or {}
    out = {}
    for key, value in metadata.items():
        if key.startswith(PROVENANCE_PREFIX):
            try:
                out[key[len(PROVENANCE_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(PROVENANCE_PREFIX):]] = value
    return out
