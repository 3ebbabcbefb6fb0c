"""A BLIP captioning model on one device: what `dataset caption` runs over a dataset and what the
service's `POST /v1/describe` runs over one image.

Floor: part of generation/; torch and transformers are imported when a `Captioner` is built, so
importing this module stays cheap.
"""

from __future__ import annotations

from PIL import Image


class CaptionerUnavailable(Exception):
    """The captioning model will not load; the message says what to configure instead."""


class Captioner:
    """A BLIP captioning model and its processor, on one device, captioning a batch at a time."""

    def __init__(self, model: str, device: str = "auto", min_new_tokens: int = 5, max_new_tokens: int = 40) -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CaptionerUnavailable(f"device {device!r} asked for, but this machine has no CUDA GPU; "
                                       "use --device cpu")
        # fp16 halves memory and time on a GPU; CPUs are slow at it, so they stay fp32.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = BlipProcessor.from_pretrained(model)
            self.model = BlipForConditionalGeneration.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise CaptionerUnavailable(
                f"cannot load the captioning model {model!r}: {str(exc).splitlines()[0]} "
                "(give a BLIP model id, a local directory saved with save_pretrained, or 'tiny')"
            ) from None
        self.model.to(self.device, dtype=self.dtype).eval()  # type: ignore[arg-type]  # @wraps'd to(): unbound to mypy
        self.min_new_tokens = min_new_tokens
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.device, self.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(
                **inputs, min_new_tokens=self.min_new_tokens, max_new_tokens=self.max_new_tokens
            )
        return [" ".join(text.split()) for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]
