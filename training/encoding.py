"""Encoding: training examples through the frozen VAE and text encoder, by way of the encode cache.

    encoder = Encoder(settings, model_path, data_dir / "cache" / "training", vae, text_encoder, tokenizer,
                      device, dtype)
    encoder.warm(examples)                            # everything the run can ask for, encoded once
    encoder.latent_stats(image, flip=False)           # {"mean": (4, R/f, R/f), "std": (4, R/f, R/f)}
    encoder.text_embedding(encoder.caption(example))  # {"embedding": (77, D)}
    mean, std = encoder.latent_stats_batch(images, flips)  # (B, 4, R/f, R/f) each; uncached: one VAE call
    encoder.text_embeddings(captions)                 # (B, 77, D); uncached: one text encoder call

For SDXL (`text_encoder_2` given) an image's entry also holds its size conditioning,
{"time_ids": (6,)}: original height and width, the crop's top and left, the target size, as
SDXL's pipelines pass them; and a caption's holds both encoders' penultimate hidden states
side by side, {"embedding": (77, D1 + D2), "pooled": (P,)} with the second encoder's pooled
projection, exactly as StableDiffusionXLPipeline.encode_prompt makes them for serving.

With `cache_latents` on, every latent distribution and caption embedding is computed once and
kept in training.data's EncodeCache (on disk, keyed by content hash), so the loop only reads it
and a retrain encodes only what is new; with it off, they are computed on every use.

Why a module of its own, not in training/data.py beside EncodeCache: data.py is what runs before
any weights load (reading and checking a dataset, the cache's files); the Encoder is handed the
loaded VAE and text encoder by the trainer's setup, so it belongs to the part that has them.

Floor: part of training/; imports torch, tqdm, loraloop.config and training.data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loraloop.config import TrainingConfig
from training.data import EncodeCache, Example, load_image_tensor, size_conditioning
from training.dataset import file_sha256


class Encoder:
    """Turns examples into latent distributions and text embeddings, through the on-disk cache or not."""

    def __init__(self, settings: TrainingConfig, model_path: str, cache_dir: Path, vae: Any, text_encoder: Any,
                 tokenizer: Any, device: torch.device, dtype: torch.dtype, text_encoder_2: Any = None,
                 tokenizer_2: Any = None) -> None:
        self.settings = settings
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.sdxl = text_encoder_2 is not None
        self.device, self.dtype = device, dtype
        self.scaling = vae.config.scaling_factor
        # What produced an entry: a different base model or resolution must never share entries.
        self.cache = EncodeCache(cache_dir, f"{model_path}|{settings.resolution}")
        self.image_hashes: dict[Path, str] = {}

    def caption(self, example: Example) -> str:
        if example.prior:  # the class as the base model knows it: no trigger word
            return example.caption
        trigger = self.settings.trigger_word.strip()
        return f"{trigger}, {example.caption}" if trigger and example.caption else trigger or example.caption

    def _image_hash(self, path: Path) -> str:
        if path not in self.image_hashes:
            # The same sha256 the dataset hash is made of keys an image's cached latents.
            self.image_hashes[path] = file_sha256(path)
        return self.image_hashes[path]

    def latent_stats(self, path: Path, flip: bool) -> dict[str, torch.Tensor]:
        """(mean, std) of the VAE's latent distribution for an image: (4, R/f, R/f) each."""

        def compute() -> dict[str, torch.Tensor]:
            pixels = load_image_tensor(path, int(self.settings.resolution), flip)[None]  # "auto" resolved in validate
            with torch.no_grad():
                dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            stats = {"mean": dist.mean[0].float(), "std": dist.std[0].float()}
            if self.sdxl:
                stats["time_ids"] = torch.tensor(size_conditioning(path, int(self.settings.resolution)),
                                                 dtype=torch.float32)
            return stats

        if not self.settings.cache_latents:
            return compute()
        key = self.cache.key("latent", self._image_hash(path), str(flip))
        return self.cache.get_or_compute(key, compute)

    def latent_stats_batch(self, paths: list[Path], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each image's latent distribution, stacked: (B, 4, R/f, R/f) each.

        Uncached, the images go through the VAE in one call: B calls of one image cost the loop
        about a fifth of its time on a CPU (bench/RESULTS.md, "Side by side"). A batch's results
        differ from one-at-a-time ones only in float rounding (about 1e-6).
        """
        if self.settings.cache_latents:
            stats = [self.latent_stats(path, flip) for path, flip in zip(paths, flips, strict=True)]
            return torch.stack([x["mean"] for x in stats]), torch.stack([x["std"] for x in stats])
        pixels = torch.stack([load_image_tensor(path, int(self.settings.resolution), flip)
                              for path, flip in zip(paths, flips, strict=True)])
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """CLIP hidden states for captions, stacked: (B, 77, D); uncached, in one text encoder call."""
        if self.settings.cache_latents:
            return torch.stack([self.text_embedding(caption)["embedding"] for caption in captions])
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids.to(self.device))[0].float()

    def text_embedding(self, caption: str) -> dict[str, torch.Tensor]:
        """CLIP hidden states for a caption: (77, D); for SDXL both encoders' and the pooled projection."""

        def compute() -> dict[str, torch.Tensor]:
            if self.sdxl:
                return self._sdxl_embedding(caption)
            ids = self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                return {"embedding": self.text_encoder(ids.to(self.device))[0][0].float()}

        if not self.settings.cache_latents:
            return compute()
        return self.cache.get_or_compute(self.cache.key("text", caption), compute)

    def _sdxl_embedding(self, caption: str) -> dict[str, torch.Tensor]:
        hidden = []
        with torch.no_grad():
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
                output = encoder(ids.to(self.device), output_hidden_states=True)
                hidden.append(output.hidden_states[-2][0])  # the penultimate layer, as SDXL was trained
        # The pooled embedding is the second encoder's projection (its output's first entry).
        return {"embedding": torch.cat(hidden, dim=-1).float(), "pooled": output[0][0].float()}

    def unconditional(self) -> dict[str, torch.Tensor]:
        """What a dropped caption trains on: the empty caption's embedding, or zeros for SDXL, whose
        pipelines condition the empty negative prompt on zeros (`force_zeros_for_empty_prompt`)."""
        empty = self.text_embedding("")
        return {k: torch.zeros_like(v) for k, v in empty.items()} if self.sdxl else empty

    def warm(self, examples: list[Example], show_progress: bool = True) -> None:
        """Encode everything the run can ask for up front, so the loop only reads the cache."""
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
