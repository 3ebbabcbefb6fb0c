"""Training data: a dataset directory read into examples and checked, the train/validation
split, image tensors, and the encode cache.

The dataset is one of the formats `training/dataset.py` owns (sft, kto, dpo), read through its
readers and hashed the same way import and curation hash it. A dpo dataset's images are bytes
inside its Parquet shards; each is written once to an image cache by its sha256, so the
examples the trainer gets name image files whatever the format. Everything here up to the
tensors runs before any weights load, so a bad dataset fails in a second with the line (or row)
that is wrong. The encode cache keeps VAE latents and text embeddings on disk under a key made
of the content hash and what produced it, so a retrain encodes only what is new.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from training.dataset import (
    DPO,
    FORMATS,
    METADATA_FILE,
    PARQUET_FILE,
    DatasetError,
    RowsDigest,
    dataset_hash,
    parquet_shards,
    read_metadata,
    read_parquet,
)

# Where a dpo dataset's images are written when the caller names no cache (the trainer names
# DATA_DIR/cache/dataset-images): content-addressed, so datasets and runs share them.
DEFAULT_IMAGE_CACHE = Path(tempfile.gettempdir()) / "loraloop-dataset-images"


@dataclass(frozen=True)
class Example:
    """One training example: a caption and one image (sft/kto) or a preferred/rejected pair (dpo)."""

    caption: str
    image: Path
    # dpo: the rejected image of the pair (`image` is the preferred one).
    rejected: Path | None = None
    # kto: whether people liked it.
    desirable: bool = True
    # Per-example loss weight (the dataset's "weight" column; curation's confidence in the label).
    weight: float = 1.0
    # A class image for prior preservation (training/prior.py): its caption is the class prompt, as it is.
    prior: bool = False


@dataclass(frozen=True)
class Dataset:
    root: Path
    objective: str
    examples: tuple[Example, ...]
    # sha256 over the metadata and every image's bytes (as curation computes it): the adapter's provenance.
    content_hash: str
    # How many DPO pairs were dropped as ties (label_0 0.5): a tie says nothing about preference.
    ties_dropped: int = 0


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


def _cached_image(cache: Path, sha256: str, data: bytes, where: str) -> Path:
    """An image's bytes as a file in `cache`, named by their sha256 (so one that is there was
    checked when it was written): checked and written once, atomically. No suffix: PIL and the
    encoder go by the content."""
    path = cache / sha256[:2] / sha256
    if path.is_file():
        return path
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{where}: its image is unreadable ({exc}); curate the dataset again") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _read_pairs(root: Path, image_cache: Path) -> tuple[list[Example], int, str]:
    """A dpo dataset's preference pairs (preferred image first), how many ties were dropped, and
    its dataset hash, all in one pass over the shards."""
    if not parquet_shards(root):
        old = (" (its metadata.jsonl is the layout before Parquet: curate it again)"
               if (root / METADATA_FILE).is_file() else "")
        raise DatasetError(f"{root} has no {PARQUET_FILE}{old}; build it with `loraloop dataset curate --format dpo`")
    examples, ties = [], 0
    digest = RowsDigest(DPO)
    files: dict[str, Path] = {}  # sha256 -> cached file: an image is in many pairs
    for row in read_parquet(root, DPO):
        values = row.values
        shas = {column: hashlib.sha256(values[column]).hexdigest() for column in DPO.image_bytes_columns}
        digest.add(values, shas)
        for column, sha in shas.items():
            if sha not in files:
                files[sha] = _cached_image(image_cache, sha, values[column], row.where)
        first, second = files[shas["jpg_0"]], files[shas["jpg_1"]]
        label = values["label_0"]
        if label == 0.5:
            ties += 1
            continue
        preferred, rejected = (first, second) if label > 0.5 else (second, first)
        examples.append(Example(caption=values["caption"], image=preferred, rejected=rejected,
                                weight=float(values.get("weight", 1.0))))
    return examples, ties, digest.hexdigest()


def load_dataset(root: str | Path, objective: str, image_cache: Path = DEFAULT_IMAGE_CACHE) -> Dataset:
    """Read and check a dataset directory for `objective`, raising DatasetError on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset {root} does not exist; build one with `loraloop dataset import` or `curate`")
    dataset_format = FORMATS[objective]
    examples: list[Example] = []
    ties = 0
    if dataset_format.storage == "parquet":
        examples, ties, content_hash = _read_pairs(root, image_cache)
    else:
        metadata = root / METADATA_FILE
        if not metadata.is_file():
            raise DatasetError(f"{root} has no {METADATA_FILE}; build it with `loraloop dataset import` or `curate`")
        for row in read_metadata(metadata):
            dataset_format.check(row)
            values = row.values
            image = _check_image(root, values["file_name"], row.where)
            examples.append(Example(caption=str(values["text"]), image=image, desirable=values.get("label", True),
                                    weight=float(values.get("weight", 1.0))))
        content_hash = dataset_hash(root)  # reads every image the rows name, as import and curation hashed them
    if not examples:
        if objective == "dpo":
            raise DatasetError(
                f"{root} has no preference pairs to learn from ({ties} tie(s) dropped); rate more images first"
            )
        raise DatasetError(f"{root} is empty: {METADATA_FILE} lists no images")
    if objective == "kto" and len({e.desirable for e in examples}) < 2:
        raise DatasetError(f"{root}: KTO needs both liked and disliked images (label true and false)")
    # The same hash import and curation record, so a run and the dataset it learned from match.
    return Dataset(root=root, objective=objective, examples=tuple(examples),
                   content_hash=content_hash, ties_dropped=ties)


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

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
        image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
        if flip:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def size_conditioning(path: Path, resolution: int) -> tuple[int, int, int, int, int, int]:
    """SDXL's size conditioning for an image as load_image_tensor crops it: (original height, width,
    crop top, left, target height, width), the crop in the pixels of the image scaled to cover the
    target (where SDXL's training measured it). The crop is centred, so a flip does not change it."""
    with Image.open(path) as opened:  # the header only: no pixels are decoded
        width, height = opened.size
        if opened.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn the picture a quarter
            width, height = height, width
    scale = resolution / min(width, height)
    top = max(0, round((height * scale - resolution) / 2))
    left = max(0, round((width * scale - resolution) / 2))
    return height, width, top, left, resolution, resolution


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
