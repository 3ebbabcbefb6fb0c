"""The UNet at work during training: the loss of one micro-batch, the validation loss, sample grids.

    loss, metrics, kl = micro_batch_loss(st, settings, examples, generator, training=True, kl_estimate=kl)
    val_loss, val_metrics = evaluate(st, settings, validation_examples, kl)
    render_samples(st, settings, ["a red fox"], step, run_dir)  # -> run_dir/samples/step-N.png

A micro-batch's loss: latents drawn from each image's VAE distribution (training/encoding.py),
noise and timesteps, the UNet's prediction of the noise (or of v), and the objective's score of
the error (training/objectives.py); for DPO and KTO the reference is the same UNet with the
adapter switched off. An SDXL UNet also gets each caption's pooled embedding and each image's
size conditioning (`added_cond_kwargs`), both from the encode cache. Every random draw comes
from the generator passed in, in a fixed order, so a resumed run draws exactly what the
uninterrupted one did. The trainer (training/train.py) calls these with what its setup()
loaded; `Models` names the part of that they use.

Floor: part of training/; imports torch, diffusers, loraloop.config and training's encoding,
objectives and images, nothing of the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import compute_snr

from loraloop.config import TrainingConfig
from training import objectives
from training.data import Example
from training.encoding import Encoder
from training.images import labelled_grid


class Models(Protocol):
    """What these functions use of the trainer's setup (training/train.py's Setup)."""

    # Any: accelerate ships no types, and mypy reads diffusers' lazy top-level classes as placeholders.
    accelerator: Any
    unet: Any  # as accelerate prepared it; accelerator.unwrap_model(unet) has the adapter methods
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any  # SDXL's second text encoder and its tokenizer; None for SD 1.x and 2.x
    tokenizer_2: Any
    noise_scheduler: Any
    weight_dtype: torch.dtype
    encoder: Encoder


@contextlib.contextmanager
def adapter_disabled(unet: Any) -> Iterator[None]:
    """The reference model for DPO/KTO: the same UNet with the LoRA switched off (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def micro_batch_loss(st: Models, s: TrainingConfig, examples: list[Example], generator: torch.Generator,
                     training: bool, kl_estimate: float = 0.0) -> tuple[torch.Tensor, dict[str, float], float]:
    """Loss, metrics and the new KTO estimate for one micro-batch. Every random draw comes from `generator`."""
    device = st.accelerator.device
    count = len(examples)
    flips = (torch.rand(count, generator=generator) < 0.5).tolist() if training and s.random_flip else [False] * count
    dropped = (torch.rand(count, generator=generator) < s.caption_dropout).tolist() if training else [False] * count
    images = [e.image for e in examples]
    if s.objective == "dpo":  # the preferred images, then the rejected ones (every DPO example has one)
        images += [e.rejected for e in examples if e.rejected is not None]
    image_flips = [flips[i % count] for i in range(len(images))]
    added: dict[str, torch.Tensor] | None = None
    if st.encoder.sdxl:
        # SDXL also needs each image's size conditioning, which its cached stats carry.
        stats = [st.encoder.latent_stats(path, flip) for path, flip in zip(images, image_flips, strict=True)]
        mean, std = torch.stack([x["mean"] for x in stats]), torch.stack([x["std"] for x in stats])
    else:
        mean, std = st.encoder.latent_stats_batch(images, image_flips)
    # Sampled here, not cached, so every epoch sees a fresh draw from the VAE's distribution.
    latents = (mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)) * st.encoder.scaling
    if st.encoder.sdxl:
        texts = [st.encoder.unconditional() if dropped[i] else st.encoder.text_embedding(st.encoder.caption(e))
                 for i, e in enumerate(examples)]
        embeddings = torch.stack([t["embedding"] for t in texts])  # (B, 77, D)
        # Pooled text per caption, size conditioning per image (for DPO, the rejected ones' too).
        added = {"text_embeds": torch.stack([t["pooled"] for t in texts]),  # (B, P)
                 "time_ids": torch.stack([x["time_ids"] for x in stats])}  # (B or 2B, 6)
    else:
        captions = ["" if dropped[i] else st.encoder.caption(e) for i, e in enumerate(examples)]
        embeddings = st.encoder.text_embeddings(captions)  # (B, 77, D)

    noise = torch.randn((count, *latents.shape[1:]), generator=generator)
    if s.noise_offset:
        noise += s.noise_offset * torch.randn((count, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, st.noise_scheduler.config.num_train_timesteps, (count,), generator=generator)
    if s.objective == "dpo":
        # Both images of a pair share noise, timestep and caption, so their errors are comparable.
        noise, timesteps, embeddings = noise.repeat(2, 1, 1, 1), timesteps.repeat(2), embeddings.repeat(2, 1, 1)
        if added is not None:
            added["text_embeds"] = added["text_embeds"].repeat(2, 1)
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    embeddings = embeddings.to(device, st.weight_dtype)
    if added is not None:
        added = {k: v.to(device, st.weight_dtype) for k, v in added.items()}
    noisy = st.noise_scheduler.add_noise(latents, noise, timesteps).to(st.weight_dtype)
    v_prediction = st.noise_scheduler.config.prediction_type == "v_prediction"
    target = st.noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise

    with st.accelerator.autocast():
        prediction = st.unet(noisy, timesteps, embeddings, added_cond_kwargs=added).sample
    error = objectives.denoising_error(prediction, target)
    example_weights = torch.tensor([e.weight for e in examples], device=device)  # (B,) the dataset's weights
    if s.objective == "sft":
        weights = example_weights
        if s.snr_gamma:
            snr = compute_snr(st.noise_scheduler, timesteps)
            weights = weights * objectives.min_snr_weights(snr, s.snr_gamma, v_prediction)
        loss, metrics = objectives.sft(error, weights)
        return loss, metrics, kl_estimate

    with torch.no_grad(), adapter_disabled(st.accelerator.unwrap_model(st.unet)), st.accelerator.autocast():
        reference = objectives.denoising_error(
            st.unet(noisy, timesteps, embeddings, added_cond_kwargs=added).sample, target)
    if s.objective == "dpo":
        loss, metrics = objectives.dpo(error[:count], error[count:], reference[:count], reference[count:], s.dpo_beta,
                                       example_weights)
        return loss, metrics, kl_estimate
    desirable = torch.tensor([e.desirable for e in examples], device=device)
    loss, metrics, new_kl = objectives.kto(error, reference, desirable, s.kto_beta, kl_estimate, example_weights)
    return loss, metrics, (new_kl if training else kl_estimate)


def evaluate(st: Models, s: TrainingConfig, examples: list[Example],
             kl_estimate: float) -> tuple[float, dict[str, float]]:
    """Validation loss with the same noise every time (a fixed seed), so evaluations are comparable."""
    generator = torch.Generator().manual_seed(s.seed + 1)
    st.unet.eval()
    losses: list[float] = []
    metrics_sum: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(examples), s.batch_size):
            chunk = examples[start:start + s.batch_size]
            loss, metrics, _ = micro_batch_loss(st, s, chunk, generator, training=False, kl_estimate=kl_estimate)
            losses.append(loss.item() * len(chunk))
            for key, value in metrics.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value * len(chunk)
    st.unet.train()
    total = len(examples)
    return sum(losses) / total, {f"val_{k}": v / total for k, v in metrics_sum.items()}


def render_samples(st: Models, s: TrainingConfig, prompts: list[str], step: int, run_dir: Path) -> Path:
    """The validation prompts rendered with the current adapter, one fixed seed per prompt, as one grid."""
    unet = st.accelerator.unwrap_model(st.unet)
    device = st.accelerator.device
    frozen = [m for m in (st.vae, st.text_encoder, st.text_encoder_2) if m is not None]
    for module in frozen:
        module.to(device)
    scheduler = DPMSolverMultistepScheduler.from_config(st.noise_scheduler.config)
    pipe: Any  # Any: see Models
    if st.text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(vae=st.vae, text_encoder=st.text_encoder, text_encoder_2=st.text_encoder_2,
                                         tokenizer=st.tokenizer, tokenizer_2=st.tokenizer_2, unet=unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=st.vae, text_encoder=st.text_encoder, tokenizer=st.tokenizer, unet=unet, scheduler=scheduler,
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
        for module in frozen:
            module.to("cpu")
    path = run_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid([images], [f"step {step}"], prompts).save(path)
    return path
