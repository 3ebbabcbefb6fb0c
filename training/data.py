"""Training data: reading a dataset directory, checking it, hashing it, and the encode cache.

Three shapes, all written by import/curation into one directory next to their images:

    sft   metadata.jsonl  {"file_name": "a.png", "text": "a red fox"}
    kto   metadata.jsonl  {"file_name": "a.png", "text": "a red fox", "label": true}
    dpo   metadata.jsonl  {"caption": "a red fox", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1.0}

Everything here runs before any weights load, so a bad dataset fails in a second with the
line that is wrong. The encode cache keeps VAE latents and text embeddings on disk under a key
made of the content hash and what produced it, so a retrain encodes only what is new.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

METADATA = "metadata.jsonl"
REQUIRED_COLUMNS = {
    "sft": ("file_name", "text"),
    "kto": ("file_name", "text", "label"),
    "dpo": ("caption", "jpg_0", "jpg_1", "label_0"),
}


class DatasetError(Exception):
    """A dataset problem a person can fix; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training example: a caption and one image (sft/kto) or a preferred/rejected pair (dpo)."""

    caption: str
    image: Path
    # dpo: the rejected image of the pair (`image` is the preferred one).
    rejected: Path | None = None
    # kto: whether people liked it.
    desirable: bool = True


@dataclass(frozen=True)
class Dataset:
    root: Path
    objective: str
    examples: tuple[Example, ...]
    # sha256 over the metadata and every image's bytes (as curation computes it): the adapter's provenance.
    content_hash: str
    # How many DPO pairs were dropped as ties (label_0 0.5): a tie says nothing about preference.
    ties_dropped: int = 0


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_image(root: Path, name: object, where: str) -> Path:
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise DatasetError(f"{where}: image name {name!r} must be a file name inside the dataset directory")
    path = root / name
    if not path.is_file():
        raise DatasetError(f"{where}: image {name} is missing from {root}")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{where}: image {name} is unreadable ({exc}); remove it or re-import") from None
    return path


def load_dataset(root: str | Path, objective: str) -> Dataset:
    """Read and check a dataset directory for `objective`, raising DatasetError on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset {root} does not exist; build one with `loraloop dataset import` or `curate`")
    metadata = root / METADATA
    if not metadata.is_file():
        raise DatasetError(f"{root} has no {METADATA}; build it with `loraloop dataset import` or `curate`")
    required = REQUIRED_COLUMNS[objective]
    examples: list[Example] = []
    ties = 0
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        missing = [column for column in required if column not in row]
        if missing:
            raise DatasetError(
                f"{where}: missing column(s) {', '.join(missing)} (a {objective} dataset needs {', '.join(required)})"
            )
        if objective == "dpo":
            label = row["label_0"]
            if not isinstance(label, (int, float)) or isinstance(label, bool) or not 0 <= label <= 1:
                raise DatasetError(f"{where}: label_0 must be a number between 0 and 1, got {label!r}")
            first = _check_image(root, row["jpg_0"], where)
            second = _check_image(root, row["jpg_1"], where)
            if label == 0.5:
                ties += 1
                continue
            preferred, rejected = (first, second) if label > 0.5 else (second, first)
            examples.append(Example(caption=str(row["caption"]), image=preferred, rejected=rejected))
        else:
            if objective == "kto" and not isinstance(row["label"], bool):
                raise DatasetError(f"{where}: label must be true or false, got {row['label']!r}")
            image = _check_image(root, row["file_name"], where)
            examples.append(Example(caption=str(row["text"]), image=image, desirable=row.get("label", True)))
    if not examples:
        if objective == "dpo":
            raise DatasetError(
                f"{root} has no preference pairs to learn from ({ties} tie(s) dropped); rate more images first"
            )
        raise DatasetError(f"{root} is empty: {METADATA} lists no images")
    if objective == "kto" and len({e.desirable for e in examples}) < 2:
        raise DatasetError(f"{root}: KTO needs both liked and disliked images (label true and false)")
    # The same hash curation records (training/curate.py), so a run and its curated dataset match.
    from training.curate import dataset_hash

    return Dataset(root=root, objective=objective, examples=tuple(examples),
                   content_hash=dataset_hash(root), ties_dropped=ties)


def split_examples(examples: tuple[Example, ...], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A fixed (seeded) train/validation split; at least one example stays in each part when possible."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = 0 if fraction <= 0 or len(examples) < 2 else min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    validation = [examples[i] for i in sorted(order[:held])]
    train = [examples[i] for i in sorted(order[held:])]
    return train, validation


def load_image_tensor(path: Path, resolution: int, flip: bool):
    """An image as a (3, R, R) tensor in [-1, 1], resized and centre-cropped like import does."""
    import numpy as np
    import torch
    from PIL import ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
        if flip:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class EncodeCache:
    """VAE latent distributions and text embeddings on disk, keyed by content hash and encoder.

    One small safetensors file per entry, so two runs share what they have in common and a
    retrain after adding ten images encodes ten images. `encoded` and `reused` count this run's
    misses and hits for the report.
    """

    def __init__(self, directory: Path, encoder_id: str) -> None:
        self.directory = directory
        self.encoder_id = encoder_id
        self.encoded = 0
        self.reused = 0
        # Entries read this run, kept in memory: the loop asks for them every epoch. Small next to
        # the model (a 512 px latent is 4x64x64 floats, 64 KB; an embedding 77x768 floats, 240 KB).
        self._memory: dict[str, dict] = {}

    def key(self, *parts: str) -> str:
        return hashlib.sha256("\0".join((self.encoder_id, *parts)).encode()).hexdigest()

    def get_or_compute(self, key: str, compute):
        """The cached tensors for `key`, computing and storing them (atomically) on a miss."""
        import os

        from safetensors.torch import load_file, save_file

        if key in self._memory:
            return self._memory[key]
        path = self.directory / key[:2] / f"{key}.safetensors"
        if path.is_file():
            self.reused += 1
            self._memory[key] = load_file(path)
            return self._memory[key]
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in compute().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, tmp)
        os.replace(tmp, path)
        self.encoded += 1
        self._memory[key] = tensors
        return tensors
