"""LoRA training on the UNet: `loraloop train DATASET --name NAME`.

    loraloop train data/datasets/foxes --name foxes                        # SFT, settings from [training]
    loraloop train data/datasets/pairs --name house --objective dpo --steps 400
    loraloop train data/datasets/foxes --name foxes --set rank=32 --set lr_scheduler=cosine
    loraloop train data/datasets/foxes --name foxes --resume data/runs/foxes-20260101-120000
    accelerate launch --multi_gpu --num_processes 2 $(which loraloop) train data/datasets/foxes --name foxes

The last line is the multi-GPU form: the same command under `accelerate launch` (the batch
is per process; epochs are shared out). Checked here with two CPU processes:
`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 $(which loraloop) train ...`.

The settings are the [training] section of config.toml (one commented screen, loraloop/config.py).
This file reads top to bottom: validate() checks everything that can be checked before any
weights load; setup() loads the model and adds the adapter; train() is the loop (micro-steps,
clip, step, log, validate, sample, checkpoint); save_adapter() writes the result.

A run directory holds: adapter.safetensors (diffusers LoRA format, provenance in its metadata),
report.json, loss.png, samples/step-N.png, checkpoints/step-N/ (resumable) and best/.

Determinism: every random draw in the loop (batch order, flips, caption dropout, latent
sampling, noise, timesteps) comes from one seeded generator whose state is checkpointed; batch
order is a pure function of (seed, epoch). So a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generation.contract import ADAPTER_NAME_RE
from loraloop.config import TrainingConfig
from training.data import Dataset, DatasetError, EncodeCache, Example, load_dataset, split_examples

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
KOHYA_FILE = "adapter.kohya.safetensors"
STATE_FILE = "state.pt"
# Settings that can change on --resume without changing what the run computes; anything else must match.
RESUME_MAY_CHANGE = {"checkpoint_every", "checkpoints_keep", "validation_prompts", "sample_every", "sample_steps",
                     "log_with", "kohya_copy", "validation_every", "early_stopping_patience",
                     "early_stopping_min_delta"}
# "org/name": anything else that is not an existing path is a typo'd path, caught here, not in from_pretrained.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TARGET_MODULES = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "proj": ["proj_in", "proj_out"],
    "resnet": ["conv1", "conv2", "conv_shortcut"],
}


class TrainError(Exception):
    """A problem found before or during training that a person can fix; the message says how."""


class Interrupted(Exception):
    """Ctrl-C during training, after the checkpoint was saved; carries its path."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; checkpoint saved, resume with --resume {checkpoint}")
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Job:
    """What to train: the dataset, the adapter name, the base model and the settings."""

    dataset: Path
    name: str
    model: str
    settings: TrainingConfig
    data_dir: Path
    output: Path | None = None
    resume: Path | None = None


@dataclass
class Plan:
    """A validated job: everything resolved and checked, nothing loaded yet."""

    job: Job
    dataset: Dataset
    train: list[Example]
    validation: list[Example]
    model_path: str
    run_dir: Path
    total_steps: int
    trackers: list[str]
    resume_state: dict[str, Any] | None = None
    resume_notes: list[str] = field(default_factory=list)
    # Things worth knowing that do not stop the run (printed before it starts).
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# validate: everything that can fail, before any weights load


def resolve_model(model: str, data_dir: Path) -> str:
    """A loadable model: "tiny", an existing diffusers directory, or a hub id (checked when loading)."""
    if model == "tiny":
        from loraloop.tiny import tiny_model_path

        return str(tiny_model_path(data_dir))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir() or not (path / "vae").is_dir():
            raise TrainError(f"{path} is not a diffusers model directory (it has no unet/ and vae/ folders)")
        unet_config = path / "unet" / "config.json"
        if unet_config.is_file():
            _check_architecture(json.loads(unet_config.read_text()), model)
        return str(path.resolve())
    if path.is_file():
        raise TrainError(f"{path}: training needs a diffusers model directory, not a single-file checkpoint")
    if not HUB_ID_RE.match(model):
        raise TrainError(f"base model {model} does not exist; give a diffusers directory, a hub id or 'tiny'")
    return model


def _check_architecture(unet_config: dict[str, Any], model: str) -> None:
    # SDXL's UNet also needs pooled text embeddings and size conditioning, which this loop does not make.
    if unet_config.get("addition_embed_type") == "text_time":
        raise TrainError(f"{model} is an SDXL model; loraloop trains SD 1.x and 2.x LoRAs only")


def batches_per_epoch(examples: int, batch_size: int, processes: int) -> int:
    return math.ceil(examples / (batch_size * processes))


def settings_dict(settings: TrainingConfig) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def _pick_trackers(log_with: str) -> list[str]:
    """accelerate tracker names for `log_with`, each checked the way accelerate checks it."""
    from accelerate.utils import (
        is_comet_ml_available,
        is_mlflow_available,
        is_tensorboard_available,
        is_wandb_available,
    )

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "mlflow": is_mlflow_available, "comet_ml": is_comet_ml_available}
    if log_with == "none":
        return []
    if log_with == "auto":
        # wandb only when named: it asks for a login, which would stall an unattended run.
        return ["tensorboard"] if is_tensorboard_available() else []
    names = [name.strip() for name in log_with.split(",") if name.strip()]
    for name in names:
        if name not in available:
            raise TrainError(f"log_with: unknown tracker {name!r}; use {', '.join(available)}, 'auto' or 'none'")
        if not available[name]():
            raise TrainError(f"log_with names {name}, which is not installed; "
                             f"pip install {name} or set log_with='none'")
    return names


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory from --resume: the checkpoint itself or a run directory (its latest)."""
    if (path / STATE_FILE).is_file():
        return path
    checkpoints = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    checkpoints = [c for c in checkpoints if (c / STATE_FILE).is_file()]
    if not checkpoints:
        raise TrainError(f"--resume {path}: no checkpoint there (expected {STATE_FILE} or checkpoints/step-N/)")
    return checkpoints[-1]


def validate(job: Job, processes: int | None = None) -> Plan:
    """Check the job and resolve everything; raise TrainError with what to do on the first problem."""
    s = job.settings
    if processes is None:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # Under `accelerate launch` the epochs are shared out across the processes. The state is
        # built as AcceleratorState builds it (honouring --cpu), so the Accelerator reuses it.
        processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).num_processes
    if not ADAPTER_NAME_RE.match(job.name):
        raise TrainError(f"adapter name {job.name!r} is not valid: use letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit, at most 64 characters")
    try:
        dataset = load_dataset(job.dataset, s.objective)
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    train, validation = split_examples(dataset.examples, s.validation_split, s.seed)
    if s.early_stopping_patience and not validation:
        raise TrainError("early stopping needs a validation split; set validation_split > 0 with at least 2 examples")
    if s.objective == "kto" and len({e.desirable for e in train}) < 2:
        raise TrainError("the KTO training split needs both liked and disliked images; "
                         "add more or lower validation_split")
    if s.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise TrainError("mixed_precision 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU")
    trackers = _pick_trackers(s.log_with)
    model_path = resolve_model(job.model, job.data_dir)
    if s.epochs:
        per_epoch = batches_per_epoch(len(train), s.batch_size, processes)
        total_steps = max(1, math.ceil(s.epochs * per_epoch / s.grad_accumulation))
    else:
        total_steps = s.max_steps

    resume_state, notes = None, []
    if job.resume is not None:
        import torch

        checkpoint = find_checkpoint(job.resume)
        # weights_only: a checkpoint is plain tensors and numbers, so a planted file cannot run code.
        try:
            resume_state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise TrainError(f"--resume {checkpoint}: {STATE_FILE} is not a loraloop checkpoint ({exc})") from None
        saved = resume_state["settings"]
        current = settings_dict(s)
        may_change = set(RESUME_MAY_CHANGE)
        if s.lr_scheduler == "constant":  # the only schedule that does not depend on the run's length
            may_change |= {"max_steps", "epochs"}
        blocking = sorted(k for k in current if k not in may_change and saved.get(k) != current[k])
        if blocking:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in blocking)
            raise TrainError(f"--resume {checkpoint} was trained with different settings ({diffs}); "
                             "use the same settings or start a new run")
        if resume_state["dataset_hash"] != dataset.content_hash:
            raise TrainError(f"--resume {checkpoint}: the dataset changed since that checkpoint; start a new run")
        if resume_state["processes"] != processes:
            # Batches are dealt out per process: another count would train on other batches.
            raise TrainError(f"--resume {checkpoint} ran on {resume_state['processes']} process(es), this on "
                             f"{processes}; resume with the same number of processes")
        if resume_state["base_model"] != job.model:
            raise TrainError(f"--resume {checkpoint} used base model {resume_state['base_model']}, not {job.model}")
        notes = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in sorted(current) if saved.get(k) != current[k]]
        if resume_state["step"] >= total_steps:
            raise TrainError(f"--resume {checkpoint} is already at step {resume_state['step']} of {total_steps}")
        run_dir = job.output or checkpoint.parent.parent
    else:
        run_dir = job.output or job.data_dir / "runs" / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    warnings = []
    uncaptioned = sum(1 for e in dataset.examples if not e.caption.strip())
    if uncaptioned:
        warnings.append(f"{uncaptioned} of {len(dataset.examples)} images have no caption and train as "
                        f"{'the trigger word alone' if s.trigger_word.strip() else 'unconditional'}; "
                        f"`loraloop dataset caption {dataset.root}` fills them")
    return Plan(job=job, dataset=dataset, train=train, validation=validation, model_path=model_path,
                run_dir=Path(run_dir), total_steps=total_steps, trackers=trackers,
                resume_state=resume_state, resume_notes=notes, warnings=warnings)


# ---------------------------------------------------------------------------------------------
# setup: model, adapter, optimiser, schedule, encoded data


@dataclass
class Setup:
    accelerator: Any
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    weight_dtype: Any
    lora_config: Any
    encoder: Encoder


def setup(plan: Plan) -> Setup:
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    s = plan.job.settings
    accelerator = Accelerator(mixed_precision=s.mixed_precision, log_with=plan.trackers or None,
                              project_dir=str(plan.run_dir))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(plan.model_path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(plan.model_path, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(plan.model_path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(plan.model_path, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(plan.model_path, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load base model {plan.job.model}: {exc}") from None
    _check_architecture(dict(unet.config), plan.job.model)  # hub ids are only known once loaded
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False)
    # Frozen parts run in the mixed-precision dtype; the LoRA weights stay fp32 so small updates are not lost.
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    lora_config = LoraConfig(
        r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, init_lora_weights="gaussian",
        target_modules=[module for target in s.targets for module in TARGET_MODULES[target]],
    )
    torch.manual_seed(s.seed)  # the LoRA A matrices' initial values
    unet.add_adapter(lora_config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    optimizer_class = torch.optim.AdamW
    if s.adam_8bit and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    optimizer = optimizer_class(trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
    schedule = "constant_with_warmup" if s.lr_scheduler == "constant" and s.warmup_steps else s.lr_scheduler
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=s.warmup_steps,
                                 num_training_steps=plan.total_steps, num_cycles=s.lr_cycles)
    # The schedule is stepped once per optimiser step by us, not prepared: accelerate would step it
    # once per process.
    unet, optimizer = accelerator.prepare(unet, optimizer)
    encoder = Encoder(plan, vae, text_encoder, tokenizer, accelerator.device, weight_dtype)
    return Setup(accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, optimizer, lr_scheduler,
                 weight_dtype, lora_config, encoder)


class Encoder:
    """Turns examples into latent distributions and text embeddings, through the on-disk cache or not."""

    def __init__(self, plan: Plan, vae, text_encoder, tokenizer, device, dtype) -> None:
        s = plan.job.settings
        self.settings = s
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.device, self.dtype = device, dtype
        self.scaling = vae.config.scaling_factor
        # What produced an entry: a different base model or resolution must never share entries.
        self.cache = EncodeCache(plan.job.data_dir / "cache" / "training", f"{plan.model_path}|{s.resolution}")
        self.image_hashes: dict[Path, str] = {}

    def caption(self, example: Example) -> str:
        trigger = self.settings.trigger_word.strip()
        return f"{trigger}, {example.caption}" if trigger and example.caption else trigger or example.caption

    def _image_hash(self, path: Path) -> str:
        if path not in self.image_hashes:
            from training.data import file_hash

            self.image_hashes[path] = file_hash(path)
        return self.image_hashes[path]

    def latent_stats(self, path: Path, flip: bool):
        """(mean, std) of the VAE's latent distribution for an image: (4, R/f, R/f) each."""
        import torch

        from training.data import load_image_tensor

        def compute():
            pixels = load_image_tensor(path, self.settings.resolution, flip)[None]
            with torch.no_grad():
                dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            return {"mean": dist.mean[0].float(), "std": dist.std[0].float()}

        if not self.settings.cache_latents:
            return compute()
        key = self.cache.key("latent", self._image_hash(path), str(flip))
        return self.cache.get_or_compute(key, compute)

    def text_embedding(self, caption: str):
        """CLIP hidden states for a caption: (77, D)."""
        import torch

        def compute():
            ids = self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                return {"embedding": self.text_encoder(ids.to(self.device))[0][0].float()}

        if not self.settings.cache_latents:
            return compute()
        return self.cache.get_or_compute(self.cache.key("text", caption), compute)

    def warm(self, examples: list[Example], show_progress: bool = True) -> None:
        """Encode everything the run can ask for up front, so the loop only reads the cache."""
        from tqdm.auto import tqdm

        if not self.settings.cache_latents:
            return
        flips = (False, True) if self.settings.random_flip else (False,)
        for example in tqdm(examples, desc="encoding", unit="example", disable=not show_progress, leave=False):
            for path in (example.image, example.rejected):
                if path is not None:
                    for flip in flips:
                        self.latent_stats(path, flip)
            self.text_embedding(self.caption(example))
        if self.settings.caption_dropout > 0:
            self.text_embedding("")


# ---------------------------------------------------------------------------------------------
# one micro-batch: sample noise, denoise, score with the objective


def batch_indices(micro_step: int, count: int, batch_size: int, seed: int, processes: int, rank: int) -> list[int]:
    """Which examples micro-step `micro_step` trains on: a pure function of it, so resume is exact."""
    import torch

    per_epoch = batches_per_epoch(count, batch_size, processes)
    epoch, position = divmod(micro_step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    start = (position * processes + rank) * batch_size
    chosen = order[start:start + batch_size]
    # The last batch of an epoch can be short (or, across processes, empty): top it up from the start.
    return chosen + order[: batch_size - len(chosen)] if len(chosen) < batch_size else chosen


@contextlib.contextmanager
def adapter_disabled(unet):
    """The reference model for DPO/KTO: the same UNet with the LoRA switched off (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def micro_batch_loss(st: Setup, plan: Plan, examples: list[Example], generator, training: bool,
                     kl_estimate: float = 0.0):
    """Loss, metrics and the new KTO estimate for one micro-batch. Every random draw comes from `generator`."""
    import torch

    from training import objectives

    s = plan.job.settings
    device = st.accelerator.device
    count = len(examples)
    flips = (torch.rand(count, generator=generator) < 0.5).tolist() if training and s.random_flip else [False] * count
    dropped = (torch.rand(count, generator=generator) < s.caption_dropout).tolist() if training else [False] * count
    images = [e.image for e in examples] + ([e.rejected for e in examples] if s.objective == "dpo" else [])
    stats = [st.encoder.latent_stats(path, flips[i % count]) for i, path in enumerate(images)]
    mean = torch.stack([x["mean"] for x in stats])
    std = torch.stack([x["std"] for x in stats])
    # Sampled here, not cached, so every epoch sees a fresh draw from the VAE's distribution.
    latents = (mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)) * st.encoder.scaling
    captions = ["" if dropped[i] else st.encoder.caption(e) for i, e in enumerate(examples)]
    embeddings = torch.stack([st.encoder.text_embedding(c)["embedding"] for c in captions])  # (B, 77, D)

    noise = torch.randn((count, *latents.shape[1:]), generator=generator)
    if s.noise_offset:
        noise += s.noise_offset * torch.randn((count, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, st.noise_scheduler.config.num_train_timesteps, (count,), generator=generator)
    if s.objective == "dpo":
        # Both images of a pair share noise, timestep and caption, so their errors are comparable.
        noise, timesteps, embeddings = noise.repeat(2, 1, 1, 1), timesteps.repeat(2), embeddings.repeat(2, 1, 1)
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    embeddings = embeddings.to(device, st.weight_dtype)
    noisy = st.noise_scheduler.add_noise(latents, noise, timesteps).to(st.weight_dtype)
    v_prediction = st.noise_scheduler.config.prediction_type == "v_prediction"
    target = st.noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise

    with st.accelerator.autocast():
        prediction = st.unet(noisy, timesteps, embeddings).sample
    error = objectives.denoising_error(prediction, target)
    if s.objective == "sft":
        weights = None
        if s.snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(st.noise_scheduler, timesteps)
            weights = objectives.min_snr_weights(snr, s.snr_gamma, v_prediction)
        loss, metrics = objectives.sft(error, weights)
        return loss, metrics, kl_estimate

    with torch.no_grad(), adapter_disabled(st.accelerator.unwrap_model(st.unet)), st.accelerator.autocast():
        reference = objectives.denoising_error(st.unet(noisy, timesteps, embeddings).sample, target)
    if s.objective == "dpo":
        loss, metrics = objectives.dpo(error[:count], error[count:], reference[:count], reference[count:], s.dpo_beta)
        return loss, metrics, kl_estimate
    desirable = torch.tensor([e.desirable for e in examples], device=device)
    loss, metrics, new_kl = objectives.kto(error, reference, desirable, s.kto_beta, kl_estimate)
    return loss, metrics, (new_kl if training else kl_estimate)


def evaluate(st: Setup, plan: Plan, kl_estimate: float) -> tuple[float, dict[str, float]]:
    """Validation loss with the same noise every time (a fixed seed), so evaluations are comparable."""
    import torch

    s = plan.job.settings
    generator = torch.Generator().manual_seed(s.seed + 1)
    st.unet.eval()
    losses, metrics_sum = [], {}
    with torch.no_grad():
        for start in range(0, len(plan.validation), s.batch_size):
            chunk = plan.validation[start:start + s.batch_size]
            loss, metrics, _ = micro_batch_loss(st, plan, chunk, generator, training=False, kl_estimate=kl_estimate)
            losses.append(loss.item() * len(chunk))
            for key, value in metrics.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value * len(chunk)
    st.unet.train()
    total = len(plan.validation)
    return sum(losses) / total, {f"val_{k}": v / total for k, v in metrics_sum.items()}


def render_samples(st: Setup, plan: Plan, prompts: list[str], step: int) -> Path:
    """The validation prompts rendered with the current adapter, one fixed seed per prompt, as one grid."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from training.images import labelled_grid

    s = plan.job.settings
    unet = st.accelerator.unwrap_model(st.unet)
    device = st.accelerator.device
    st.vae.to(device)
    st.text_encoder.to(device)
    pipe = StableDiffusionPipeline(
        vae=st.vae, text_encoder=st.text_encoder, tokenizer=st.tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(st.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    unet.eval()
    images = []
    with torch.no_grad():
        for index, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(s.seed + index)
            images.append(pipe(prompt, height=s.resolution, width=s.resolution, num_inference_steps=s.sample_steps,
                               generator=generator).images[0])
    unet.train()
    if s.cache_latents:
        st.vae.to("cpu")
        st.text_encoder.to("cpu")
    path = plan.run_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid([images], [f"step {step}"], prompts).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# saving: adapters (diffusers and kohya formats) and resumable checkpoints


def lora_state_dict(unet) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_adapter(unet, lora_config, directory: Path, provenance: dict[str, Any], kohya: bool) -> Path:
    """Write adapter.safetensors that `pipe.load_lora_weights` loads, provenance in its metadata (atomically)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
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
    from safetensors import safe_open

    with safe_open(str(tmp), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata.update({f"loraloop.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in provenance.items()})
    # The plain keys the service's adapter list shows (generation/adapters.py).
    metadata["base_model"] = str(provenance.get("base_model", ""))
    metadata["description"] = (f"{provenance.get('objective', '')} LoRA, rank {provenance.get('rank')}, "
                               f"{provenance.get('steps')} steps on {Path(str(provenance.get('dataset', ''))).name}")
    save_file(load_file(tmp), tmp, metadata=metadata)
    os.replace(tmp, directory / ADAPTER_FILE)
    if kohya:
        kohya_state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
        # diffusers writes alpha = rank here; ours may differ, and A1111 scales by alpha/rank.
        for key in kohya_state:
            if key.endswith(".alpha"):
                kohya_state[key] = kohya_state[key].new_tensor(float(lora_config.lora_alpha))
        kohya_meta = {"ss_network_dim": str(lora_config.r), "ss_network_alpha": str(lora_config.lora_alpha),
                      **{f"loraloop.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in provenance.items()}}
        kohya_tmp = directory / f".{KOHYA_FILE}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in kohya_state.items()}, kohya_tmp, metadata=kohya_meta)
        os.replace(kohya_tmp, directory / KOHYA_FILE)
    return directory / ADAPTER_FILE


def read_provenance(adapter: Path) -> dict[str, Any]:
    """The loraloop.* metadata of an adapter file, values decoded."""
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as handle:
        metadata = handle.metadata() or {}
    out = {}
    for key, value in metadata.items():
        if key.startswith("loraloop."):
            try:
                out[key[len("loraloop."):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len("loraloop."):]] = value
    return out


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint must carry besides weights and optimiser."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    stale_evaluations: int = 0
    kl_estimate: float = 0.0


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Ctrl-C during the optimiser update takes effect after it, so no checkpoint holds half an update."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; nothing to defer elsewhere
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: pressed.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _random_state(generator) -> dict[str, Any]:
    """Every RNG the loop draws from: ours, torch's (LoRA dropout) and CUDA's."""
    import torch

    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_random_state(generator, state: dict[str, Any]) -> None:
    import torch

    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def save_checkpoint(st: Setup, plan: Plan, progress: Progress, generator) -> Path:
    import numpy as np
    import torch

    directory = plan.run_dir / "checkpoints" / f"step-{progress.step:06d}"
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unet = st.accelerator.unwrap_model(st.unet)
    state = {
        "step": progress.step,
        "progress": dataclasses.asdict(progress),
        "lora": lora_state_dict(unet),
        "optimizer": st.optimizer.state_dict(),
        "lr_scheduler": st.lr_scheduler.state_dict(),
        **_random_state(generator),
        "python_rng": random.getstate(),
        # As a list, not numpy's tuple with an array, so the file loads with weights_only.
        "numpy_rng": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "processes": st.accelerator.num_processes,
        "settings": settings_dict(plan.job.settings),
        "dataset_hash": plan.dataset.content_hash,
        "base_model": plan.job.model,
    }
    torch.save(state, tmp / STATE_FILE)
    save_adapter(unet, st.lora_config, tmp, provenance(plan, progress), kohya=False)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    kept = sorted(p for p in directory.parent.glob("step-*") if not p.name.endswith(".tmp"))
    for old in kept[: -plan.job.settings.checkpoints_keep]:
        shutil.rmtree(old)
    return directory


def restore_checkpoint(st: Setup, plan: Plan, generator) -> Progress:
    import numpy as np
    from peft import set_peft_model_state_dict

    state = plan.resume_state
    set_peft_model_state_dict(st.accelerator.unwrap_model(st.unet), state["lora"])
    st.optimizer.load_state_dict(state["optimizer"])
    st.lr_scheduler.load_state_dict(state["lr_scheduler"])
    _set_random_state(generator, state)
    random.setstate(state["python_rng"])
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return Progress(**state["progress"])


def provenance(plan: Plan, progress: Progress) -> dict[str, Any]:
    s = plan.job.settings
    last = progress.history[-1] if progress.history else {}
    return {
        "name": plan.job.name,
        "base_model": plan.job.model,
        "dataset": str(plan.dataset.root),
        "dataset_hash": plan.dataset.content_hash,
        "objective": s.objective,
        "rank": s.rank,
        "alpha": s.alpha,
        "targets": s.targets,
        "resolution": s.resolution,
        "steps": progress.step,
        "final_train_loss": last.get("loss"),
        "final_val_loss": progress.validation[-1]["val_loss"] if progress.validation else None,
        "best_val_loss": progress.best_val,
        "best_step": progress.best_step,
        "trigger_word": s.trigger_word,
    }


# ---------------------------------------------------------------------------------------------
# the loop


def train(plan: Plan, on_step: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Run the plan and return the report (also written to run_dir/report.json)."""
    import torch
    from tqdm.auto import tqdm

    s = plan.job.settings
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    started = time.monotonic()
    st = setup(plan)
    accelerator = st.accelerator
    is_main = accelerator.is_main_process
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (plan.run_dir / "config.json").write_text(json.dumps(
            {"dataset": str(plan.dataset.root), "name": plan.job.name, "base_model": plan.job.model,
             "settings": settings_dict(s)}, indent=2))
    st.encoder.warm(plan.train + plan.validation, show_progress=is_main)
    log.info("%d training and %d validation examples; encoded %d, reused %d from the cache",
             len(plan.train), len(plan.validation), st.encoder.cache.encoded, st.encoder.cache.reused)
    encode_counts = {"encoded": st.encoder.cache.encoded, "reused": st.encoder.cache.reused}
    if s.cache_latents:
        # Everything is encoded: the VAE and text encoder leave the GPU until a sample grid needs them.
        st.vae.to("cpu")
        st.text_encoder.to("cpu")

    generator = torch.Generator().manual_seed(s.seed)
    progress = Progress()
    if plan.resume_state is not None:
        progress = restore_checkpoint(st, plan, generator)
        log.info("resumed at step %d%s", progress.step,
                 "; settings changed: " + "; ".join(plan.resume_notes) if plan.resume_notes else "")
    if plan.validation and not progress.validation:
        # The base model's validation loss: the line every later evaluation is measured against.
        val_loss, val_metrics = evaluate(st, plan, progress.kl_estimate)
        progress.validation.append({"step": 0, "val_loss": val_loss, **val_metrics})
    if plan.trackers:
        accelerator.init_trackers("loraloop", config={k: v for k, v in settings_dict(s).items()
                                                      if isinstance(v, (int, float, str, bool))})
    st.unet.train()
    processes, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(total=plan.total_steps, initial=progress.step, disable=not is_main, desc=plan.job.name, unit="step")
    stopped_early = False
    inside_step = False
    try:
        while progress.step < plan.total_steps:
            # Where this step starts: Ctrl-C in the middle of it rolls back to here, so the
            # checkpoint it saves resumes exactly like the uninterrupted run.
            step_start, inside_step = (_random_state(generator), progress.kl_estimate), True
            metrics_sum: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(s.grad_accumulation):
                micro_step = progress.step * s.grad_accumulation + micro
                chosen = batch_indices(micro_step, len(plan.train), s.batch_size, s.seed, processes, rank)
                last_micro = micro == s.grad_accumulation - 1
                sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(st.unet)
                with sync:
                    loss, metrics, progress.kl_estimate = micro_batch_loss(
                        st, plan, [plan.train[i] for i in chosen], generator, training=True,
                        kl_estimate=progress.kl_estimate)
                    accelerator.backward(loss / s.grad_accumulation)
                # The mean over processes, so the log shows the whole batch; .item() syncs with the GPU.
                loss_sum += accelerator.reduce(loss.detach(), reduction="mean").item()
                for key, value in metrics.items():
                    metrics_sum[key] = metrics_sum.get(key, 0.0) + value
            if s.max_grad_norm:
                accelerator.clip_grad_norm_(st.unet.parameters(), s.max_grad_norm)
            record = {"step": progress.step + 1, "loss": loss_sum / s.grad_accumulation,
                      "lr": st.lr_scheduler.get_last_lr()[0],
                      **{k: v / s.grad_accumulation for k, v in metrics_sum.items()}}
            if not math.isfinite(record["loss"]):
                raise TrainError(f"the loss became {record['loss']} at step {progress.step + 1}; "
                                 "lower learning_rate or use mixed_precision 'bf16'/'no'")
            with _ctrl_c_deferred():
                st.optimizer.step()
                st.lr_scheduler.step()
                st.optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.history.append(record)
                inside_step = False
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"})

            if plan.validation and (progress.step % s.validation_every == 0 or progress.step == plan.total_steps):
                val_loss, val_metrics = evaluate(st, plan, progress.kl_estimate)
                progress.validation.append({"step": progress.step, "val_loss": val_loss, **val_metrics})
                record.update({"val_loss": val_loss, **val_metrics})
                if progress.best_val is None or val_loss < progress.best_val - s.early_stopping_min_delta:
                    progress.best_val, progress.best_step, progress.stale_evaluations = val_loss, progress.step, 0
                    if is_main:
                        save_adapter(accelerator.unwrap_model(st.unet), st.lora_config, plan.run_dir / "best",
                                     provenance(plan, progress), kohya=False)
                else:
                    progress.stale_evaluations += 1
            if plan.trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=progress.step)
            if s.validation_prompts and s.sample_every and progress.step % s.sample_every == 0 and is_main:
                render_samples(st, plan, list(s.validation_prompts), progress.step)
            if progress.step % s.checkpoint_every == 0 and is_main:
                save_checkpoint(st, plan, progress, generator)
            if on_step is not None:
                on_step(progress)
            if s.early_stopping_patience and progress.stale_evaluations >= s.early_stopping_patience:
                log.info("validation loss has not improved for %d evaluations; stopping at step %d (best: step %s)",
                         progress.stale_evaluations, progress.step, progress.best_step)
                stopped_early = True
                break
    except KeyboardInterrupt:
        bar.close()
        if is_main and progress.step > 0:
            if inside_step:  # no update was applied yet: undo the draws the unfinished step made
                _set_random_state(generator, step_start[0])
                progress.kl_estimate = step_start[1]
                st.optimizer.zero_grad(set_to_none=True)
            raise Interrupted(save_checkpoint(st, plan, progress, generator)) from None
        raise
    bar.close()
    accelerator.wait_for_everyone()
    report: dict[str, Any] = {}
    if is_main:
        report = finish(st, plan, progress, stopped_early, time.monotonic() - started, encode_counts)
    if plan.trackers:
        accelerator.end_training()
    return report


def finish(st: Setup, plan: Plan, progress: Progress, stopped_early: bool, seconds: float,
           encode_counts: dict[str, int]) -> dict[str, Any]:
    """Write the final adapter (the best one when early stopping chose it), the report and the loss curve."""
    from training.images import loss_curve

    s = plan.job.settings
    unet = st.accelerator.unwrap_model(st.unet)
    best = plan.run_dir / "best" / ADAPTER_FILE
    use_best = bool(s.early_stopping_patience) and best.is_file()
    adapter = save_adapter(unet, st.lora_config, plan.run_dir, provenance(plan, progress), kohya=s.kohya_copy)
    if use_best:
        # Early stopping keeps the best checkpoint: the run's adapter is the one that validated best.
        shutil.copyfile(best, adapter)
    report = {
        "name": plan.job.name,
        "run_dir": str(plan.run_dir),
        "adapter": str(adapter),
        "adapter_step": progress.best_step if use_best else progress.step,
        "base_model": plan.job.model,
        "dataset": str(plan.dataset.root),
        "dataset_hash": plan.dataset.content_hash,
        "objective": s.objective,
        "examples": {"train": len(plan.train), "validation": len(plan.validation),
                     "ties_dropped": plan.dataset.ties_dropped},
        "steps": progress.step,
        "total_steps": plan.total_steps,
        "stopped_early": stopped_early,
        "seconds": round(seconds, 2),
        "encode_cache": encode_counts,
        "final_train_loss": progress.history[-1]["loss"] if progress.history else None,
        "final_val_loss": progress.validation[-1]["val_loss"] if progress.validation else None,
        "base_val_loss": progress.validation[0]["val_loss"] if progress.validation else None,
        "best_val_loss": progress.best_val,
        "best_step": progress.best_step,
        "history": progress.history,
        "validation": progress.validation,
        "settings": settings_dict(s),
    }
    (plan.run_dir / "report.json").write_text(json.dumps(report, indent=2))
    loss_curve([(r["step"], r["loss"]) for r in progress.history],
               [(r["step"], r["val_loss"]) for r in progress.validation], plan.run_dir / "loss.png")
    return report


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--set KEY=VALUE pairs, VALUE in TOML syntax (bare words are taken as strings)."""
    import tomllib

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[a-z_0-9]+", key.strip()):
            raise TrainError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set rank=32")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------------------------
# the command


def _apply_overrides(settings: TrainingConfig, changes: dict[str, Any]) -> TrainingConfig:
    import typing

    hints = typing.get_type_hints(TrainingConfig)
    for key, value in changes.items():
        if key not in hints:
            raise TrainError(f"--set {key}: unknown [training] key (see config.toml)")
        default = getattr(TrainingConfig(), key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            changes[key] = float(value)
        elif type(value) is not type(default):
            raise TrainError(f"--set {key}: expected {type(default).__name__}, got {value!r}")
    try:
        return dataclasses.replace(settings, **changes)
    except ValueError as exc:
        raise TrainError(f"[training] {exc}") from None


def _train_command():
    import click

    @click.command("train")
    @click.argument("dataset", type=click.Path(path_type=Path))
    @click.option("--name", required=True, help="Adapter name (what `adapters publish` will call it).")
    @click.option("--objective", type=click.Choice(["sft", "dpo", "kto"]), help="Overrides [training] objective.")
    @click.option("--model", help="Base model: diffusers directory, hub id or 'tiny' (default: [service] model).")
    @click.option("--output", type=click.Path(path_type=Path, file_okay=False),
                  help="Run directory (default: DATA_DIR/runs/NAME-TIMESTAMP).")
    @click.option("--resume", type=click.Path(path_type=Path, exists=True, file_okay=False),
                  help="Continue from a checkpoint directory, or a run directory's latest checkpoint.")
    @click.option("--steps", type=click.IntRange(min=1), help="Overrides [training] max_steps.")
    @click.option("--epochs", type=click.IntRange(min=0), help="Overrides [training] epochs.")
    @click.option("--rank", type=click.IntRange(min=1), help="Overrides [training] rank.")
    @click.option("--alpha", type=float, help="Overrides [training] alpha.")
    @click.option("--lr", type=float, help="Overrides [training] learning_rate.")
    @click.option("--batch-size", type=click.IntRange(min=1), help="Overrides [training] batch_size.")
    @click.option("--kohya", is_flag=True, default=None, help="Also write adapter.kohya.safetensors (A1111/ComfyUI).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override any [training] key, VALUE in TOML syntax: --set targets='[\"attention\",\"proj\"]'.")
    @click.pass_obj
    def train_command(app, dataset, name, objective, model, output, resume, steps, epochs, rank, alpha, lr,
                      batch_size, kohya, overrides):
        """Train a LoRA adapter on DATASET (sft, dpo or kto) and write a run directory.

        \b
        Examples:
          loraloop train data/datasets/foxes --name foxes --steps 800
          loraloop train data/datasets/pairs --name house --objective dpo
          loraloop train data/datasets/foxes --name foxes --resume data/runs/foxes-20260101-120000
        """
        config = app.config
        flags = {"objective": objective, "max_steps": steps, "epochs": epochs, "rank": rank, "alpha": alpha,
                 "learning_rate": lr, "batch_size": batch_size, "kohya_copy": kohya}
        try:
            changes = parse_overrides(overrides)
            changes.update({k: v for k, v in flags.items() if v is not None})
            settings = _apply_overrides(config.training, changes)
            job = Job(dataset=dataset, name=name, model=model or config.service.model, settings=settings,
                      data_dir=config.data_dir, output=output, resume=resume)
            plan = validate(job)
            for note in plan.resume_notes:
                click.echo(f"resume: setting changed since the checkpoint: {note}", err=True)
            for warning in plan.warnings:
                click.echo(f"warning: {warning}", err=True)
            click.echo(f"training {name} ({settings.objective}) on {len(plan.train)} examples "
                       f"({len(plan.validation)} held out) for {plan.total_steps} steps -> {plan.run_dir}", err=True)
            report = train(plan)
        except (TrainError, Interrupted) as exc:
            raise click.ClickException(str(exc)) from None
        if report:
            val = report["final_val_loss"]
            click.echo(f"adapter: {report['adapter']} (step {report['adapter_step']})")
            click.echo(f"final train loss {report['final_train_loss']:.4g}"
                       + (f", validation loss {val:.4g}" if val is not None else "")
                       + f"; report: {plan.run_dir / 'report.json'}")
            click.echo(f"publish it: loraloop adapters publish {plan.run_dir} --name {name}")

    return train_command


train_command = _train_command()
