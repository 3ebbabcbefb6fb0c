"""Captioning: fill a dataset's missing captions with BLIP.

    loraloop dataset caption data/datasets/fox                       # only the empty ones
    loraloop dataset caption data/datasets/fox --prefix "sks fox,"   # trigger word first
    loraloop dataset caption data/datasets/fox --overwrite --model Salesforce/blip-image-captioning-base

This module owns running a BLIP captioning model (`generation.captioner.Captioner`, which the
service's /describe runs too) over the images of a dataset whose text is
empty ({"file_name", "text"} rows, as import and curation write them; `training/dataset.py`
reads and rewrites the file, and the `dataset_hash` is refreshed). Everything is checked before
the model loads; metadata.jsonl is rewritten atomically after every batch, so an interrupted run
keeps the captions it already made and a rerun picks up where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from generation.captioner import Captioner, CaptionerUnavailable
from loraloop.config import DatasetConfig
from training.dataset import HASH_FILE, METADATA_FILE, DatasetError, read_metadata, record_dataset_hash, write_metadata

log = logging.getLogger(__name__)


class CaptionError(DatasetError):
    """A captioning problem a person can fix (no dataset, an unreadable image, a model that will not load)."""


@dataclass(frozen=True)
class CaptionSettings:
    model: str = "Salesforce/blip-image-captioning-large"
    batch_size: int = 8
    min_new_tokens: int = 5
    max_new_tokens: int = 40
    device: str = "auto"

    @classmethod
    def from_config(cls, dataset_config: DatasetConfig) -> CaptionSettings:
        return cls(
            model=dataset_config.caption_model,
            batch_size=dataset_config.caption_batch_size,
            min_new_tokens=dataset_config.caption_min_new_tokens,
            max_new_tokens=dataset_config.caption_max_new_tokens,
            device=dataset_config.caption_device,
        )


@dataclass(frozen=True)
class CaptionReport:
    total: int  # rows in the dataset
    captioned: int  # rows this run wrote a caption for
    empty: int  # of those, how many the model left empty (still blank in the file)

    def summary(self) -> str:
        kept = self.total - self.captioned
        line = f"captioned {self.captioned} of {self.total} images, kept {kept} existing captions"
        if self.empty:
            line += f"; the model gave {self.empty} an empty caption (left blank)"
        return line


def read_rows(dataset: Path) -> list[dict[str, Any]]:
    """The rows of DATASET/metadata.jsonl, each checked to name an image that exists."""
    path = dataset / METADATA_FILE
    if not dataset.is_dir():
        raise CaptionError(f"{dataset}: no such dataset folder; create one with `loraloop dataset import`")
    if not path.is_file():
        raise CaptionError(f"{dataset}: no {METADATA_FILE}; create the dataset with `loraloop dataset import`")
    rows = read_metadata(path, without_file_name='captioning needs {"file_name", "text"} rows '
                                                 "(preference-pair datasets are not captioned)")
    for row in rows:
        if not (dataset / row.values["file_name"]).is_file():
            raise CaptionError(f"{row.where}: image {row.values['file_name']} is missing from {dataset}")
    return [row.values for row in rows]


def needs_caption(row: dict[str, Any], overwrite: bool) -> bool:
    return overwrite or not str(row.get("text") or "").strip()


def with_prefix(prefix: str, caption: str) -> str:
    """`--prefix "sks,"` and "a dog" give "sks, a dog"; an empty caption stays empty."""
    caption = " ".join(caption.split())
    return f"{prefix.strip()} {caption}".strip() if caption and prefix.strip() else caption


def resolve_model(model: str, data_dir: Path | None) -> str:
    """A model id or local path as given; "tiny" becomes the offline tiny BLIP under the data dir."""
    from loraloop.tiny import TINY_MODEL_NAME, loadable_model

    if data_dir is None:
        if model == TINY_MODEL_NAME:
            raise CaptionError('the "tiny" captioner needs a data directory to live in')
        return model
    return loadable_model(model, data_dir, "captioner")


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        # Captions made so far are already saved; the message says how to get past this one.
        raise CaptionError(
            f"{path}: unreadable image ({type(exc).__name__}); remove its line from {METADATA_FILE} or re-import"
        ) from None


def caption_dataset(
    dataset: Path,
    settings: CaptionSettings,
    prefix: str = "",
    overwrite: bool = False,
    data_dir: Path | None = None,
    progress: bool = True,
) -> CaptionReport:
    """Fill the empty captions of DATASET (every caption with `overwrite`) and save after each batch."""
    dataset = Path(dataset)
    rows = read_rows(dataset)
    todo = [row for row in rows if needs_caption(row, overwrite)]
    if not todo:
        return CaptionReport(total=len(rows), captioned=0, empty=0)
    try:
        captioner = Captioner(
            resolve_model(settings.model, data_dir), settings.device, settings.min_new_tokens, settings.max_new_tokens
        )
    except CaptionerUnavailable as exc:
        raise CaptionError(str(exc)) from None
    # Captions are part of the content hash: drop the old one now (an interrupted run leaves no
    # wrong hash behind) and write the new one at the end.
    (dataset / HASH_FILE).unlink(missing_ok=True)
    empty = 0
    with tqdm(total=len(todo), desc="captioning", unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            captions = captioner([_load_rgb(dataset / row["file_name"]) for row in batch])
            for row, caption in zip(batch, captions, strict=True):
                row["text"] = with_prefix(prefix, caption)
                empty += not caption
            write_metadata(dataset, rows)
            bar.update(len(batch))
    record_dataset_hash(dataset)
    report = CaptionReport(total=len(rows), captioned=len(todo), empty=empty)
    log.debug("%s: %s", dataset, report.summary())
    return report
