"""The image-level safety check: diffusers' `StableDiffusionSafetyChecker`, one verdict per image.

    checker = SafetyChecker.load("CompVis/stable-diffusion-safety-checker", "cuda", adjustment=0.0)
    checker.flags([image, image2])    # -> [False, True]: True where a concept scored over its threshold

The verdict travels to clients as `ImageResult.nsfw` (None when the service runs no checker);
what happens to a flagged image is the client's policy (the bot's is per channel). The images
themselves are left as they are: diffusers' pipeline blacks flagged ones out, which would leave a
client that may show them (an age-restricted channel) nothing to show.

`adjustment` is diffusers' own knob (a fixed 0.0 inside its `forward`): it is added to every
concept's score, so above 0 flags more images and below 0 fewer. It is applied here by lowering
the checker's thresholds by the same amount, which is the same comparison.

Floor: part of generation/; torch, diffusers and transformers are imported when a checker loads,
on the worker thread.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class SafetyCheckerUnavailable(Exception):
    """The configured safety checker does not load; the message says what to configure."""


class SafetyChecker:
    def __init__(self, model: Any, processor: Any, device: Any) -> None:
        self.model = model
        self.processor = processor
        self.device = device

    @classmethod
    def load(cls, name: str, device: str, adjustment: float = 0.0) -> SafetyChecker:
        """The checker and its image processor from a model id or a directory saved with save_pretrained."""
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        # diffusers warns of "a black image" for every flagged one; we black nothing out.
        logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(name)
            processor = CLIPImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise SafetyCheckerUnavailable(
                f"cannot load the safety checker {name!r}: {str(exc).splitlines()[0]} (give a model id such as "
                "CompVis/stable-diffusion-safety-checker, a local directory saved with save_pretrained, or 'tiny')"
            ) from None
        with torch.no_grad():
            model.concept_embeds_weights.sub_(adjustment)
            model.special_care_embeds_weights.sub_(adjustment)
        model.to(device).eval()  # type: ignore[arg-type]  # @wraps'd to(): unbound to mypy
        return cls(model, processor, torch.device(device))

    def flags(self, images: list[Any]) -> list[bool]:
        """True for each PIL image the checker flags (blocking: on the worker thread)."""
        import numpy as np
        import torch

        if not images:
            return []
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        placeholder = np.zeros((len(images), 1, 1, 3))  # what forward blacks out; the images stay ours
        with torch.inference_mode():
            _, flagged = self.model(clip_input=inputs.pixel_values.to(self.model.dtype), images=placeholder)
        return [bool(f) for f in flagged]
