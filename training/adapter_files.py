"""Adapter files: the one place a trained LoRA is written to disk, and where its provenance is read back.

    save_adapter(unet, lora_config, run_dir, provenance)     # adapter.safetensors and adapter.kohya.safetensors
    copy_adapter(run_dir / "best", run_dir)                  # both files of another directory, into place
    write_a1111_copy(run_dir / KOHYA_FILE, target, "fox@2")  # the kohya copy as A1111 names it
    read_provenance(run_dir / ADAPTER_FILE)                  # {"dataset_hash": ..., "steps": 800, ...}

A directory of adapter files always holds both, written from the same weights:

- adapter.safetensors, the diffusers LoRA format (`pipe.load_lora_weights` loads it): the PEFT
  state dict, the LoRA config (so diffusers rebuilds alpha), the run's provenance as `loraloop.*`
  keys and the plain `base_model`/`description` keys the service's adapter list shows
  (generation/adapters.py);
- adapter.kohya.safetensors, the same weights under kohya's `lora_unet_*` keys with the real
  alpha, for AUTOMATIC1111, Forge and ComfyUI, with the metadata they read: `ss_output_name` (the
  name A1111 lists it under), `ss_network_dim`/`ss_network_alpha`, `ss_base_model_version`/`ss_v2`
  and `modelspec.architecture` (SD 1.x, SD 2.x 512 or 768-v, SDXL, from the UNet's config). SDXL's
  keys use the SGM UNet's names (`lora_unet_input_blocks_4_1_...`), as kohya's SDXL trainer writes them.

Both carry `sshs_model_hash`, A1111's hash of the file (loraloop/hashes.py): the sha256 of the
bytes after the header, so changing metadata later (as publishing does) keeps it true. Each file
is written to a hidden temp file and renamed into place, so no reader sees half of one.

Floor: part of training/; imports safetensors and loraloop.hashes at module level, so publishing
and listing adapters (which only read, or rewrite a header) start in a fraction of a second.
torch, diffusers and peft are imported when an adapter is written, during training, when they
are loaded already.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from loraloop.hashes import MODEL_HASH_KEY, safetensors_data_sha256

ADAPTER_FILE = "adapter.safetensors"
KOHYA_FILE = "adapter.kohya.safetensors"
# Provenance keys in an adapter's metadata start with this; values that are not strings are JSON.
PROVENANCE_PREFIX = "loraloop."


@dataclass(frozen=True)
class BaseModelFamily:
    """What kohya's metadata calls a base model: A1111 and ComfyUI sort and check LoRAs by it."""

    ss_base_model_version: str  # "sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"
    ss_v2: bool
    architecture: str  # modelspec.architecture without "/lora"


SD1 = BaseModelFamily("sd_v1", False, "stable-diffusion-v1")
SD2_512 = BaseModelFamily("sd_v2", True, "stable-diffusion-v2-512")
SD2_768_V = BaseModelFamily("sd_v2_v", True, "stable-diffusion-v2-768-v")
SDXL = BaseModelFamily("sdxl_base_v1-0", False, "stable-diffusion-xl-v1-base")


def base_model_family(unet_config: Any) -> BaseModelFamily:
    """The family of a UNet, from its config: SDXL's size conditioning, SD 2.x's 1024-wide text
    embeddings (96x96 latents: the 768 px v-prediction model), else SD 1.x (the tiny model too)."""
    config = dict(unet_config)
    if config.get("addition_embed_type") == "text_time":
        return SDXL
    if config.get("cross_attention_dim") == 1024:
        return SD2_768_V if config.get("sample_size") == 96 else SD2_512
    return SD1


def lora_state_dict(unet: Any) -> dict[str, Any]:
    """The LoRA weights of a UNet with an adapter, as contiguous fp32 CPU tensors (what every file stores)."""
    from peft import get_peft_model_state_dict  # written during training only, see the module docstring

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_adapter(unet: Any, lora_config: Any, directory: Path, provenance: dict[str, Any]) -> Path:
    """Write adapter.safetensors (which `pipe.load_lora_weights` loads) and its kohya copy, provenance in both."""
    from diffusers import StableDiffusionPipeline  # written during training only, see the module docstring
    from safetensors.torch import load_file

    directory.mkdir(parents=True, exist_ok=True)
    peft_state = lora_state_dict(unet)
    tmp = directory / f".{ADAPTER_FILE}.diffusers{os.getpid()}"
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
    tensors = load_file(tmp)
    tmp.unlink()
    adapter = _write(tensors, directory / ADAPTER_FILE, metadata)
    _save_kohya_copy(peft_state, lora_config, unet.config, directory, provenance)
    return adapter


_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
# Inside a resnet the SGM UNet numbers its layers in Sequentials: in_layers = (norm, SiLU, conv), ...
_SGM_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
                     "time_emb_proj": "emb_layers.1"}


def sgm_module_path(path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path as Stability's SGM UNet names it, the names kohya writes for SDXL.

    down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in and up_blocks.0.resnets.2.conv1 ->
    output_blocks.2.0.in_layers.2 for SDXL's 2 layers per block: each input level holds
    `layers_per_block` resnet(+attention) rows after conv_in, then its downsampler; each output level
    one row more. diffusers' own loader maps these back (`_maybe_map_sgm_blocks_to_diffusers`).
    Only the layers `loraloop train` can target (attention, proj, resnet convs) are mapped.
    """
    if match := _BLOCK_RE.match(path):
        kind, level, part, index, rest = match.groups()
        row = (1 + int(level) * (layers_per_block + 1) + int(index) if kind == "down_blocks"
               else int(level) * (layers_per_block + 1) + int(index))
        prefix = f"{'input_blocks' if kind == 'down_blocks' else 'output_blocks'}.{row}"
    elif match := _MID_RE.match(path):
        part, index, rest = match.groups()
        prefix = f"middle_block.{1 if part == 'attentions' else 2 * int(index)}"
    else:
        raise ValueError(f"no SGM name for UNet module {path}")
    if part == "attentions":
        return f"{prefix}.1.{rest}" if prefix.startswith(("input", "output")) else f"{prefix}.{rest}"
    if rest not in _SGM_RESNET_PARTS:
        raise ValueError(f"no SGM name for UNet module {path}")
    inner = _SGM_RESNET_PARTS[rest]
    return f"{prefix}.0.{inner}" if prefix.startswith(("input", "output")) else f"{prefix}.{inner}"


def _save_kohya_copy(peft_state: dict[str, Any], lora_config: Any, unet_config: Any, directory: Path,
                     provenance: dict[str, Any]) -> Path:
    """adapter.kohya.safetensors: the same weights under A1111's lora_unet_* keys, with the real alpha.

    SD 1.x and 2.x keep diffusers' module names (kohya trains those on the diffusers UNet); SDXL
    takes the SGM names kohya's SDXL trainer writes (`sgm_module_path`).
    """
    from diffusers.utils import convert_state_dict_to_kohya

    family = base_model_family(unet_config)
    if family is SDXL:
        layers = int(dict(unet_config)["layers_per_block"])
        renamed = {}
        for key, value in peft_state.items():
            module, _, weight = key.rpartition(".lora_")  # "down_blocks.1...to_q", "A.weight"
            renamed[f"{sgm_module_path(module, layers)}.lora_{weight}"] = value
        peft_state = renamed
    kohya_state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    # diffusers writes alpha = rank here; ours may differ, and A1111 scales by alpha/rank.
    for key in kohya_state:
        if key.endswith(".alpha"):
            kohya_state[key] = kohya_state[key].new_tensor(float(lora_config.lora_alpha))
    name = str(provenance.get("name", ""))
    resolution = provenance.get("resolution")
    metadata = {
        "ss_output_name": name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora_config.r),
        "ss_network_alpha": str(lora_config.lora_alpha),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": str(family.ss_v2),
        "ss_sd_model_name": str(provenance.get("base_model", "")),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        **({"ss_resolution": f"({resolution}, {resolution})",
            "modelspec.resolution": f"{resolution}x{resolution}"} if isinstance(resolution, int) else {}),
        **_provenance_metadata(provenance),
    }
    return _write({k: v.contiguous() for k, v in kohya_state.items()}, directory / KOHYA_FILE, metadata)


def _write(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> Path:
    """Save `tensors` at `path` atomically, with `metadata` and the sshs_model_hash of what is written."""
    from safetensors.torch import save, save_file

    # The data after the header does not depend on the metadata, so one serialisation tells the hash.
    metadata = {**metadata, MODEL_HASH_KEY: safetensors_data_sha256(io.BytesIO(save(tensors)))}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def copy_adapter(source: Path, target: Path) -> Path:
    """Put the adapter files of directory `source` (best/, say) in place in `target`; the adapter's path.

    Both files move together, so a run directory never holds the weights of one step in the
    diffusers file and another's in the kohya copy.
    """
    for name in (ADAPTER_FILE, KOHYA_FILE):
        tmp = target / f".{name}.copy{os.getpid()}"
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, target / name)
    return target / ADAPTER_FILE


def kohya_copy_of(adapter: Path) -> Path:
    """Where the kohya copy of an adapter file lives: adapter.safetensors -> adapter.kohya.safetensors."""
    return adapter.with_name(adapter.name.removesuffix(".safetensors") + ".kohya.safetensors")


def write_a1111_copy(kohya_file: Path, target: Path, output_name: str) -> Path:
    """The kohya copy at `target`, listed by A1111 as `output_name` (its ss_output_name and title).

    Only the header is rewritten; the tensors' bytes are copied as they are, so the file's
    sshs_model_hash (the hash of those bytes) stays true without loading torch.
    """
    with kohya_file.open("rb") as source:
        length = int.from_bytes(source.read(8), "little")
        header = json.loads(source.read(length))
        metadata = {**header.get("__metadata__", {}), "ss_output_name": output_name, "modelspec.title": output_name}
        encoded = json.dumps({**header, "__metadata__": metadata}, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the header is padded to 8 bytes, as safetensors writes it
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        with tmp.open("wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            shutil.copyfileobj(source, out)
    os.replace(tmp, target)
    return target


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
