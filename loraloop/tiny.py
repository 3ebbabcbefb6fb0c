"""The tiny models and the model name "tiny": random weights, real architectures, built offline in seconds.

    loadable_model("tiny", data_dir)                  # -> DATA_DIR/models/tiny (SD 1.x shaped), built once
    loadable_model("tiny-sdxl", data_dir)             # -> DATA_DIR/models/tiny-sdxl (two text encoders)
    loadable_model("tiny", data_dir, "captioner")     # -> DATA_DIR/models/tiny-blip
    loadable_model("tiny", data_dir, "safety")        # -> DATA_DIR/models/tiny-safety (flags nothing at 0)
    loadable_model("org/some-model", data_dir)        # -> "org/some-model", unchanged

Tests, benchmarks and a newcomer's first `loraloop serve --model tiny` all use them, so the
whole service runs with no hub access. They are saved with `save_pretrained` and loaded back
through the same loaders that real model ids and paths go through; `loadable_model` is the one
place the name "tiny" turns into a path (the trainer, the captioner and the service call it).

Floor: imports only the standard library at module level (torch, diffusers and transformers only
when a model is built), and nothing from bot/, generation/ or training/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

TINY_MODEL_NAME = "tiny"
TINY_SDXL_NAME = "tiny-sdxl"
# Written into a built model's folder; a folder whose marker holds another version is rebuilt.
MARKER_FILE = "LORALOOP_TINY"
# Bumped whenever the architecture below changes, so a stale cached copy is rebuilt.
TINY_MODEL_VERSION = "1"
# The tiny VAE halves the resolution once (2 blocks), so latents are (B, 4, H/2, W/2).
TINY_IMAGE_SIZE = 64


def _byte_level_vocab() -> dict[str, int]:
    """A character-level CLIP vocabulary: every byte-level symbol, alone and word-final.

    A real CLIP vocabulary cannot be downloaded here; with no merges, BPE falls back to one
    token per character, which is all a random text encoder needs. The symbols are the
    byte-level alphabet CLIP's pre-tokenizer maps bytes onto (printable bytes as themselves,
    the rest shifted past U+0100).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny SD-1.x-shaped pipeline with random weights and save it at `path`."""
    # Imported here, not at the top: the floor must stay importable without torch (bot/ never loads it).
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=TINY_IMAGE_SIZE,
        norm_num_groups=32,
    )
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            projection_dim=32,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    # Any: mypy reads diffusers' lazy top-level names as its dummy placeholder classes.
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    (path / MARKER_FILE).write_text(TINY_MODEL_VERSION)
    return path


TINY_SDXL_VERSION = "1"


def build_tiny_sdxl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny SDXL-shaped pipeline (two text encoders, text_time conditioning), random weights.

    Like the tiny SD model, for SDXL's own paths: pooled text embeddings, added time ids, the
    SDXL pipelines in the service and the SDXL trainer, offline, in seconds. Its latents are
    (B, 4, H/2, W/2) like the tiny SD model's, so its native size is TINY_IMAGE_SIZE too.
    """
    import torch  # when building only, as in build_tiny_model
    from diffusers import EulerDiscreteScheduler

    # The defining modules, not diffusers' top-level names: see generation.pipeline.load_model.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=TINY_IMAGE_SIZE // 2, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        # pooled text (32) + 6 time ids x 8 = 80: what SDXL's added conditioning projects
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,  # the two encoders' 32-wide hidden states, concatenated
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=TINY_IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    )
    vocab = _byte_level_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=32,
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(  # type: ignore[arg-type]  # diffusers hints an enum, not a class
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading"),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    (path / MARKER_FILE).write_text(TINY_SDXL_VERSION)
    return path


TINY_BLIP_VERSION = "1"
TINY_SAFETY_VERSION = "1"
# A few caption-like words plus letters and word pieces, so a random decoder spells something.
_TINY_BLIP_WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "photo", "picture", "painting", "drawing", "dog", "cat",
    "fox", "bird", "red", "blue", "green", "small", "large", "tree", "house", "sky", "field", "river", "snow",
    "person", "woman", "man", "car", "street", "night", "day",
]


def build_tiny_blip(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny BLIP captioner (model, processor, BERT tokenizer) with random weights at `path`.

    It loads through `BlipProcessor`/`BlipForConditionalGeneration.from_pretrained` exactly like
    "Salesforce/blip-image-captioning-large" does; its captions are gibberish.
    """
    import torch  # when building only, as in build_tiny_model
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # BLIP's decoder starts from [DEC] (its bos) and stops at [SEP]; ids match the config below.
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = special + _TINY_BLIP_WORDS + list(letters) + [f"##{c}" for c in letters]
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab_file), bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
            pad_token_id=0, sep_token_id=3, eos_token_id=3, bos_token_id=5,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    (path / MARKER_FILE).write_text(TINY_BLIP_VERSION)
    return path


def build_tiny_safety_checker(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny `StableDiffusionSafetyChecker` and its `CLIPImageProcessor` with random weights.

    It loads through the same `from_pretrained` calls as "CompVis/stable-diffusion-safety-checker".
    Its concept embeddings and thresholds are diffusers' initial ones (all ones), so an image's
    scores are its cosine to that direction minus 1: never above 0, nothing flagged, until
    `[service] safety_adjustment` raises every score (2 flags everything).
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    StableDiffusionSafetyChecker(config).save_pretrained(path, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    (path / MARKER_FILE).write_text(TINY_SAFETY_VERSION)
    return path


def _built(path: Path, version: str, build: Callable[[Path], Path]) -> Path:
    """`path`, built with `build` unless its marker already says `version`.

    Built in a sibling folder and renamed into place, so an interrupted build never leaves a
    half-written model where a loader would find it.
    """
    marker = path / MARKER_FILE
    if not marker.exists() or marker.read_text() != version:
        tmp = path.with_name(f"{path.name}.building")
        if tmp.exists():
            shutil.rmtree(tmp)
        build(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    return path


def tiny_model_path(data_dir: str | os.PathLike) -> Path:
    """Where the tiny SD model lives under a data directory, building it on first use."""
    return _built(Path(data_dir) / "models" / "tiny", TINY_MODEL_VERSION, build_tiny_model)


def tiny_safety_checker_path(data_dir: str | os.PathLike) -> Path:
    """Where the tiny safety checker lives under a data directory, building it on first use."""
    return _built(Path(data_dir) / "models" / "tiny-safety", TINY_SAFETY_VERSION, build_tiny_safety_checker)


def tiny_sdxl_path(data_dir: str | os.PathLike) -> Path:
    """Where the tiny SDXL model lives under a data directory, building it on first use."""
    return _built(Path(data_dir) / "models" / "tiny-sdxl", TINY_SDXL_VERSION, build_tiny_sdxl)


def tiny_blip_path(data_dir: str | os.PathLike) -> Path:
    """Where the tiny BLIP lives under a data directory, building it on first use."""
    return _built(Path(data_dir) / "models" / "tiny-blip", TINY_BLIP_VERSION, build_tiny_blip)


# Which tiny model the name "tiny" means, by what the caller loads.
TINY_MODELS: dict[str, Callable[[str | os.PathLike], Path]] = {
    "diffusion": tiny_model_path,
    "captioner": tiny_blip_path,
    "safety": tiny_safety_checker_path,
}


def loadable_model(name: str, data_dir: str | os.PathLike,
                   kind: Literal["diffusion", "captioner", "safety"] = "diffusion") -> str:
    """A configured model name as something to load: the name itself, unless it is "tiny" or "tiny-sdxl".

    "tiny" becomes the path of the tiny model of `kind` under `data_dir`, "tiny-sdxl" that of the
    tiny SDXL model, each built on first use.
    """
    if name == TINY_SDXL_NAME and kind == "diffusion":
        return str(tiny_sdxl_path(data_dir))
    if name != TINY_MODEL_NAME:
        return name
    return str(TINY_MODELS[kind](data_dir))
