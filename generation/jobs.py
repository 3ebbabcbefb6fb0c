"""Jobs: a request checked against the service's limits (`JobSpec`), and its live state (`Job`).

`build_spec` turns a parsed `JobRequest` into a `JobSpec` with every default applied, every limit
checked and the adapters resolved to files, raising `InvalidRequest` with a sentence a person can
act on. It decodes the img2img init image, so it is blocking: the server runs it on an executor.

A `Job` belongs to the event loop: only loop code mutates it. The worker reads its immutable
`spec`, checks `cancel_requested` (a thread-safe Event) and sends updates back through the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from generation.adapters import AdapterCatalog, AdapterFile
from generation.contract import (
    SCHEDULERS,
    ApiError,
    ErrorCode,
    ImageResult,
    InvalidRequest,
    JobRequest,
    JobState,
    JobStatus,
    ResolvedAdapter,
    sampler_named,
)
from generation.images import ImageRefused, decode_untrusted
from loraloop.config import ServiceConfig
from loraloop.profiles import personal_owner, requester_id

ADAPTER_WEIGHT_RANGE = (-2.0, 2.0)
MAX_REQUESTER_CHARS = 200
GUIDANCE_RANGE = (0.0, 30.0)
# The work budget (width x height x steps x images) when [service] max_pixel_steps is 0. On
# CUDA it admits the largest job the other limits allow (1024x1024, 80 steps, 4 images); on
# the CPU one 512x512 step of even the tiny model takes over a minute (bench/RESULTS.md), so a
# job there may hold the worker for about as long as a few hundred 64x64 steps.
DEFAULT_PIXEL_STEPS = {"cuda": 400_000_000, "cpu": 1_000_000}


def work_budget(config: ServiceConfig, device: str) -> int:
    """The most pixel-steps one job may ask for on this device."""
    if config.max_pixel_steps:
        return config.max_pixel_steps
    return DEFAULT_PIXEL_STEPS["cuda" if device.startswith("cuda") else "cpu"]


@dataclass(frozen=True)
class AppliedAdapter:
    file: AdapterFile
    requested_name: str
    weight: float


@dataclass(frozen=True)
class JobSpec:
    """A request with defaults applied and limits checked: exactly what the worker runs."""

    prompt: str
    negative_prompt: str
    adapters: tuple[AppliedAdapter, ...]
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    width: int
    height: int
    scheduler: str
    init_image: Image.Image | None = None
    strength: float | None = None

    @property
    def count(self) -> int:
        return len(self.seeds)

    @property
    def mode(self) -> str:
        return "txt2img" if self.init_image is None else "img2img"

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call."""
        adapters = tuple((a.file.sha256, a.weight) for a in self.adapters)
        return (self.mode, adapters, self.width, self.height, self.steps, self.guidance,
                self.scheduler, self.strength)

    @property
    def denoising_steps(self) -> int:
        """Steps the pipeline really runs: img2img skips the first (1 - strength) of them."""
        if self.strength is None:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)

    def parameters(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance": self.guidance,
            "seeds": list(self.seeds),
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "scheduler": self.scheduler,
            "mode": self.mode,
        }
        if self.strength is not None:
            data["strength"] = self.strength
        return data


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g} (got {value:g}).")


def build_spec(request: JobRequest, config: ServiceConfig, catalog: AdapterCatalog, native_size: int,
               max_pixel_steps: int) -> JobSpec:
    if len(request.prompt) > config.max_prompt_chars:
        raise InvalidRequest(
            f"The prompt is {len(request.prompt)} characters; the limit is {config.max_prompt_chars}."
        )
    if len(request.negative_prompt) > config.max_prompt_chars:
        raise InvalidRequest(
            f"The negative prompt is {len(request.negative_prompt)} characters; "
            f"the limit is {config.max_prompt_chars}."
        )
    if len(request.requester) > MAX_REQUESTER_CHARS:
        raise InvalidRequest(f"'requester' is an id like \"discord:1234\", at most {MAX_REQUESTER_CHARS} characters.")
    steps = config.default_steps if request.steps is None else request.steps
    _in_range("steps", steps, 1, config.max_steps)
    guidance = config.default_guidance if request.guidance is None else request.guidance
    _in_range("guidance", guidance, *GUIDANCE_RANGE)
    _in_range("count", request.count, 1, config.max_count)
    sampler = sampler_named(request.scheduler or config.default_scheduler)
    if sampler is None:
        raise InvalidRequest(
            f"Unknown scheduler {request.scheduler!r}. Use one of: {', '.join(SCHEDULERS)} "
            "(or A1111's names: \"DPM++ 2M Karras\", \"Euler a\", ...).",
            ErrorCode.UNKNOWN_SCHEDULER,
        )
    scheduler = sampler.name
    width = request.width or config.default_width or native_size
    height = request.height or config.default_height or native_size
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            raise InvalidRequest(f"'{name}' must be a positive multiple of 8 (got {value}).")
    if width * height > config.max_pixels:
        raise InvalidRequest(
            f"{width}x{height} is {width * height} pixels; the limit is {config.max_pixels} "
            "(for example 1024x1024)."
        )
    adapters = []
    for ref in request.adapters:
        owner = personal_owner(ref.name)
        # A personal style answers to its owner alone, whoever else learns its name.
        if owner is not None and owner != requester_id(request.requester):
            raise InvalidRequest(f"{ref.name} is someone's personal style; only they can use it.",
                                 ErrorCode.UNKNOWN_ADAPTER)
        _in_range(f"weight of adapter {ref.name}", ref.weight, *ADAPTER_WEIGHT_RANGE)
        adapters.append(AppliedAdapter(catalog.resolve(ref), ref.name, ref.weight))
    if len({a.file.name for a in adapters}) != len(adapters):
        raise InvalidRequest("Each adapter may appear once per request.")
    init_image = None
    strength = None
    if request.init_image is not None:
        strength = 0.75 if request.strength is None else request.strength
        _in_range("strength", strength, 0.0, 1.0)
        if int(steps * strength) < 1:
            raise InvalidRequest(
                f"strength {strength:g} with {steps} steps runs no step at all; raise either."
            )
    elif request.strength is not None:
        raise InvalidRequest("'strength' only applies to img2img: send an 'init_image' with it.")
    # Checked before the init image is decoded: a refused job costs no decoding.
    denoising_steps = steps if strength is None else int(steps * strength)
    work = width * height * denoising_steps * request.count
    if work > max_pixel_steps:
        raise InvalidRequest(
            f"{width}x{height} x {denoising_steps} steps x {request.count} image(s) is {work} pixel-steps; "
            f"this service allows {max_pixel_steps} per job: ask for fewer steps, images or pixels."
        )
    if request.init_image is not None:
        init_image = decode_init_image(request.init_image, config.max_image_pixels)
        init_image = init_image.resize((width, height), Image.Resampling.LANCZOS)
    first_seed = secrets.randbelow(2 ** 32 - request.count) if request.seed is None else request.seed
    seeds = tuple((first_seed + i) % 2**32 for i in range(request.count))
    return JobSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        adapters=tuple(adapters),
        steps=steps,
        guidance=guidance,
        seeds=seeds,
        width=width,
        height=height,
        scheduler=scheduler,
        init_image=init_image,
        strength=strength,
    )


def decode_init_image(data: str, max_pixels: int) -> Image.Image:
    """An RGB image from base64, refusing anything that is not a whole, reasonably sized image."""
    return decode_image_field(data, "init_image", max_pixels)


def decode_image_field(data: str, name: str, max_pixels: int) -> Image.Image:
    """The RGB image a request's base64 field `name` holds; InvalidRequest naming the field if it
    is not a whole, reasonably sized PNG, JPEG or WebP (blocking: run it off the loop)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"'{name}' is not valid base64.", ErrorCode.INVALID_IMAGE) from None
    try:
        image, _ = decode_untrusted(raw, max_pixels)
    except ImageRefused as exc:
        raise InvalidRequest(f"'{name}' is refused: {exc.message}.", ErrorCode.INVALID_IMAGE) from None
    return image.convert("RGB")


@dataclass(eq=False)
class Job:
    """One request's live state, owned by the event loop."""

    id: str
    spec: JobSpec
    requester: str
    created_at: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    step: int = 0
    total_steps: int = 0
    images: list[ImageResult] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)
    error: ApiError | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    requeues: int = 0  # times put back in the queue after its worker was lost (the Ray backend)
    subscribers: set[asyncio.Queue] = field(default_factory=set)

    @property
    def count(self) -> int:
        return self.spec.count

    @property
    def batch_key(self) -> tuple:
        return self.spec.batch_key

    def status(self, position: int = 0, preview: str | None = None) -> JobStatus:
        return JobStatus(
            id=self.id,
            state=self.state,
            position=position,
            step=self.step,
            total_steps=self.total_steps,
            images=tuple(self.images),
            adapters=tuple(
                ResolvedAdapter(a.file.name, a.file.version, a.weight, a.file.sha256) for a in self.spec.adapters
            ),
            parameters=self.spec.parameters(),
            error=self.error,
            preview=preview,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
        )
