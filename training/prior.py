"""Class images for DreamBooth's prior preservation, made by the base model and kept by prompt and seed.

    loraloop dataset import photos/ data/datasets/rex        # photos/sks_dog/*.jpg: captions "sks dog"
    loraloop train data/datasets/rex --name rex --class-prompt "a photo of a dog" --prior-images 100

    request = PriorRequest(model="tiny", prompt="a photo of a dog", count=100, resolution=64, steps=25, seed=42)
    images = class_images(request, data_dir, service_url, token)   # -> ClassImages(paths, generated, reused, source)

DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation") teaches a subject from a few photos ("sks dog") and keeps the class
("a dog") from collapsing onto it: the base model's own images of the class prompt are trained
on beside the photos, weighted by `[training] prior_loss_weight`, so the adapter learns to leave
them as they were. Those images are made here, before training, by the generation service when
it is running the same base model (its queue shares the GPU fairly with everyone else), else by
the base model loaded locally. Image i has seed `seed + i`, and each is kept under
DATA_DIR/cache/class-images/<key>/<seed>.png, the key naming the base model, prompt, size and
steps, so a second run (or a resume, or a bigger --prior-images) generates only what is missing.

Floor: part of training/; imports generation.client and generation.contract (the service), and
generation.pipeline and torch only when the images are drawn locally.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from generation.client import UNAVAILABLE, ServiceClient, ServiceError
from generation.contract import JobRequest, JobState

log = logging.getLogger(__name__)

CLASS_IMAGES_DIR = Path("cache") / "class-images"  # under DATA_DIR
REQUESTER = "loraloop:prior-images"  # the fair queue's name for these jobs


class PriorError(Exception):
    """Class images that cannot be made; the message says what to do."""


@dataclass(frozen=True)
class PriorRequest:
    """Which class images a run needs: `count` of `prompt` from `model`, seeds seed .. seed + count - 1."""

    model: str  # as configured ("tiny", a hub id, a path): what the service's /healthz names too
    prompt: str
    count: int
    resolution: int
    steps: int
    seed: int

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.count)]


@dataclass(frozen=True)
class ClassImages:
    paths: list[Path]
    generated: int
    reused: int
    source: str  # "service", "local", or "cache" when nothing was generated


def class_image_dir(request: PriorRequest, data_dir: Path) -> Path:
    """The folder of one (model, prompt, size, steps): a different one never shares its images."""
    what = {"model": request.model, "prompt": request.prompt, "resolution": request.resolution,
            "steps": request.steps}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return data_dir / CLASS_IMAGES_DIR / key


def class_images(request: PriorRequest, data_dir: Path, service_url: str | None, token: str | None) -> ClassImages:
    """Every class image the request names, generating the missing ones (service first, else locally)."""
    folder = class_image_dir(request, data_dir)
    paths = {seed: folder / f"{seed}.png" for seed in request.seeds}
    missing = [seed for seed, path in paths.items() if not path.is_file()]
    source = "cache"
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "request.json").write_text(json.dumps(
            {"model": request.model, "prompt": request.prompt, "resolution": request.resolution,
             "steps": request.steps}, indent=2))
        source = "service"
        if service_url is None or not asyncio.run(_from_service(request, missing, paths, service_url, token)):
            source = "local"
            _locally(request, [seed for seed in missing if not paths[seed].is_file()], paths, data_dir)
    log.info("class images for %r: %d generated (%s), %d reused from %s", request.prompt, len(missing),
             source, request.count - len(missing), folder)
    return ClassImages([paths[seed] for seed in request.seeds], len(missing), request.count - len(missing), source)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a half-written image is never mistaken for a cached one


async def _from_service(request: PriorRequest, seeds: list[int], paths: dict[int, Path], url: str,
                        token: str | None) -> bool:
    """Generate `seeds` through the running service; False when none runs or it serves another model."""
    try:
        async with ServiceClient(url, token=token) as client:
            health = await client.health()
            if health.model != request.model:
                log.info("the service at %s runs %s, not %s: drawing the class images locally",
                         url, health.model, request.model)
                return False
            for seed in seeds:  # one at a time: within any per-requester cap, and fair to everyone's /imagine
                accepted = await client.submit(JobRequest(
                    prompt=request.prompt, seed=seed, steps=request.steps, width=request.resolution,
                    height=request.resolution, requester=REQUESTER))
                final = [status async for status in client.events(accepted.id)][-1]
                if final.state != JobState.DONE:
                    reason = final.error.message if final.error else "no reason given"
                    raise PriorError(f"the service did not draw class image {seed} ({final.state.value}: "
                                     f"{reason}); see its log for job {accepted.id}")
                _write(paths[seed], await client.image(accepted.id, 0))
    except ServiceError as exc:
        if exc.code == UNAVAILABLE:
            log.info("the service at %s is not running: drawing the class images locally", url)
            return False
        raise PriorError(f"the service at {url} refused a class image: {exc}") from None
    return True


def _locally(request: PriorRequest, seeds: list[int], paths: dict[int, Path], data_dir: Path) -> None:
    """Generate `seeds` with the base model loaded here, the way the service would load it."""
    import io

    import torch

    from generation.pipeline import ModelLoadError, load_model, pick_device

    try:
        loaded = load_model(request.model, pick_device("auto"), data_dir)
    except ModelLoadError as exc:
        raise PriorError(f"cannot draw class images: {exc}") from None
    pipe = loaded.txt2img
    pipe.set_progress_bar_config(disable=True)
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        image = pipe(request.prompt, height=request.resolution, width=request.resolution,
                     num_inference_steps=request.steps, generator=generator).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        _write(paths[seed], buffer.getvalue())
    del loaded, pipe  # the training model loads next: free this one first
