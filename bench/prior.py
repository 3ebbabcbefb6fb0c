"""Does prior preservation keep the class where the base model had it? DreamBooth on the tiny model.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.prior
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.prior --render-guidance 1.0 --workdir /tmp/prior  # reuses the base
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.prior --caption-dropout 0.2 --seeds 5

The tiny model is first taught two classes by training its whole UNet ("a photo of a dog": a
brown blob on green; "a photo of a cat": a grey box on white), so that it has a class worth
preserving. A subject ("sks dog": a few yellow discs on blue, one held out for validation) is trained with
`loraloop train`'s own code twice per training seed: plain sft, and sft with prior preservation
(`class_prompt` "a photo of a dog", `prior_images`, `prior_loss_weight`), everything else equal.
Then the class prompt is rendered with the same render seeds by the base model and by each
adapter, and the figure is how far each adapter's class images moved from the base model's:
the root mean square pixel difference (0..1 scale), averaged over the render seeds. Lower is
closer to the base model. Beside it, the same distance on the UNet's own output: its noise
prediction for the class prompt on the base model's class images, noised at five fixed
timesteps with fixed noise, which sampling (and guidance) does not amplify. The held-out
subject's validation loss says whether the subject was still learned (the base model's is the
line to beat).

The pictures are toy shapes, 32 px; what is measured is the effect of the loss on the model,
which does not need a model that draws real dogs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file's name would then
# shadow the `training` package it benchmarks.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

CLASS_PROMPT = "a photo of a dog"


def subject_dataset(root: Path, count: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (20, 40 + 10 * i, 220))
        ImageDraw.Draw(image).ellipse([2 + i, 3, size - 4, size - 3 - i], fill=(250, 220, 20))
        image.save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "sks dog"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def class_picture(rng, size: int, prompt: str):
    """The base model's world: "a photo of a dog" is a brown blob on green, "a photo of a cat" a grey box on white."""
    from PIL import Image, ImageDraw

    dog = prompt == CLASS_PROMPT
    image = Image.new("RGB", (size, size), (40, 150, 60) if dog else (235, 235, 235))
    x, y, w = rng.randrange(size // 2), rng.randrange(size // 2), rng.randrange(size // 3, size // 2)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if dog else draw.rectangle)([x, y, x + w, y + w], fill=(120, 70, 30) if dog else (110, 110, 110))
    return image


def pretrain_base(tiny: Path, out: Path, size: int, steps: int) -> Path:
    """The tiny model with its whole UNet trained on two classes, so it has a class to preserve.

    A random UNet's own samples are not what it would learn from them, so training on them moves
    it as much as anything else would; a model that has learnt "a photo of a dog" is the case
    DreamBooth's prior loss is for.
    """
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    rng = random.Random(0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = [CLASS_PROMPT, "a photo of a cat", ""]
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        embeddings = pipe.text_encoder(ids.input_ids)[0]  # (3, 77, D)
    unet = pipe.unet
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for _ in range(steps):
        which = [rng.randrange(2) for _ in range(8)]
        pixels = torch.stack([torch.from_numpy(np.asarray(class_picture(rng, size, prompts[w]), dtype=np.float32))
                              for w in which]).permute(0, 3, 1, 2) / 127.5 - 1
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        # One caption in ten dropped, so guidance has an unconditional model to push against.
        conditions = embeddings[[2 if rng.random() < 0.1 else w for w in which]]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(which),))
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, conditions).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def render(pipe, seeds: list[int], size: int, steps: int, guidance: float):
    import torch

    images = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        images.append(pipe(CLASS_PROMPT, height=size, width=size, num_inference_steps=steps, generator=generator,
                           guidance_scale=guidance, output_type="pt").images)
    return torch.cat(images)  # (N, 3, H, W) in [0, 1]


def predictions(pipe, images, seed: int):
    """The UNet's noise predictions for the class prompt on `images` noised at five fixed timesteps."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([CLASS_PROMPT], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        embedding = pipe.text_encoder(ids)[0].expand(len(images), -1, -1)
        out = []
        for t in (100, 300, 500, 700, 900):
            timesteps = torch.full((len(images),), t)
            noise = torch.randn(latents.shape, generator=generator)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            out.append(pipe.unet(noisy, timesteps, embedding).sample)
    return torch.stack(out)  # (5, N, 4, h, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--subject-images", type=int, default=5)
    parser.add_argument("--prior-images", type=int, default=16)
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (each trains both runs)")
    parser.add_argument("--renders", type=int, default=4, help="render seeds of the class prompt")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="[training] caption_dropout of both runs")
    parser.add_argument("--render-steps", type=int, default=10)
    parser.add_argument("--render-guidance", type=float, default=7.5,
                        help="guidance of the measured renders (class images always use the pipeline's 7.5)")
    parser.add_argument("--base-steps", type=int, default=300, help="full-UNet steps that teach the base its classes")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from loraloop.config import TrainingConfig
    from loraloop.tiny import tiny_model_path
    from training.train import Job, train, validate

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prior-"))
    data_dir = root / "data"
    started = time.perf_counter()
    model = pretrain_base(tiny_model_path(data_dir), root / "base", args.resolution, args.base_steps)
    print(json.dumps({"base_pretrained_s": round(time.perf_counter() - started, 1)}), flush=True)
    dataset = subject_dataset(root / "rex", args.subject_images, args.resolution)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    render_seeds = [1000 + i for i in range(args.renders)]
    base = render(pipe, render_seeds, args.resolution, args.render_steps, args.render_guidance)
    base_predictions = predictions(pipe, base, seed=7)

    rows = []
    for seed in range(args.seeds):
        for prior in (False, True):
            settings = TrainingConfig(
                resolution=args.resolution, rank=args.rank, alpha=float(args.rank), learning_rate=args.lr,
                max_steps=args.steps, batch_size=2, validation_split=1 / args.subject_images,
                validation_every=args.steps, checkpoint_every=10**6, log_with="none", snr_gamma=0.0, seed=seed,
                caption_dropout=args.caption_dropout,
                class_prompt=CLASS_PROMPT if prior else "", prior_images=args.prior_images if prior else 0,
                prior_loss_weight=args.prior_loss_weight, prior_steps=args.render_steps)
            run_dir = root / f"run-{seed}-{'prior' if prior else 'plain'}"
            started = time.perf_counter()
            report = train(validate(Job(dataset=dataset, name="rex", model=str(model), settings=settings,
                                        data_dir=data_dir, output=run_dir)))
            seconds = time.perf_counter() - started
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(run_dir), weight_name="adapter.safetensors")
            images = render(pipe, render_seeds, args.resolution, args.render_steps, args.render_guidance)
            predicted = predictions(pipe, base, seed=7)
            pipe.unload_lora_weights()
            # RMS pixel difference per render seed, then the mean over seeds.
            distance = ((images - base) ** 2).mean(dim=(1, 2, 3)).sqrt().mean().item()
            drift = ((predicted - base_predictions) ** 2).mean().sqrt().item()
            rows.append({"seed": seed, "prior": prior, "class_rmse_vs_base": round(distance, 4),
                         "class_eps_rmse_vs_base": round(drift, 5),
                         "subject_val_loss": round(report["final_val_loss"], 4),
                         "base_val_loss": round(report["base_val_loss"], 4), "seconds": round(seconds, 1),
                         "class_images": report["prior"]})
            print(json.dumps(rows[-1]), flush=True)

    def mean(key: str, prior: bool) -> float:
        values = [r[key] for r in rows if r["prior"] == prior]
        return sum(values) / len(values)

    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "class_rmse_vs_base": {"plain": round(mean("class_rmse_vs_base", False), 4),
                               "prior": round(mean("class_rmse_vs_base", True), 4)},
        "class_eps_rmse_vs_base": {"plain": round(mean("class_eps_rmse_vs_base", False), 5),
                                   "prior": round(mean("class_eps_rmse_vs_base", True), 5)},
        "subject_val_loss": {"base": round(mean("base_val_loss", False), 4),
                             "plain": round(mean("subject_val_loss", False), 4),
                             "prior": round(mean("subject_val_loss", True), 4)},
        "prior_closer_in": sum(
            1 for s in range(args.seeds)
            if next(r for r in rows if r["seed"] == s and r["prior"])["class_rmse_vs_base"]
            < next(r for r in rows if r["seed"] == s and not r["prior"])["class_rmse_vs_base"]),
        "prior_closer_in_eps": sum(
            1 for s in range(args.seeds)
            if next(r for r in rows if r["seed"] == s and r["prior"])["class_eps_rmse_vs_base"]
            < next(r for r in rows if r["seed"] == s and not r["prior"])["class_eps_rmse_vs_base"]),
        "of_seeds": args.seeds,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
