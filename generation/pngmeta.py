"""PNG files that carry how they were made, in the `parameters` text chunk.

AUTOMATIC1111 writes that chunk and ComfyUI, Civitai and most image viewers for SD read it, so a
person can drop one of our images on those tools and get the prompt, seed and settings back:

    a red fox <lora:pixel:0.8>
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: SGM Uniform, CFG scale: 7, Seed: 42, Size: 512x512,
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "pixel: 0123456789ab"

(one line in the file). The sampler and schedule type are A1111's names for the scheduler that ran
(`generation.contract.SAMPLERS`); `Model hash` is there when the model is a single checkpoint file,
and each LoRA's hash is A1111's (`loraloop.hashes.lora_hash`), so A1111 and Civitai find the same file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, PngImagePlugin

from generation.contract import sampler_named
from generation.text import one_line
from loraloop.hashes import LORA_SHORT_HASH


@dataclass(frozen=True)
class ImageParameters:
    """Everything needed to reproduce one image."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    scheduler: str
    model: str
    adapters: tuple[tuple[str, float, str], ...] = ()  # (name as requested, weight, A1111 hash)
    strength: float | None = None  # img2img only
    model_hash: str = ""  # A1111's short hash of a single-file checkpoint; empty for other models

    def to_a1111(self) -> str:
        """The text A1111 writes in the `parameters` chunk."""
        lora_tags = "".join(f" <lora:{name}:{_number(weight)}>" for name, weight, _ in self.adapters)
        # A line break in a prompt would start a forged field: prompts go on one line here (the
        # true text stays in the job's parameters and the bot's store).
        lines = [one_line(self.prompt) + lora_tags]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {one_line(self.negative_prompt)}")
        sampler = sampler_named(self.scheduler)
        fields: list[tuple[str, Any]] = [
            ("Steps", self.steps),
            ("Sampler", sampler.a1111_sampler if sampler else self.scheduler),
        ]
        if sampler and sampler.a1111_schedule:
            fields.append(("Schedule type", sampler.a1111_schedule))
        fields += [
            ("CFG scale", _number(self.guidance)),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
        ]
        if self.model_hash:
            fields.append(("Model hash", self.model_hash))
        fields.append(("Model", self.model))
        if self.strength is not None:
            fields.append(("Denoising strength", _number(self.strength)))
        if self.adapters:
            hashes = ", ".join(f"{name}: {sha[:LORA_SHORT_HASH]}" for name, _, sha in self.adapters)
            fields.append(("Lora hashes", f'"{hashes}"'))
        lines.append(", ".join(f"{key}: {value}" for key, value in fields))
        return "\n".join(lines)


def _number(value: float) -> str:
    """7.0 -> "7", 0.75 -> "0.75": how A1111 prints its floats."""
    return f"{value:g}"


def encode_png(image: Image.Image, parameters: ImageParameters) -> bytes:
    """PNG bytes of `image` with the parameters chunk attached."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters.to_a1111())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(png: bytes) -> str | None:
    """The `parameters` text of a PNG, or None when it has none."""
    with Image.open(io.BytesIO(png)) as image:
        return image.info.get("parameters")
