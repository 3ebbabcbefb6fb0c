"""Loading the diffusion model, and the small torch helpers the worker needs around it.

    load_model("tiny", "auto", data_dir)                         # the offline test model
    load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", "auto", data_dir)
    load_model("/models/sdxl.safetensors", "cuda", data_dir)     # a single-file checkpoint

SD 1.x, 2.x and SDXL are supported. fp16 on CUDA, fp32 on the CPU (half precision on the CPU is
slow and poorly supported) unless `[service] dtype` says otherwise. Only the worker thread imports
this module and calls into what it returns, so the event loop never waits on torch.

The GPU fast path, all from `[service]` and off by default: `dtype`, SDPA attention (diffusers'
default on torch 2, set explicitly), `channels_last`, `vae_tiling`, the LoRA hotswap slot
(generation/hotswap.py) and `compile` (the UNet, in place, after the slot exists), and `warm_up`,
which runs the configured shapes once at start so they compile before the first job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraloop.config import ServiceConfig
from loraloop.hashes import file_sha256
from loraloop.tiny import loadable_model

log = logging.getLogger(__name__)

PICKLE_CHECKPOINT_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


class ModelLoadError(Exception):
    """The configured model cannot be loaded; the message says what to change."""


@dataclass
class LoadedModel:
    name: str  # as configured ("tiny", a hub id, a path)
    txt2img: Any
    img2img: Any
    device: str
    dtype: Any
    native_size: int  # the model's training resolution: 64 tiny, 512 SD 1.5, 768 SD 2.x, 1024 SDXL
    slot: Any = None  # the HotswapSlot when [service] lora_hotswap is on
    compiled: bool = False  # the UNet runs through torch.compile
    # The whole-file sha256 of a single-file checkpoint (A1111's "Model hash" is its start); "" otherwise.
    checkpoint_sha256: str = ""

    @property
    def a1111_name(self) -> str:
        """What A1111 writes as `Model`: a checkpoint file's stem, a model directory's or id's last part."""
        path = Path(self.name)
        return path.stem if path.suffix.lower() == ".safetensors" else path.name


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device = {requested!r} but no CUDA GPU is visible; use 'auto' or 'cpu'.")
    return requested


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """`[service] dtype` as a torch dtype: "auto" is fp16 on CUDA and fp32 on the CPU."""
    if requested == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[requested]
    if dtype is torch.bfloat16 and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("dtype = 'bf16' but this GPU has no bf16 support; use 'fp16'.")
    if dtype is torch.float16 and not device.startswith("cuda"):
        log.warning("dtype = 'fp16' on the CPU is slow and poorly supported; 'fp32' or 'bf16' run better there")
    return dtype


def quiet_libraries() -> None:
    """Keep what an operator cannot act on out of the service log: transformers' notes that
    torchvision is missing (it falls back to PIL, which is all the pipelines need), diffusers'
    note on every UNet-only LoRA, and the load-time progress bars of diffusers and transformers,
    which a log file shows as noise.
    A terminal still sees a hub download's bar (huggingface_hub's own)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    lora_loader = logging.getLogger("diffusers.loaders.lora_base")
    if _unet_only_lora_note not in lora_loader.filters:
        lora_loader.addFilter(_unet_only_lora_note)


def _unet_only_lora_note(record: logging.LogRecord) -> bool:
    """False for diffusers' note that a LoRA has no text-encoder part: ours are UNet-only by design."""
    return not record.getMessage().startswith("No LoRA keys associated to")


def load_model(model: str, device: str, data_dir: Path, settings: ServiceConfig | None = None) -> LoadedModel:
    """Load txt2img and img2img pipelines (sharing weights) onto the device.

    `settings` (the `[service]` section) brings the dtype and the fast path; None: the defaults.
    """
    quiet_libraries()  # before diffusers imports its pipelines, whose imports log the torchvision notes
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    # Type checkers read diffusers' top-level names as the placeholders it offers when torch is
    # missing; the defining modules give them the real pipelines (the same classes at run time).
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    settings = settings or ServiceConfig()
    device = pick_device(device)
    dtype = pick_dtype(settings.dtype, device)
    checkpoint_sha256 = ""
    source = loadable_model(model, data_dir)
    path = Path(source).expanduser()
    try:
        if path.suffix.lower() in PICKLE_CHECKPOINT_SUFFIXES:
            raise ModelLoadError(
                f"{path}: pickle checkpoints can run code when loaded; use a .safetensors file."
            )
        if path.suffix.lower() == ".safetensors":
            if not path.is_file():
                raise ModelLoadError(f"{path}: no such checkpoint file.")
            cls = StableDiffusionXLPipeline if _is_sdxl_checkpoint(path) else StableDiffusionPipeline
            pipe = cls.from_single_file(str(path), torch_dtype=dtype)
            started = time.monotonic()
            checkpoint_sha256 = file_sha256(path)  # once per start: a few seconds a gigabyte
            log.info("model %s: sha256 %s (%.1f s)", path.name, checkpoint_sha256[:12], time.monotonic() - started)
        else:
            pipe = DiffusionPipeline.from_pretrained(str(source), dtype=dtype, use_safetensors=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot load model {model!r}: {exc}. Use a diffusers model id, a local diffusers "
            "directory, a .safetensors checkpoint, or 'tiny'."
        ) from exc
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ModelLoadError(
            f"{model!r} is a {type(pipe).__name__}; the service runs Stable Diffusion 1.x, 2.x and SDXL."
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    make_batch_invariant(pipe)
    slot = use_fast_path(pipe, settings)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    log.info("model %s loaded on %s (%s), native size %d", model, device, dtype, native)
    return LoadedModel(model, pipe, img2img, device, dtype, native, slot, settings.compile, checkpoint_sha256)


def use_fast_path(pipe: Any, settings: ServiceConfig) -> Any:
    """Set the fast-path options on a loaded pipeline; returns the HotswapSlot, or None."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from generation.hotswap import HotswapSlot

    # torch's scaled_dot_product_attention picks flash or memory-efficient kernels on a GPU.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.vae_tiling:
        pipe.vae.enable_tiling()  # diffusers tiles only inputs larger than the VAE's own sample size
    slot = None
    if settings.lora_hotswap:
        try:
            slot = HotswapSlot(pipe, rank=settings.lora_hotswap_rank, targets=settings.lora_hotswap_targets)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    if settings.compile:
        compile_unet(pipe.unet, settings.compile_mode)
        # Past torch's limit of graphs per compiled function, new shapes quietly run uncompiled; leave
        # room for every warmed shape and as many again that arrive later.
        warmed = len(settings.warmup_sizes) * len(settings.warmup_batch_sizes or {1, settings.max_batch})
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * warmed)
    return slot


def compile_unet(unet: Any, mode: str, backend: str = "inductor") -> None:
    """torch.compile the UNet in place, so it keeps its class and diffusers' adapter methods still see it.

    Shapes are torch's default: each batch size compiles its own graph (the batch-invariance wrappers
    branch on it); after a second image size, torch recompiles with symbolic height and width, which
    later sizes at that batch size reuse. A `backend` other than inductor (tests: "eager") traces and
    guards the same way without generating kernels.
    """
    unet.compile(mode=mode if backend == "inductor" else None, backend=backend)


def compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process so far: a rise after warm-up is a recompile."""
    from torch._dynamo.utils import counters  # private, but the counter torch's own tests read

    return int(counters["stats"]["unique_graphs"])


def warm_up(model: LoadedModel, settings: ServiceConfig) -> list[tuple[int, int, int]]:
    """Run each `[service] warmup_sizes` at each warm-up batch size once, so a compiled UNet compiles
    them now rather than on somebody's job; returns the (width, height, batch) run.

    The call matches a job's: inference mode, the default scheduler (its timestep dtype is part of
    the compiled graph's guards) and the default guidance (above 1 the UNet sees twice the batch).
    Two steps: the UNet's shapes do not change after the first.
    """
    batches = settings.warmup_batch_sizes or sorted({1, settings.max_batch})
    pipe = model.txt2img
    scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(settings.default_scheduler, scheduler.config)
    done = []
    try:
        for width, height in settings.warmup_sizes:
            for batch in batches:
                start = time.perf_counter()
                with torch.inference_mode():
                    pipe(prompt=["warm-up"] * batch, negative_prompt=[""] * batch, num_inference_steps=2,
                         guidance_scale=settings.default_guidance, width=width, height=height,
                         generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)], output_type="pil")
                done.append((width, height, batch))
                log.info("warm-up: %dx%d at batch %d in %.1f s", width, height, batch, time.perf_counter() - start)
    finally:
        pipe.scheduler = scheduler
    return done


def _is_sdxl_checkpoint(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("conditioner.embedders.1") for key in handle.keys())  # noqa: SIM118  safe_open handles are not iterable


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler of the named kind (`generation.contract.SAMPLERS`), from the model's own config.

    The timestep spacing is set here, not left to the model's config (SD 2.1 and SDXL ship
    "leading"), so each scheduler is the A1111 sampler and schedule type its PNGs say it is.
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        LCMScheduler,
    )

    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        karras = name == "dpmpp_2m_karras"
        return DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras,
            timestep_spacing="linspace" if karras else "trailing")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(base_config, timestep_spacing="linspace")
    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    if name == "lcm":
        return LCMScheduler.from_config(base_config)
    raise ValueError(f"unknown scheduler {name!r}")


def make_batch_invariant(pipe: Any) -> None:
    """Make each image's pixels independent of which batch it ran in.

    BLAS picks a different kernel (and so a different summation order) for each matrix
    height, so a row's result can change in the last bit with the batch size, and 25 steps
    turn that into visibly different pixels. Three places are exposed: the text encoders
    ((B*77, C) inputs), linear layers on (B, C) inputs (the timestep embedding) and the VAE.
    All three are cheap next to the UNet, so they run one image at a time here: the text
    encoders row by row, (B, C) linears row by row, the VAE in its slicing mode. The UNet's
    convolutions take a separate path for a batch of exactly one, so a lone UNet row (no
    classifier-free guidance, guidance <= 1) runs as a pair and keeps the first; with guidance
    every UNet call has at least two rows already. Measured batch-invariant on the CPU; on a
    GPU, cuBLAS and cuDNN may still choose per-batch-size kernels.
    """
    pipe.vae.enable_slicing()
    if not getattr(pipe.unet, "_loraloop_pairs", False):
        pipe.unet.forward = _never_alone(pipe.unet.forward)
        pipe.unet._loraloop_pairs = True
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None and not getattr(encoder, "_loraloop_rowwise", False):
            encoder.forward = _rowwise_forward(encoder.forward)
            encoder._loraloop_rowwise = True
    for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is None:
            continue
        for layer in module.modules():
            if type(layer) is torch.nn.Linear:
                layer.__class__ = RowwiseLinear


def _rowwise_forward(forward: Any) -> Any:
    """Wrap a text encoder's forward to encode one prompt at a time and stack the results."""

    def rowwise(input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        if input_ids.shape[0] == 1:
            return forward(input_ids, *args, **kwargs)
        mask = kwargs.pop("attention_mask", None)
        outputs = [
            forward(row, *args, attention_mask=None if mask is None else mask[i : i + 1], **kwargs)
            for i, row in enumerate(input_ids.split(1))
        ]
        return _stack(outputs)

    return rowwise


def _never_alone(forward: Any) -> Any:
    """Wrap the UNet's forward so a batch of one runs as two identical rows (see above)."""

    def paired(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[0] != 1:
            return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        doubled = {k: _double(v) for k, v in kwargs.items()}
        out = forward(_double(sample), _double(timestep), _double(encoder_hidden_states),
                      *args, **doubled)
        return _first_row(out)

    return paired


def _double(value: Any) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 1:
        return torch.cat([value, value])
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value


def _first_row(value: Any) -> Any:
    if torch.is_tensor(value):
        return value[:1]
    if isinstance(value, dict):
        return type(value)(**{k: _first_row(v) for k, v in value.items()})
    if isinstance(value, tuple):
        return tuple(_first_row(v) for v in value)
    return value


def _stack(outputs: list[Any]) -> Any:
    first = outputs[0]
    if torch.is_tensor(first):
        return torch.cat(outputs)
    if isinstance(first, dict):  # transformers' ModelOutput is a dict that keeps its class
        return type(first)(**{key: _stack([o[key] for o in outputs]) for key in first})
    if isinstance(first, (tuple, list)):
        return type(first)(_stack(list(items)) for items in zip(*outputs, strict=True))
    return first


class RowwiseLinear(torch.nn.Linear):
    """nn.Linear that runs a (B, C) input one row at a time, so no row sees the batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 1:
            return torch.cat([F.linear(row, self.weight, self.bias) for row in x.split(1)])
        return F.linear(x, self.weight, self.bias)

# SD 1.x/2.x latent channels -> RGB, a linear fit good enough for a thumbnail (no VAE decode).
LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def latent_preview(latents: Any, max_side: int = 128) -> Any:
    """A small PIL preview of one (4, h, w) latent, made without running the VAE."""
    from PIL import Image

    factors = torch.tensor(LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents.detach().float().cpu(), factors)  # (h, w, 3)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    image.thumbnail((max_side, max_side))
    return image
