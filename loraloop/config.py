"""Settings: `config.toml` loaded into frozen dataclasses, one section per package.

Every key has a default, so a missing file or section is fine; an unknown key, a value of the
wrong type or one out of range stops the program at start with the file, the key and the
reason. Secrets never live in the file: they come from the environment (see `Secrets`).

Each package owns its section's dataclass here; a section validates its own ranges in
`__post_init__` by raising `ValueError` with a message naming the key. Before that, every number
of every section passes one check (`_numbers_checked`): finite, and at most NUMBER_CEILING or
the bound its field's metadata names.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_ENV = "LORALOOP_CONFIG"
DATA_DIR_ENV = "LORALOOP_DATA_DIR"
CONFIG_FILE = "config.toml"
# The config.toml of the source checkout loraloop runs from (`make install` installs it editable),
# so its commands find the same settings and data from any folder; None for a plain install.
_CHECKOUT = Path(__file__).resolve().parent.parent
CHECKOUT_CONFIG: Path | None = _CHECKOUT / CONFIG_FILE if (_CHECKOUT / "pyproject.toml").is_file() else None
SERVICE_TOKEN_ENV = "LORALOOP_SERVICE_TOKEN"
# A file holding the service token, read when LORALOOP_SERVICE_TOKEN is unset; `serve` writes a
# new random one there on first start (the Docker image points it into the data volume).
SERVICE_TOKEN_FILE_ENV = "LORALOOP_SERVICE_TOKEN_FILE"
CONSOLE_TOKEN_ENV = "LORALOOP_CONSOLE_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether `host` reaches only this machine: what the service and the console may bind without a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


class ConfigError(Exception):
    """A configuration problem a person can fix; the message says where and how."""


def _require(condition: bool, key: str, reason: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {reason}")


# Every number in every section must be finite and at most this (TOML has inf and nan, and a
# 2**63 that overflows whatever C call it reaches); a key whose sane range ends sooner says so in
# its field's metadata: `field(default=..., metadata={"max": ...})`.
NUMBER_CEILING = 2**32


def _numbers_checked(cls: type) -> type:
    """Give a section class the one check every number goes through, before the section's own.

    Placed under `@dataclass`, so the dataclass __init__ calls it however the section is built:
    from the file, by `Config.replace` (command-line flags) or by `dataclasses.replace` (--set).
    """
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self: typing.Any) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            _require(math.isfinite(value), item.name, f"must be a finite number, not {value}")
            ceiling = item.metadata.get("max", NUMBER_CEILING)
            _require(abs(value) <= ceiling, item.name, f"must be at most {ceiling:g}")
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]  # set before @dataclass reads it
    return cls


@dataclass(frozen=True)
@_numbers_checked
class PathsConfig:
    # Everything loraloop writes lives here: the database, images, adapters, models, datasets
    # and training runs. Relative paths are relative to the config file. LORALOOP_DATA_DIR wins.
    data_dir: str = "data"


SERVICE_DTYPES = ("auto", "fp16", "bf16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
@_numbers_checked
class ServiceConfig:
    # Loopback by default: the service has no auth unless LORALOOP_SERVICE_TOKEN is set, so
    # exposing it on 0.0.0.0 without a token lets anyone on the network use the GPU.
    host: str = "127.0.0.1"
    port: int = 8765
    # A diffusers model id, a local diffusers directory, a single-file .safetensors checkpoint,
    # or "tiny" (random weights, offline, seconds to build: for trying things out and tests).
    model: str = "tiny"
    # "auto" takes CUDA when present (fp16), else the CPU (fp32).
    device: str = "auto"
    # Directory of LoRA adapters (NAME/vN.safetensors or NAME.safetensors). Empty: DATA_DIR/adapters.
    adapters_dir: str = ""
    # Jobs waiting beyond this are refused with 429: a longer queue only means longer waits.
    max_queue: int = 64
    # Queued + running jobs one requester may hold; lower keeps one person from filling the queue.
    max_per_requester: int = 4
    # Images per pipeline call: more raises GPU throughput but costs memory and per-job latency.
    max_batch: int = 4
    # Longest the worker holds a batch open for requests still arriving: throughput vs latency.
    batch_wait_ms: int = field(default=50, metadata={"max": 10_000})
    # Request limits: each higher value lets one job cost more GPU time or memory.
    default_steps: int = 25
    max_steps: int = 80
    default_guidance: float = 7.0
    max_count: int = 4
    max_prompt_chars: int = 1000
    # 0 takes the model's native size (512 for SD 1.5, 1024 for SDXL, 64 for tiny).
    default_width: int = 0
    default_height: int = 0
    # Largest width*height accepted; memory grows with it.
    max_pixels: int = 1048576
    # Largest request body (an img2img init image travels in it, base64-encoded).
    max_body_bytes: int = 8388608
    # Seconds a request body may take to arrive; a client trickling it in slower is cut off (408).
    read_timeout_s: float = field(default=30.0, metadata={"max": 3600})
    # Largest init image in pixels, read from its header before any pixel is decoded.
    max_image_pixels: int = 4194304
    # A job's work budget, width x height x steps x images: past it a request is refused (400).
    # 0 picks one for the device (generation.jobs.DEFAULT_PIXEL_STEPS: generous on CUDA, small on the CPU).
    max_pixel_steps: int = 0
    # Scheduler used when a request names none: dpmpp_2m, dpmpp_2m_karras, euler_a, ddim or lcm.
    default_scheduler: str = "dpmpp_2m"
    # Send a small preview image every N steps in the event stream; 0 turns previews off.
    preview_every: int = 5
    # Finished jobs (and their PNGs) kept in memory for clients to fetch; more costs memory.
    keep_finished: int = 256
    # --- The GPU fast path (generation/pipeline.py, generation/hotswap.py); all off by default ---
    # Weights and activations: "auto" (fp16 on CUDA, fp32 on the CPU), "fp16", "bf16" or "fp32".
    dtype: str = "auto"
    # UNet and VAE in channels-last memory layout: faster convolutions on tensor-core GPUs, often slower on CPUs.
    channels_last: bool = False
    # Decode (and encode) images larger than the VAE's own size in overlapping tiles: far less memory, faint seams.
    vae_tiling: bool = False
    # torch.compile the UNet: much faster steps on a GPU, each new shape compiles first (a minute). Needs lora_hotswap.
    compile: bool = False
    # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs.
    compile_mode: str = "default"
    # One LoRA slot swapped in place (never a recompile): one adapter file per image, rank <= lora_hotswap_rank,
    # on lora_hotswap_targets only; other jobs fail with the reason. The slot's padding costs a little speed.
    lora_hotswap: bool = False
    lora_hotswap_rank: int = 64
    lora_hotswap_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # [width, height] pairs run once at start at each of warmup_batch_sizes (empty: 1 and max_batch), so
    # torch.compile compiles them before the first job; each costs start-up time.
    warmup_sizes: list[list[int]] = field(default_factory=list)
    warmup_batch_sizes: list[int] = field(default_factory=list)
    # The image safety check: diffusers' StableDiffusionSafetyChecker from a model id (for example
    # "CompVis/stable-diffusion-safety-checker"), a local directory, or "tiny" (random, offline).
    # Empty: no check, every image's verdict is "unchecked". Costs one small CLIP pass per image.
    safety_checker: str = ""
    # Added to every concept score (diffusers' `adjustment`): above 0 flags more images, including
    # benign ones; below 0 fewer. 2 flags everything, which is how the tests force a flag.
    safety_adjustment: float = 0.0

    # --- Where batches run (README "Several GPUs: the Ray backend") ---
    # "local": one worker thread in this process, no Ray. "ray": the same front (queue, limits, API) sends
    # each batch to one of several worker actors on a Ray cluster (pip install 'loraloop[ray]').
    backend: str = "local"
    # "local" starts a Ray cluster inside the service; else a running cluster's address ("auto", "HOST:6379").
    ray_address: str = "local"
    # Worker actors, each loading the model once; 0: one per GPU the cluster has.
    ray_workers: int = 0
    # 0: GPU actors (num_gpus=1 each). N > 0: CPU actors with N torch threads each (no GPU: tests, trials).
    ray_cpu_threads: int = 0
    # Times Ray restarts a worker that died (it takes work again once its model has loaded); -1: always.
    ray_worker_restarts: int = 4

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, "port", "must be between 1 and 65535")
        _require(-2.0 <= self.safety_adjustment <= 2.0, "safety_adjustment", "must be between -2 and 2")
        _require(self.backend in ("local", "ray"), "backend", "must be 'local' or 'ray'")
        _require(self.ray_address.strip() != "", "ray_address", "must be 'local' or a Ray cluster's address")
        _require(self.ray_workers >= 0, "ray_workers", "must be 0 (one per GPU) or more")
        _require(self.ray_cpu_threads >= 0, "ray_cpu_threads", "must be 0 (GPU workers) or more")
        _require(self.ray_worker_restarts >= -1, "ray_worker_restarts", "must be -1 (always) or more")
        _require(self.backend != "ray" or self.ray_cpu_threads == 0 or self.device in ("auto", "cpu"), "device",
                 "must be 'auto' or 'cpu' with CPU Ray workers (ray_cpu_threads > 0)")
        for key in ("max_queue", "max_per_requester", "max_batch", "max_steps", "max_count",
                    "max_prompt_chars", "max_pixels", "max_body_bytes", "keep_finished", "max_image_pixels"):
            _require(getattr(self, key) >= 1, key, "must be at least 1")
        _require(self.batch_wait_ms >= 0, "batch_wait_ms", "must be 0 or more")
        _require(self.read_timeout_s > 0, "read_timeout_s", "must be positive")
        _require(self.max_pixel_steps >= 0, "max_pixel_steps", "must be 0 (the device's default) or more")
        _require(self.preview_every >= 0, "preview_every", "must be 0 or more")
        _require(self.max_steps <= 1000, "max_steps",
                 "must be at most 1000 (SD schedulers have 1000 training timesteps)")
        _require(1 <= self.default_steps <= self.max_steps, "default_steps",
                 "must be between 1 and max_steps")
        _require(0.0 <= self.default_guidance <= 30.0, "default_guidance", "must be between 0 and 30")
        for key in ("default_width", "default_height"):
            _require(getattr(self, key) >= 0 and getattr(self, key) % 8 == 0, key,
                     "must be 0 (the model's size) or a positive multiple of 8")
        _require(self.default_scheduler in ("dpmpp_2m", "dpmpp_2m_karras", "euler_a", "ddim", "lcm"),
                 "default_scheduler", "must be one of dpmpp_2m, dpmpp_2m_karras, euler_a, ddim, lcm")
        _require(self.model.strip() != "", "model", "must name a model id, a path or 'tiny'")
        _require(self.device in {"auto", "cpu", "cuda"} or self.device.startswith("cuda:"),
                 "device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _require(self.dtype in SERVICE_DTYPES, "dtype", "must be one of " + ", ".join(SERVICE_DTYPES))
        _require(self.compile_mode in COMPILE_MODES, "compile_mode", "must be one of " + ", ".join(COMPILE_MODES))
        _require(self.lora_hotswap or not self.compile, "compile",
                 "needs lora_hotswap = true (without the slot every adapter or weight change recompiles the UNet)")
        _require(self.lora_hotswap_rank >= 1, "lora_hotswap_rank", "must be at least 1")
        _require(bool(self.lora_hotswap_targets) and all(t.strip() for t in self.lora_hotswap_targets),
                 "lora_hotswap_targets", 'must name some UNet modules, e.g. ["to_q", "to_k", "to_v", "to_out.0"]')
        for size in self.warmup_sizes:
            _require(len(size) == 2 and all(side >= 8 and side % 8 == 0 for side in size), "warmup_sizes",
                     f"{size} must be [width, height], each a positive multiple of 8")
            _require(size[0] * size[1] <= self.max_pixels, "warmup_sizes", f"{size} is over max_pixels")
        _require(all(1 <= batch <= self.max_batch for batch in self.warmup_batch_sizes), "warmup_batch_sizes",
                 "must each be between 1 and max_batch")


@dataclass(frozen=True)
@_numbers_checked
class StoreConfig:
    # SQLite database file. Empty: DATA_DIR/loraloop.db.
    database: str = ""
    # How long a write waits for another process's lock before giving up.
    busy_timeout_s: float = field(default=10.0, metadata={"max": 3600})
    # "NORMAL" survives the process being killed; "FULL" also survives power loss, slower writes.
    synchronous: str = "NORMAL"

    def __post_init__(self) -> None:
        _require(self.busy_timeout_s > 0, "busy_timeout_s", "must be more than 0")
        _require(self.synchronous in {"NORMAL", "FULL"}, "synchronous", "must be 'NORMAL' or 'FULL'")


@dataclass(frozen=True)
@_numbers_checked
class BotConfig:
    # Where the bot finds the generation service.
    service_url: str = "http://127.0.0.1:8765"
    # Guilds whose commands are synced at start (instant); empty: global commands (up to an hour).
    guild_ids: list[int] = field(default_factory=list)
    # Channels where /imagine works; empty: every channel the bot can see.
    channels: list[int] = field(default_factory=list)
    # Whether /imagine works in DMs (no moderators watch DMs).
    allow_dms: bool = False
    # Roles allowed to use /admin and to delete anyone's image (Administrators always are).
    admin_role_ids: list[int] = field(default_factory=list)
    # Per user: jobs queued or running at once, and of those how many may wait in the queue.
    max_active_per_user: int = 2
    max_queued_per_user: int = 1
    # Seconds between two requests of one user: lower feels snappier, higher shares the GPU.
    cooldown_seconds: float = field(default=10.0, metadata={"max": 86400})
    # Whole words or phrases refused in prompts (case-insensitive).
    blocked_terms: list[str] = field(default_factory=list)
    max_prompt_chars: int = 500
    # Upper bounds offered to users; the service enforces its own limits too.
    max_count: int = 4
    max_steps: int = 50
    # The short side of every image (a multiple of 64); the long side follows the aspect, rounded to a
    # multiple of 8: 16:9 at 512 is 912x512. [service] max_pixels must allow the widest aspect.
    base_size: int = 512
    # Seconds between progress edits: Discord rate-limits edits, ~2 s keeps well inside them.
    progress_interval: float = field(default=2.0, metadata={"max": 3600})
    # Reactions the bot adds under each image and the vote each records; the flag emoji marks a
    # bad or unsafe image (kept apart from taste).
    rating_emojis: dict[str, int] = field(default_factory=lambda: {"👍": 1, "👎": -1})
    flag_emoji: str = "🚩"
    # img2img strength of the 🎨 variation button: lower stays closer to the original.
    variation_strength: float = 0.35
    # 🔍 upscale (2x, then img2img with the same prompt, seed and styles): how far the second pass
    # may move from the enlarged image (lower keeps it, higher adds detail and drifts), and the
    # largest output in pixels (the second pass costs about 4x the first per step).
    upscale_strength: float = 0.35
    upscale_max_pixels: int = 1024 * 1024
    # Largest image attachment accepted for img2img.
    max_attachment_bytes: int = 8 * 1024 * 1024
    # Generation messages re-read at start to pick up votes made while the bot was offline.
    catch_up_messages: int = 200
    # What happens to an image the service's safety check flags. Outside age-restricted channels:
    # "block" (the person is told, the image is kept out of the channel and of every dataset) or
    # "spoiler" (posted behind a spoiler). In channels Discord marks age-restricted: "post",
    # "spoiler" or "block".
    nsfw_policy: typing.Literal["block", "spoiler"] = "block"
    nsfw_channel_policy: typing.Literal["post", "spoiler", "block"] = "post"

    def __post_init__(self) -> None:
        _require(self.max_active_per_user >= 1, "max_active_per_user", "must be at least 1")
        _require(0 <= self.max_queued_per_user <= self.max_active_per_user, "max_queued_per_user",
                 "must be between 0 and max_active_per_user")
        _require(self.cooldown_seconds >= 0, "cooldown_seconds", "must not be negative")
        _require(self.max_prompt_chars >= 1, "max_prompt_chars", "must be at least 1")
        _require(1 <= self.max_count <= 10, "max_count", "must be between 1 and 10 (Discord's 10 files)")
        _require(self.max_steps >= 1, "max_steps", "must be at least 1")
        _require(self.base_size >= 64 and self.base_size % 64 == 0, "base_size",
                 "must be a multiple of 64")
        _require(self.progress_interval >= 0, "progress_interval", "must not be negative")
        _require(all(v in (-1, 1) for v in self.rating_emojis.values()), "rating_emojis",
                 "values must be 1 (like) or -1 (dislike)")
        _require(self.flag_emoji not in self.rating_emojis, "flag_emoji", "must differ from the rating emojis")
        _require(0 < self.variation_strength <= 1, "variation_strength", "must be in (0, 1]")
        _require(0 < self.upscale_strength <= 1, "upscale_strength", "must be in (0, 1]")
        _require(self.upscale_max_pixels >= 64 * 64, "upscale_max_pixels", "must be at least 4096 (64x64)")
        _require(self.catch_up_messages >= 0, "catch_up_messages", "must not be negative")


@dataclass(frozen=True)
@_numbers_checked
class TrainingConfig:
    # Training resolution; imported images are resized and centre-cropped to it. "auto": the base
    # model's native size (64 tiny, 512 SD 1.5, 768 SD 2.1-v, 1024 SDXL).
    resolution: int | typing.Literal["auto"] = "auto"
    # --- `loraloop train` (training/train.py); every key can be overridden with --set KEY=VALUE ---
    # sft: learn the dataset's images; dpo: prefer liked over disliked of a pair; kto: likes/dislikes.
    objective: typing.Literal["sft", "dpo", "kto"] = "sft"
    # LoRA rank: more capacity and a bigger file. alpha/rank scales the update (alpha need not equal rank).
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # Which UNet layers get LoRA: "attention" (to_q/k/v/out), "proj" (proj_in/out), "resnet" (convs).
    targets: list[str] = field(default_factory=lambda: ["attention"])
    learning_rate: float = 1e-4
    # constant | cosine | cosine_with_restarts, after `warmup_steps` of linear warmup.
    lr_scheduler: typing.Literal["constant", "cosine", "cosine_with_restarts"] = "constant"
    warmup_steps: int = 0
    lr_cycles: int = 1
    # Optimiser steps; epochs > 0 wins and sets the steps from the dataset size.
    max_steps: int = 500
    epochs: int = 0
    # Effective batch = batch_size x grad_accumulation; accumulation trades time for memory.
    batch_size: int = 1
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    # 8-bit AdamW when bitsandbytes is installed (about 1/4 the optimiser memory), else AdamW.
    adam_8bit: bool = True
    # no | fp16 | bf16 (fp16 needs CUDA). Gradient checkpointing: ~30% slower, much less memory.
    mixed_precision: typing.Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    # Data: flip doubles the cached latents; dropped captions keep unconditional generation working.
    random_flip: bool = True
    caption_dropout: float = 0.0
    trigger_word: str = ""
    # Encode images and captions once, cached under DATA_DIR/cache by content hash: faster, uses disk.
    cache_latents: bool = True
    # Min-SNR-gamma loss weighting (0: off); 5 is the paper's value. Noise offset helps dark/bright images.
    snr_gamma: float = 5.0
    noise_offset: float = 0.0
    # Held out for validation loss; early stopping needs it. patience 0: never stop early.
    validation_split: float = 0.1
    validation_every: int = 50
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    # Prompts rendered to a grid every `sample_every` steps (0: never) with `sample_steps` steps.
    validation_prompts: list[str] = field(default_factory=list)
    sample_every: int = 0
    sample_steps: int = 20
    checkpoint_every: int = 100
    checkpoints_keep: int = 3
    # Diffusion-DPO strength; the paper uses 2500 for SD 1.5 (per-pixel errors are tiny, so beta is big).
    # Larger: follows preferences harder but drifts further from the base model.
    dpo_beta: float = 2500.0
    # Diffusion-KTO strength, on the same error scale as dpo_beta.
    kto_beta: float = 2500.0
    # Experiment tracking through accelerate: "auto" (tensorboard when installed), a name (wandb only so), or "none".
    log_with: str = "auto"
    # DreamBooth prior preservation (sft only; --class-prompt, --prior-images): `prior_images` images of
    # `class_prompt` ("a photo of a dog") drawn by the base model, cached by prompt and seed, trained on
    # beside the subject. More images and a higher weight keep the class nearer the base model but
    # learn the subject more slowly; each class image costs `prior_steps` denoising steps, once.
    class_prompt: str = ""
    prior_images: int = 0
    prior_loss_weight: float = 1.0
    prior_steps: int = 25

    def __post_init__(self) -> None:
        _require(self.resolution == "auto" or (isinstance(self.resolution, int) and self.resolution >= 8
                                                and self.resolution % 8 == 0), "resolution",
                 "must be \"auto\" or a positive multiple of 8")
        _require(self.rank >= 1, "rank", "must be at least 1")
        _require(self.alpha > 0, "alpha", "must be positive")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _require(bool(self.targets) and set(self.targets) <= {"attention", "proj", "resnet"}, "targets",
                 "must list some of 'attention', 'proj', 'resnet'")
        _require(self.learning_rate > 0, "learning_rate", "must be positive")
        _require(self.warmup_steps >= 0 and self.lr_cycles >= 1, "warmup_steps",
                 "must be >= 0 (and lr_cycles >= 1)")
        _require(self.max_steps >= 1 and self.epochs >= 0, "max_steps", "must be >= 1 (and epochs >= 0)")
        _require(self.batch_size >= 1 and self.grad_accumulation >= 1, "batch_size",
                 "must be >= 1 (and grad_accumulation >= 1)")
        _require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)")
        _require(0 <= self.caption_dropout <= 1, "caption_dropout", "must be in [0, 1]")
        _require(self.snr_gamma >= 0 and self.noise_offset >= 0, "snr_gamma",
                 "must be >= 0 (and noise_offset >= 0)")
        _require(0 <= self.validation_split < 1, "validation_split", "must be in [0, 1)")
        _require(self.validation_every >= 1 and self.early_stopping_patience >= 0, "validation_every",
                 "must be >= 1 (and early_stopping_patience >= 0)")
        _require(self.sample_every >= 0 and self.sample_steps >= 1, "sample_every",
                 "must be >= 0 (and sample_steps >= 1)")
        _require(self.checkpoint_every >= 1 and self.checkpoints_keep >= 1, "checkpoint_every",
                 "must be >= 1 (and checkpoints_keep >= 1)")
        _require(self.dpo_beta > 0 and self.kto_beta > 0, "dpo_beta", "must be positive (and kto_beta)")
        _require(self.prior_images >= 0 and self.prior_loss_weight >= 0, "prior_images",
                 "must be >= 0 (and prior_loss_weight >= 0)")
        _require(self.prior_steps >= 1, "prior_steps", "must be at least 1")


@dataclass(frozen=True)
@_numbers_checked
class DatasetConfig:
    # `loraloop dataset import`: images whose shorter side is below this are dropped (upscaling blurs).
    min_image_size: int = 256
    # Captions shorter than this many characters are dropped; missing captions are kept empty.
    min_caption_chars: int = 3
    # Perceptual-hash Hamming distance (0-64) at or under which two images count as the same picture.
    near_duplicate_distance: int = 4
    # CSV column names for the image path or URL and for its caption.
    csv_image_column: str = "image"
    csv_caption_column: str = "caption"
    # Downloads: largest file accepted, parallel requests, seconds per file.
    max_download_bytes: int = 20_000_000
    download_concurrency: int = 8
    download_timeout_s: float = field(default=30.0, metadata={"max": 3600})
    # Private hosts (addresses or networks, "192.168.1.0/24") downloads may reach; any other
    # loopback, private, link-local, multicast, reserved or unspecified address is refused.
    allow_private_hosts: list[str] = field(default_factory=list)
    # Let JSON/CSV/metadata sources name files outside the source's own folder.
    allow_paths_outside_source: bool = False
    # Largest picture in pixels still decoded (after JPEG's free downscaling), read from its header.
    max_image_pixels: int = 64_000_000
    # Processes decoding and resizing images during import; 0: one per CPU core (big imports).
    import_workers: int = 0
    # `loraloop dataset caption`: a BLIP model id, a local directory, or "tiny".
    caption_model: str = "Salesforce/blip-image-captioning-large"
    caption_batch_size: int = 8
    caption_min_new_tokens: int = 5
    caption_max_new_tokens: int = 40
    caption_device: str = "auto"

    def __post_init__(self) -> None:
        _require(self.min_image_size >= 1, "min_image_size", "must be at least 1")
        _require(self.min_caption_chars >= 0, "min_caption_chars", "must be 0 or more")
        _require(0 <= self.near_duplicate_distance <= 64, "near_duplicate_distance",
                 "must be between 0 and 64")
        _require(self.csv_image_column != "" and self.csv_caption_column != "", "csv_image_column",
                 "column names must not be empty")
        _require(self.max_download_bytes >= 1, "max_download_bytes", "must be at least 1")
        _require(self.download_concurrency >= 1, "download_concurrency", "must be at least 1")
        _require(self.download_timeout_s > 0, "download_timeout_s", "must be positive")
        _require(self.max_image_pixels >= 1, "max_image_pixels", "must be at least 1")
        for host in self.allow_private_hosts:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"allow_private_hosts: {host!r} is not an address or network "
                                 "like 192.168.1.20 or 192.168.1.0/24") from None
        _require(self.import_workers >= 0, "import_workers", "must be 0 (one per CPU core) or more")
        _require(self.caption_model.strip() != "", "caption_model", "must name a model id, a path or 'tiny'")
        _require(self.caption_batch_size >= 1, "caption_batch_size", "must be at least 1")
        _require(1 <= self.caption_min_new_tokens <= self.caption_max_new_tokens, "caption_min_new_tokens",
                 "must be at least 1 and at most caption_max_new_tokens")
        _require(self.caption_device in {"auto", "cpu", "cuda"} or self.caption_device.startswith("cuda:"),
                 "caption_device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
@_numbers_checked
class CurationConfig:
    # `loraloop dataset curate`: the default output layout (sft, kto or dpo).
    format: typing.Literal["sft", "kto", "dpo"] = "sft"
    # Distinct raters an image needs before its score is trusted at all.
    min_raters: int = 1
    # Weighted net score (likes - dislikes, each vote counting its rater's weight, 0-1) to keep an
    # image (kto: to label it liked, or with its sign flipped, disliked).
    min_score: float = 0.1
    # Wilson lower bound on the like ratio (0-1) an image must reach; 0 turns the check off.
    min_wilson: float = 0.0
    # z of the Wilson interval: 1.96 is 95% confidence; higher demands more votes.
    wilson_z: float = 1.96
    # Count the requester's own vote on their image (off: people upvote their own).
    include_self_votes: bool = False
    # Perceptual-hash Hamming distance (0-64) at or under which two images collapse onto the better one.
    near_duplicate_distance: int = 4
    # dpo: at most this many pairs per prompt, clearest preferences first; 0 means no cap.
    max_pairs_per_prompt: int = 10
    # Hard-link images from the store into the dataset (instant, no extra disk) instead of copying.
    link_images: bool = True
    # Weigh each rater by their estimated reliability (loraloop/raters.py); off: every vote counts 1.
    rater_model: bool = True
    # The rater model's prior: the accuracy assumed of a rater it knows little about, and how many
    # votes' worth of evidence that assumption is worth.
    rater_prior_accuracy: float = 0.7
    rater_prior_votes: float = 6.0
    # Largest share of a selection's total vote weight one rater may hold (1: no cap).
    max_rater_share: float = 0.1

    def __post_init__(self) -> None:
        _require(self.min_raters >= 1, "min_raters", "must be at least 1")
        _require(0.5 < self.rater_prior_accuracy < 1, "rater_prior_accuracy", "must be between 0.5 and 1")
        _require(self.rater_prior_votes > 0, "rater_prior_votes", "must be positive")
        _require(0 < self.max_rater_share <= 1, "max_rater_share", "must be in (0, 1]")
        _require(0.0 <= self.min_wilson < 1.0, "min_wilson", "must be between 0 and 1")
        _require(self.wilson_z > 0, "wilson_z", "must be positive")
        _require(0 <= self.near_duplicate_distance <= 64, "near_duplicate_distance",
                 "must be between 0 and 64")
        _require(self.max_pairs_per_prompt >= 0, "max_pairs_per_prompt", "must be 0 or more")


@dataclass(frozen=True)
@_numbers_checked
class LoopConfig:
    # `loraloop loop`: rounds that run themselves, each candidate behind an A/B gate.
    # Also start the loop as a child process of `loraloop run`.
    start_with_run: bool = False
    # Adapters the loop trains new candidates of; empty: every adapter with a published version.
    adapters: list[str] = field(default_factory=list)
    # Seconds between two looks at the store: shorter decides sooner, costs a rater-model pass each.
    poll_seconds: float = 60.0
    # Weighted votes on an adapter's images since its last round that start the next round.
    min_new_votes: float = 50.0
    # Share of `/imagine style:NAME` requests served the candidate while its experiment runs.
    share: float = 0.5
    # How sure the gate must be to promote (or retire) a candidate: 0.95 asks for 19:1 evidence.
    confidence: float = 0.95
    # Votes each arm needs before the gate decides anything.
    min_votes: int = 30
    # Candidate votes after which an undecided experiment is retired.
    vote_budget: int = 400
    # Discord channel id where decisions are announced; 0: the log only.
    admin_channel_id: int = field(default=0, metadata={"max": 2**63 - 1})  # a snowflake is 64-bit
    # Personal styles: the votes a person must have cast before /profile train (or the loop) trains
    # one from their votes alone. Fewer learns from noise; Midjourney asks for 200 pair rankings.
    personal_min_votes: int = 200
    # Whether the loop trains a personal style for everyone who reaches personal_min_votes, not only
    # for those who ask with /profile train. Each costs one training run.
    personal_auto: bool = False

    def __post_init__(self) -> None:
        _require(self.poll_seconds > 0, "poll_seconds", "must be positive")
        _require(self.personal_min_votes >= 1, "personal_min_votes", "must be at least 1")
        _require(self.min_new_votes > 0, "min_new_votes", "must be positive")
        _require(0 < self.share < 1, "share", "must be between 0 and 1")
        _require(0.5 < self.confidence < 1, "confidence", "must be between 0.5 and 1")
        _require(self.min_votes >= 1, "min_votes", "must be at least 1")
        _require(self.vote_budget >= self.min_votes, "vote_budget", "must be at least min_votes")
        _require(self.admin_channel_id >= 0, "admin_channel_id", "must be a channel id or 0")


@dataclass(frozen=True)
@_numbers_checked
class ConsoleConfig:
    # The web console (console/): playground, rating, moderation and the admin dashboards.
    # Loopback by default; another address needs LORALOOP_CONSOLE_TOKEN, like the service.
    host: str = "127.0.0.1"
    port: int = 8766
    # Short side of a non-square aspect in pixels; 0: the model's native size (what 1:1 gets).
    base_size: int = 0
    # Generation requests one person may send per minute: more lets one browser fill the queue.
    submissions_per_minute: int = 6
    # Votes and flags one person may cast per minute (rate-a-batch at a brisk pace is ~60).
    votes_per_minute: int = 120
    # Images per gallery or moderation page: more is one longer, slower page.
    page_size: int = field(default=48, metadata={"max": 500})

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, "port", "must be between 1 and 65535")
        _require(self.base_size == 0 or (self.base_size >= 8 and self.base_size % 8 == 0), "base_size",
                 "must be 0 or a multiple of 8")
        _require(self.submissions_per_minute >= 1, "submissions_per_minute", "must be at least 1")
        _require(self.votes_per_minute >= 1, "votes_per_minute", "must be at least 1")
        _require(self.page_size >= 1, "page_size", "must be at least 1")


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    bot: BotConfig = field(default_factory=BotConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    # The file this was read from (None: defaults only); relative paths resolve against it.
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        env = os.environ.get(DATA_DIR_ENV)
        if env:
            return Path(env).expanduser().resolve()
        return self.resolve_path(self.paths.data_dir)

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute():
            base = self.source.parent if self.source is not None else Path.cwd()
            path = base / path
        return path.resolve()

    @property
    def database_path(self) -> Path:
        if self.store.database:
            return self.resolve_path(self.store.database)
        return self.data_dir / "loraloop.db"

    @property
    def adapters_dir(self) -> Path:
        if self.service.adapters_dir:
            return self.resolve_path(self.service.adapters_dir)
        return self.data_dir / "adapters"

    @property
    def a1111_adapters_dir(self) -> Path:
        """Published adapters as A1111, Forge and ComfyUI name them (NAME.safetensors, NAME@N.safetensors),
        beside ADAPTERS_DIR: point their LoRA folder here."""
        return self.adapters_dir.with_name(self.adapters_dir.name + "-a1111")

    def whereabouts(self) -> str:
        """Which config file and data directory are in use, for messages that find nothing there."""
        return f"config {self.source or 'none found (defaults)'}, data dir {self.data_dir}"

    def replace(self, section: str, **changes: typing.Any) -> Config:
        """A copy with some keys of one section changed (CLI flags override the file this way)."""
        try:
            new_section = dataclasses.replace(getattr(self, section), **changes)
        except ValueError as exc:
            raise ConfigError(f"[{section}] {exc}") from None
        return dataclasses.replace(self, **{section: new_section})


@dataclass(frozen=True)
class Secrets:
    """Secrets from the environment only, so config.toml can be committed and shared."""

    discord_token: str | None
    service_token: str | None
    # Opens GET /metrics only, so a Prometheus server's config never holds the token that spends the GPU.
    metrics_token: str | None = None
    # The web console's admin token; unset, the console makes a new one at each start.
    console_token: str | None = None

    @classmethod
    def from_env(cls) -> Secrets:
        return cls(
            discord_token=os.environ.get("DISCORD_TOKEN") or None,
            service_token=os.environ.get(SERVICE_TOKEN_ENV) or _token_from_file(),
            metrics_token=os.environ.get("LORALOOP_METRICS_TOKEN") or None,
            console_token=os.environ.get(CONSOLE_TOKEN_ENV) or None,
        )


def _token_from_file() -> str | None:
    path = os.environ.get(SERVICE_TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{SERVICE_TOKEN_FILE_ENV}={path}: cannot read the token: {exc.strerror}") from None


def create_service_token_file() -> Path | None:
    """Write a new random token to $LORALOOP_SERVICE_TOKEN_FILE if it names a file that does not
    exist yet (and no LORALOOP_SERVICE_TOKEN is set); the path written, or None."""
    import secrets

    path = os.environ.get(SERVICE_TOKEN_FILE_ENV)
    if not path or os.environ.get(SERVICE_TOKEN_ENV):
        return None
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two services starting at once never overwrite each other's token; 0600: only this user reads it.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        raise ConfigError(f"{SERVICE_TOKEN_FILE_ENV}={path}: cannot create the token file: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return target


def _type_name(tp: typing.Any) -> str:
    return getattr(tp, "__name__", str(tp))


def fits_type(value: typing.Any, tp: typing.Any) -> bool:
    """Whether a TOML value fits a dataclass field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        return isinstance(value, list) and all(fits_type(v, item) for v in value)
    if origin is dict:
        _key_tp, value_tp = typing.get_args(tp) or (typing.Any, typing.Any)
        return isinstance(value, dict) and all(fits_type(v, value_tp) for v in value.values())
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is typing.Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build_section(cls: type, table: typing.Any, where: str) -> typing.Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of keys, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}' (known keys: {', '.join(sorted(known))})"
            )
        tp = hints[key]
        if not fits_type(value, tp):
            shown = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else _type_name(tp)
            raise ConfigError(f"{where}.{key}: expected {shown}, got {value!r}")
        if tp is float and isinstance(value, int):
            value = float(value)
        values[key] = value
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{where}.{exc}") from None


def parse_config(data: dict[str, typing.Any], source: Path | None = None) -> Config:
    """Build a Config from parsed TOML, failing on unknown sections, keys and bad values."""
    label = str(source) if source is not None else "config"
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(
                f"{label}: unknown section [{name}] (known sections: {', '.join(sections)})"
            )
        built[name] = _build_section(hints[name], table, f"{label}: [{name}]")
    return Config(**built, source=source)


def config_search_path() -> list[Path]:
    """Where settings are looked for when neither --config nor $LORALOOP_CONFIG names a file, in
    order: ./config.toml, $XDG_CONFIG_HOME/loraloop/config.toml (~/.config/...), and the
    config.toml of the checkout loraloop runs from. The first that exists wins."""
    user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "loraloop" / CONFIG_FILE
    return [Path.cwd() / CONFIG_FILE, user, *([CHECKOUT_CONFIG] if CHECKOUT_CONFIG is not None else [])]


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load settings from `path`, else $LORALOOP_CONFIG, else the first file of `config_search_path()`,
    else defaults (the data directory then is ./data)."""
    named = path or os.environ.get(CONFIG_ENV)
    if named:
        candidate = Path(named).expanduser()
        if not candidate.exists():
            raise ConfigError(f"{candidate}: config file not found")
    else:
        found = [p for p in config_search_path() if p.is_file()]
        if not found:
            return Config()
        candidate = found[0]
    try:
        data = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{candidate}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{candidate}: cannot read: {exc.strerror}") from None
    return parse_config(data, source=candidate.resolve())
