"""LoRA training on the UNet: `loraloop train DATASET --name NAME`.

    loraloop train data/datasets/foxes --name foxes                        # SFT, settings from [training]
    loraloop train data/datasets/pairs --name house --objective dpo --steps 400
    loraloop train data/datasets/foxes --name foxes --set rank=32 --set lr_scheduler=cosine
    loraloop train data/datasets/foxes --name foxes --resume data/runs/foxes-20260101-120000
    loraloop train data/datasets/foxes --name foxes --model stabilityai/stable-diffusion-xl-base-1.0
    loraloop train data/datasets/rex --name rex --class-prompt "a photo of a dog" --prior-images 100
    accelerate launch --multi_gpu --num_processes 2 $(which loraloop) train data/datasets/foxes --name foxes

The last line is the multi-GPU form: the same command under `accelerate launch` (the batch
is per process; epochs are shared out). Checked here with two CPU processes:
`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 $(which loraloop) train ...`.

The settings are the [training] section of config.toml (one commented screen, loraloop/config.py).
This file reads top to bottom: validate() checks everything that can be checked before any
weights load; setup() loads the model and adds the adapter; train() is the loop (micro-steps,
clip, step, log, validate, sample, checkpoint); finish() writes the result. Around it:
training/data.py reads the dataset and training/encoding.py encodes it; training/denoising.py
runs the UNet on a micro-batch and training/objectives.py scores it; training/checkpoint.py
saves and resumes; training/adapter_files.py writes the adapter; training/cli.py is the command.

A run directory holds: adapter.safetensors (diffusers LoRA format, provenance in its metadata)
and adapter.kohya.safetensors (the same weights for A1111), report.json, loss.png, and when they
apply best/ (with a validation split), checkpoints/step-N/ (every checkpoint_every steps,
resumable) and samples/step-N.png (with validation_prompts and sample_every).

Determinism: every random draw in the loop (batch order, flips, caption dropout, latent
sampling, noise, timesteps) comes from one seeded generator whose state is checkpointed; batch
order is a pure function of (seed, epoch). So a resumed run repeats the uninterrupted one.

SD 1.x, 2.x and SDXL base models train the same way; an SDXL UNet (`addition_embed_type
"text_time"`) brings its second text encoder, and training/encoding.py adds the pooled text and
size conditioning it needs to the encode cache.

DreamBooth's prior preservation (`class_prompt`, `prior_images`): setup() first has the base
model draw the class images (training/prior.py, cached by prompt and seed), and every micro-batch
then holds as many class images as subject images, so its loss is the subject's plus
`prior_loss_weight` times the class images' (one UNet pass for both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import diffusers
import torch
import transformers
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from tqdm.auto import tqdm

from generation.contract import ADAPTER_NAME_RE
from loraloop.config import TrainingConfig
from loraloop.tiny import loadable_model
from training import checkpoint
from training.adapter_files import ADAPTER_FILE, copy_adapter, save_adapter
from training.base_model import AUTO, BaseModelError, native_resolution
from training.checkpoint import Progress
from training.data import Dataset, DatasetError, Example, load_dataset, split_examples
from training.denoising import evaluate, micro_batch_loss, render_samples
from training.encoding import Encoder
from training.images import loss_curve
from training.prior import PriorError, PriorRequest, class_images
from training.speed import FAST, Speed, keep_malloc_buffers, optimizer_options

log = logging.getLogger(__name__)

# "org/name": anything else that is not an existing path is a typo'd path, caught here, not in from_pretrained.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TARGET_MODULES = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "proj": ["proj_in", "proj_out"],
    "resnet": ["conv1", "conv2", "conv_shortcut"],
}
TRACKERS_AVAILABLE = {"tensorboard": accelerate.utils.is_tensorboard_available,
                      "wandb": accelerate.utils.is_wandb_available, "mlflow": accelerate.utils.is_mlflow_available,
                      "comet_ml": accelerate.utils.is_comet_ml_available}


class TrainError(Exception):
    """A problem found before or during training that a person can fix; the message says how."""


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
    # Where class images for prior preservation are asked for first; None: always drawn locally.
    service_url: str | None = None
    service_token: str | None = None


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
    identity: checkpoint.RunIdentity  # what checkpoints record, and what a resume must match
    resume: checkpoint.Resume | None = None
    # Things worth knowing that do not stop the run (printed before it starts).
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# validate: everything that can fail, before any weights load


def check_trainable_base_model(model: str) -> str:
    """The base model to load, refused now if this loop cannot train it.

    Refused: a directory without unet/ and vae/, a UNet with conditioning other than SDXL's, an SDXL
    model without both text encoders (the refiner), a single-file checkpoint, and a name that is
    neither an existing path nor shaped like a hub id (a hub id itself is checked when it loads).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir() or not (path / "vae").is_dir():
            raise TrainError(f"{path} is not a diffusers model directory (it has no unet/ and vae/ folders)")
        unet_config = path / "unet" / "config.json"
        sdxl = unet_config.is_file() and is_sdxl(json.loads(unet_config.read_text()), model)
        if sdxl and not all((path / part).is_dir() for part in ("text_encoder", "text_encoder_2", "tokenizer_2")):
            raise TrainError(f"{model} is an SDXL model without both text encoders (a refiner?); "
                             "loraloop trains SDXL base models, SD 1.x and 2.x")
        return str(path.resolve())
    if path.is_file():
        raise TrainError(f"{path}: training needs a diffusers model directory, not a single-file checkpoint")
    if not HUB_ID_RE.match(model):
        raise TrainError(f"base model {model} does not exist; give a diffusers directory, a hub id or 'tiny'")
    return model


def is_sdxl(unet_config: dict[str, Any], model: str) -> bool:
    """Whether a UNet is SDXL's (pooled text and size conditioning); any other extra conditioning is refused."""
    kind = unet_config.get("addition_embed_type")
    if kind not in (None, "text_time"):
        raise TrainError(f"{model}'s UNet takes {kind!r} conditioning; loraloop trains SD 1.x, 2.x and SDXL")
    return kind == "text_time"


def batches_per_epoch(examples: int, batch_size: int, processes: int) -> int:
    return math.ceil(examples / (batch_size * processes))


def _pick_trackers(log_with: str) -> list[str]:
    """accelerate tracker names for `log_with`, each checked the way accelerate checks it."""
    if log_with == "none":
        return []
    if log_with == "auto":
        # wandb only when named: it asks for a login, which would stall an unattended run.
        return ["tensorboard"] if TRACKERS_AVAILABLE["tensorboard"]() else []
    names = [name.strip() for name in log_with.split(",") if name.strip()]
    for name in names:
        if name not in TRACKERS_AVAILABLE:
            raise TrainError(f"log_with: unknown tracker {name!r}; "
                             f"use {', '.join(TRACKERS_AVAILABLE)}, 'auto' or 'none'")
        if not TRACKERS_AVAILABLE[name]():
            raise TrainError(f"log_with names {name}, which is not installed; "
                             f"pip install {name} or set log_with='none'")
    return names


def validate(job: Job, processes: int | None = None) -> Plan:
    """Check the job and resolve everything; raise TrainError with what to do on the first problem."""
    s = job.settings
    if processes is None:
        # Under `accelerate launch` the epochs are shared out across the processes. The state is
        # built as AcceleratorState builds it (honouring --cpu), so the Accelerator reuses it.
        use_cpu = accelerate.utils.parse_flag_from_env("ACCELERATE_USE_CPU")
        processes = accelerate.PartialState(cpu=use_cpu).num_processes
    if s.prior_images and not s.class_prompt.strip():
        raise TrainError("--prior-images needs --class-prompt, the class the subject belongs to "
                         "(\"a photo of a dog\" for \"sks dog\")")
    if s.class_prompt.strip() and not s.prior_images:
        raise TrainError("--class-prompt needs --prior-images N, how many class images to train beside "
                         "the subject (DreamBooth used 100 to 200)")
    if s.prior_images and s.objective != "sft":
        raise TrainError(f"prior preservation is for sft (a subject from a few photos), not {s.objective}; "
                         "drop --class-prompt and --prior-images")
    if not ADAPTER_NAME_RE.match(job.name):
        raise TrainError(f"adapter name {job.name!r} is not valid: use letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit, at most 64 characters")
    try:
        dataset = load_dataset(job.dataset, s.objective, image_cache=job.data_dir / "cache" / "dataset-images")
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    train, validation = split_examples(dataset.examples, s.validation_split, s.seed)
    if s.early_stopping_patience and not validation:
        raise TrainError("early stopping needs a validation split; set validation_split > 0 with at least 2 examples")
    if s.objective == "kto" and len({e.desirable for e in train}) < 2:
        raise TrainError("the KTO training split needs both liked and disliked images; "
                         "add more or lower validation_split")
    if s.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainError("mixed_precision 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU")
    trackers = _pick_trackers(s.log_with)
    model_path = check_trainable_base_model(loadable_model(job.model, job.data_dir))
    if s.resolution == AUTO:  # the base model's native size, recorded as a number in the run and its adapter
        try:
            s = dataclasses.replace(s, resolution=native_resolution(model_path))
        except BaseModelError as exc:
            raise TrainError(str(exc)) from None
        job = dataclasses.replace(job, settings=s)
    if s.epochs:
        per_epoch = batches_per_epoch(len(train), s.batch_size, processes)
        total_steps = max(1, math.ceil(s.epochs * per_epoch / s.grad_accumulation))
    else:
        total_steps = s.max_steps
    identity = checkpoint.RunIdentity(processes=processes, settings=dataclasses.asdict(s),
                                      dataset_hash=dataset.content_hash, base_model=job.model)
    resume = None
    if job.resume is not None:
        try:
            resume = checkpoint.load_resume(job.resume, identity, total_steps)
        except checkpoint.ResumeError as exc:
            raise TrainError(str(exc)) from None
    default_run_dir = job.data_dir / "runs" / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = job.output or (resume.checkpoint.parent.parent if resume else default_run_dir)
    warnings = []
    uncaptioned = sum(1 for e in dataset.examples if not e.caption.strip())
    if uncaptioned:
        warnings.append(f"{uncaptioned} of {len(dataset.examples)} images have no caption and train as "
                        f"{'the trigger word alone' if s.trigger_word.strip() else 'unconditional'}; "
                        f"`loraloop dataset caption {dataset.root}` fills them")
    return Plan(job=job, dataset=dataset, train=train, validation=validation, model_path=model_path,
                run_dir=Path(run_dir), total_steps=total_steps, trackers=trackers, identity=identity,
                resume=resume, warnings=warnings)


# ---------------------------------------------------------------------------------------------
# setup: model, adapter, optimiser, schedule, encoded data


@dataclass
class Setup:
    """What setup() loaded and made; training/denoising.py's `Models` is the part the UNet's passes use."""

    accelerator: accelerate.Accelerator
    unet: Any  # prepared by accelerate (wrapped for DDP on several processes); unwrap_model gives the UNet
    # Any: mypy reads diffusers' lazy top-level classes as its dummy placeholders, and transformers
    # types a model's .to() through a decorator mypy cannot call.
    vae: Any
    text_encoder: Any
    tokenizer: transformers.CLIPTokenizer
    text_encoder_2: Any  # SDXL's second text encoder (with the projection for the pooled embedding), or None
    tokenizer_2: transformers.CLIPTokenizer | None
    noise_scheduler: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    weight_dtype: torch.dtype
    lora_config: LoraConfig
    encoder: Encoder
    # Prior preservation's class images (Example.prior set), and how many were generated or reused.
    prior: list[Example] = field(default_factory=list)
    prior_counts: dict[str, Any] = field(default_factory=dict)


def setup(plan: Plan, speed: Speed = FAST) -> Setup:
    s = plan.job.settings
    accelerator = accelerate.Accelerator(mixed_precision=s.mixed_precision, log_with=plan.trackers or None,
                                         project_dir=str(plan.run_dir))
    prior, prior_counts = _class_examples(plan, accelerator)  # before the training model loads: it may draw them
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(plan.model_path, subfolder="tokenizer")
        text_encoder = transformers.CLIPTextModel.from_pretrained(plan.model_path, subfolder="text_encoder")
        vae = diffusers.AutoencoderKL.from_pretrained(plan.model_path, subfolder="vae")
        unet = diffusers.UNet2DConditionModel.from_pretrained(plan.model_path, subfolder="unet")
        noise_scheduler = diffusers.DDPMScheduler.from_pretrained(plan.model_path, subfolder="scheduler")
        text_encoder_2 = tokenizer_2 = None
        if is_sdxl(dict(unet.config), plan.job.model):  # hub ids are only known once loaded
            tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(plan.model_path, subfolder="tokenizer_2")
            text_encoder_2 = transformers.CLIPTextModelWithProjection.from_pretrained(
                plan.model_path, subfolder="text_encoder_2")
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load base model {plan.job.model}: {exc}") from None
    for module in (vae, text_encoder, text_encoder_2, unet):
        if module is not None:
            module.requires_grad_(False)
            # Frozen parts run in the mixed-precision dtype; the LoRA weights stay fp32 so small updates are not lost.
            module.to(accelerator.device, dtype=weight_dtype)
    if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (its config says so); the encoder follows its dtype
    lora_config = LoraConfig(
        r=s.rank, lora_alpha=s.alpha,  # type: ignore[arg-type]  # peft says int; alpha/rank scaling takes any number
        lora_dropout=s.dropout, init_lora_weights="gaussian",
        target_modules=[module for target in s.targets for module in TARGET_MODULES[target]],
    )
    torch.manual_seed(s.seed)  # the LoRA A matrices' initial values
    unet.add_adapter(lora_config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    optimizer_class: Any = torch.optim.AdamW
    if s.adam_8bit and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes  # optional and CUDA-only: imported only where it is installed and asked for

        optimizer_class = bitsandbytes.optim.AdamW8bit
    optimizer = optimizer_class(trainable, lr=s.learning_rate, weight_decay=s.weight_decay,
                                **optimizer_options(speed, optimizer_class))
    schedule = "constant_with_warmup" if s.lr_scheduler == "constant" and s.warmup_steps else s.lr_scheduler
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=s.warmup_steps,
                                 num_training_steps=plan.total_steps, num_cycles=s.lr_cycles)
    # The schedule is stepped once per optimiser step by us, not prepared: accelerate would step it
    # once per process.
    unet, optimizer = accelerator.prepare(unet, optimizer)
    encoder = Encoder(s, plan.model_path, plan.job.data_dir / "cache" / "training", vae, text_encoder, tokenizer,
                      accelerator.device, weight_dtype, text_encoder_2, tokenizer_2)
    return Setup(accelerator, unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, noise_scheduler,
                 optimizer, lr_scheduler, weight_dtype, lora_config, encoder, prior, prior_counts)


def _class_examples(plan: Plan, accelerator: accelerate.Accelerator) -> tuple[list[Example], dict[str, Any]]:
    """The class images prior preservation trains on, drawn now where the cache lacks them."""
    s = plan.job.settings
    if not s.prior_images:
        return [], {}
    request = PriorRequest(model=plan.job.model, prompt=s.class_prompt.strip(), count=s.prior_images,
                           resolution=int(s.resolution), steps=s.prior_steps, seed=s.seed)
    with accelerator.main_process_first():  # the others then find every image in the cache
        try:
            drawn = class_images(request, plan.job.data_dir, plan.job.service_url, plan.job.service_token)
        except PriorError as exc:
            raise TrainError(str(exc)) from None
    examples = [Example(caption=request.prompt, image=path, weight=s.prior_loss_weight, prior=True)
                for path in drawn.paths]
    return examples, {"class_prompt": request.prompt, "images": len(examples), "generated": drawn.generated,
                      "reused": drawn.reused, "source": drawn.source}


# ---------------------------------------------------------------------------------------------
# the loop: batch order, micro-steps, clip, step, log, validate, sample, checkpoint


def batch_indices(micro_step: int, count: int, batch_size: int, seed: int, processes: int, rank: int) -> list[int]:
    """Which examples micro-step `micro_step` trains on: a pure function of it, so resume is exact."""
    per_epoch = batches_per_epoch(count, batch_size, processes)
    epoch, position = divmod(micro_step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    start = (position * processes + rank) * batch_size
    chosen = order[start:start + batch_size]
    # The last batch of an epoch can be short (or, across processes, empty): top it up from the start.
    return chosen + order[: batch_size - len(chosen)] if len(chosen) < batch_size else chosen


def train(plan: Plan, on_step: Callable[[Progress], None] | None = None, speed: Speed = FAST) -> dict[str, Any]:
    """Run the plan and return the report (also written to run_dir/report.json).

    `speed` only changes how fast (training/speed.py): the same seed gives the same numbers either way.
    """
    s = plan.job.settings
    if speed.keep_malloc_buffers:
        keep_malloc_buffers()
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    started = time.monotonic()
    st = setup(plan, speed)
    accelerator = st.accelerator
    is_main = accelerator.is_main_process
    encode_counts = _write_config_and_encode(st, plan)
    generator = torch.Generator().manual_seed(s.seed)
    progress = _starting_progress(st, plan, generator)
    if plan.trackers:
        accelerator.init_trackers("loraloop", config={k: v for k, v in dataclasses.asdict(s).items()
                                                      if isinstance(v, (int, float, str, bool))})
    st.unet.train()
    bar = tqdm(total=plan.total_steps, initial=progress.step, disable=not is_main, desc=plan.job.name, unit="step")
    stopped_early = False
    step_start: checkpoint.StepStart | None = None  # while a step runs: what Ctrl-C rolls back to
    try:
        while progress.step < plan.total_steps:
            step_start = checkpoint.StepStart.now(generator, progress)
            record = _accumulate_gradients(st, plan, progress, generator)  # the micro-batches: forward, backward
            if s.max_grad_norm:
                accelerator.clip_grad_norm_(st.unet.parameters(), s.max_grad_norm)
            with checkpoint.ctrl_c_deferred():
                st.optimizer.step()
                st.lr_scheduler.step()
                st.optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.history.append(record)
                step_start = None
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"})

            if plan.validation and (progress.step % s.validation_every == 0 or progress.step == plan.total_steps):
                record.update(_evaluate_and_keep_best(st, plan, progress))
            if plan.trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=progress.step)
            if s.validation_prompts and s.sample_every and progress.step % s.sample_every == 0 and is_main:
                render_samples(st, s, list(s.validation_prompts), progress.step, plan.run_dir)
            if progress.step % s.checkpoint_every == 0 and is_main:
                _save_checkpoint(st, plan, progress, generator)
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
            if step_start is not None:  # no update was applied yet: undo the draws the unfinished step made
                step_start.roll_back(generator, progress)
                st.optimizer.zero_grad(set_to_none=True)
            raise checkpoint.Interrupted(_save_checkpoint(st, plan, progress, generator)) from None
        raise
    bar.close()
    accelerator.wait_for_everyone()
    report: dict[str, Any] = {}
    if is_main:
        report = finish(st, plan, progress, stopped_early, time.monotonic() - started, encode_counts)
    if plan.trackers:
        accelerator.end_training()
    return report


def _write_config_and_encode(st: Setup, plan: Plan) -> dict[str, int]:
    """config.json in the run directory, then every example encoded; how many were encoded and reused."""
    s = plan.job.settings
    is_main = st.accelerator.is_main_process
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (plan.run_dir / "config.json").write_text(json.dumps(
            {"dataset": str(plan.dataset.root), "name": plan.job.name, "base_model": plan.job.model,
             "settings": dataclasses.asdict(s)}, indent=2))
    st.encoder.warm(plan.train + plan.validation + st.prior, show_progress=is_main)
    log.info("%d training and %d validation examples; encoded %d, reused %d from the cache",
             len(plan.train), len(plan.validation), st.encoder.cache.encoded, st.encoder.cache.reused)
    encode_counts = {"encoded": st.encoder.cache.encoded, "reused": st.encoder.cache.reused}
    if s.cache_latents:
        # Everything is encoded: the VAE and text encoder leave the GPU until a sample grid needs them.
        for module in (st.vae, st.text_encoder, st.text_encoder_2):
            if module is not None:
                module.to("cpu")
    return encode_counts


def _starting_progress(st: Setup, plan: Plan, generator: torch.Generator) -> Progress:
    """Where the loop starts: the checkpoint's progress, or a fresh run with the base model's validation loss."""
    progress = Progress()
    if plan.resume is not None:
        progress = checkpoint.restore(plan.resume.state, unet=st.accelerator.unwrap_model(st.unet),
                                      optimizer=st.optimizer, lr_scheduler=st.lr_scheduler, generator=generator)
        log.info("resumed at step %d%s", progress.step,
                 "; settings changed: " + "; ".join(plan.resume.notes) if plan.resume.notes else "")
    if plan.validation and not progress.validation:
        # The base model's validation loss: the line every later evaluation is measured against.
        val_loss, val_metrics = evaluate(st, plan.job.settings, plan.validation, progress.kl_estimate)
        progress.validation.append({"step": 0, "val_loss": val_loss, **val_metrics})
    return progress


def _accumulate_gradients(st: Setup, plan: Plan, progress: Progress, generator: torch.Generator) -> dict[str, float]:
    """The micro-batches of the next step, forward and backward; its record (loss, lr and the objective's metrics)."""
    s = plan.job.settings
    accelerator = st.accelerator
    metrics_sum: dict[str, float] = {}
    loss_sum = 0.0
    for micro in range(s.grad_accumulation):
        micro_step = progress.step * s.grad_accumulation + micro
        chosen = batch_indices(micro_step, len(plan.train), s.batch_size, s.seed, accelerator.num_processes,
                               accelerator.process_index)
        # Gradients are averaged across processes once, on the last micro-batch.
        sync = contextlib.nullcontext() if micro == s.grad_accumulation - 1 else accelerator.no_sync(st.unet)
        with sync:
            batch = [plan.train[i] for i in chosen]
            if st.prior:
                # As many class images as subject images, in their own seeded order (so resume is exact),
                # in the same UNet pass; their Example.weight is prior_loss_weight.
                batch += [st.prior[i] for i in batch_indices(micro_step, len(st.prior), s.batch_size, s.seed + 1,
                                                             accelerator.num_processes, accelerator.process_index)]
            loss, metrics, progress.kl_estimate = micro_batch_loss(
                st, s, batch, generator, training=True, kl_estimate=progress.kl_estimate)
            if st.prior:
                # The weighted mean over both halves is (subject + weight x class) / 2: DreamBooth's sum, halved.
                loss = loss * 2
            accelerator.backward(loss / s.grad_accumulation)
        # The mean over processes, so the log shows the whole batch; .item() syncs with the GPU.
        loss_sum += accelerator.reduce(loss.detach(), reduction="mean").item()
        for key, value in metrics.items():
            metrics_sum[key] = metrics_sum.get(key, 0.0) + value
    record = {"step": progress.step + 1, "loss": loss_sum / s.grad_accumulation,
              "lr": float(st.lr_scheduler.get_last_lr()[0]),
              **{k: v / s.grad_accumulation for k, v in metrics_sum.items()}}
    if not math.isfinite(record["loss"]):
        raise TrainError(f"the loss became {record['loss']} at step {progress.step + 1}; "
                         "lower learning_rate or use mixed_precision 'bf16'/'no'")
    return record


def _evaluate_and_keep_best(st: Setup, plan: Plan, progress: Progress) -> dict[str, float]:
    """The validation loss and metrics now; a new best adapter goes to best/, anything else counts as stale."""
    val_loss, val_metrics = evaluate(st, plan.job.settings, plan.validation, progress.kl_estimate)
    progress.validation.append({"step": progress.step, "val_loss": val_loss, **val_metrics})
    if progress.best_val is None or val_loss < progress.best_val - plan.job.settings.early_stopping_min_delta:
        progress.best_val, progress.best_step, progress.stale_evaluations = val_loss, progress.step, 0
        if st.accelerator.is_main_process:
            save_adapter(st.accelerator.unwrap_model(st.unet), st.lora_config, plan.run_dir / "best",
                         provenance(plan, progress))
    else:
        progress.stale_evaluations += 1
    return {"val_loss": val_loss, **val_metrics}


def _save_checkpoint(st: Setup, plan: Plan, progress: Progress, generator: torch.Generator) -> Path:
    return checkpoint.save(plan.run_dir, progress, plan.identity, unet=st.accelerator.unwrap_model(st.unet),
                           lora_config=st.lora_config, optimizer=st.optimizer, lr_scheduler=st.lr_scheduler,
                           generator=generator, provenance=provenance(plan, progress),
                           keep=plan.job.settings.checkpoints_keep)


# ---------------------------------------------------------------------------------------------
# finish: the adapter, the report, the loss curve


def finish(st: Setup, plan: Plan, progress: Progress, stopped_early: bool, seconds: float,
           encode_counts: dict[str, int]) -> dict[str, Any]:
    """Write the final adapter (the best one when early stopping chose it), the report and the loss curve."""
    s = plan.job.settings
    unet = st.accelerator.unwrap_model(st.unet)
    best = plan.run_dir / "best" / ADAPTER_FILE
    use_best = bool(s.early_stopping_patience) and best.is_file()
    if use_best:
        # Early stopping keeps the best checkpoint: the run's adapter files are the ones that validated best.
        adapter = copy_adapter(best.parent, plan.run_dir)
    else:
        adapter = save_adapter(unet, st.lora_config, plan.run_dir, provenance(plan, progress))
    report = {
        "name": plan.job.name, "run_dir": str(plan.run_dir), "adapter": str(adapter),
        "adapter_step": progress.best_step if use_best else progress.step,
        "base_model": plan.job.model, "dataset": str(plan.dataset.root), "dataset_hash": plan.dataset.content_hash,
        "objective": s.objective,
        "examples": {"train": len(plan.train), "validation": len(plan.validation),
                     "ties_dropped": plan.dataset.ties_dropped},
        "steps": progress.step, "total_steps": plan.total_steps, "stopped_early": stopped_early,
        "seconds": round(seconds, 2), "encode_cache": encode_counts, "prior": st.prior_counts or None,
        "final_train_loss": progress.final_train_loss, "final_val_loss": progress.final_val_loss,
        "base_val_loss": progress.validation[0]["val_loss"] if progress.validation else None,
        "best_val_loss": progress.best_val, "best_step": progress.best_step,
        "history": progress.history, "validation": progress.validation, "settings": dataclasses.asdict(s),
    }
    (plan.run_dir / "report.json").write_text(json.dumps(report, indent=2))
    loss_curve([(int(r["step"]), r["loss"]) for r in progress.history],
               [(int(r["step"]), r["val_loss"]) for r in progress.validation], plan.run_dir / "loss.png")
    return report


def provenance(plan: Plan, progress: Progress) -> dict[str, Any]:
    """What an adapter file records about the run that made it (training/adapter_files.py writes it)."""
    s = plan.job.settings
    return {
        "name": plan.job.name, "base_model": plan.job.model,
        "dataset": str(plan.dataset.root), "dataset_hash": plan.dataset.content_hash,
        "objective": s.objective, "rank": s.rank, "alpha": s.alpha, "targets": s.targets, "resolution": s.resolution,
        "steps": progress.step, "final_train_loss": progress.final_train_loss,
        "final_val_loss": progress.final_val_loss, "best_val_loss": progress.best_val, "best_step": progress.best_step,
        "trigger_word": s.trigger_word,
        **({"class_prompt": s.class_prompt, "prior_images": s.prior_images, "prior_loss_weight": s.prior_loss_weight}
           if s.prior_images else {}),
    }
