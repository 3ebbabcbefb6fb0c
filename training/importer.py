"""Dataset import: the picture collections people already have, turned into one training folder.

    loraloop dataset import ~/pictures/fox data/datasets/fox          # images with .txt captions
    loraloop dataset import captions.csv data/datasets/fox --image-column path --caption-column text
    loraloop dataset import urls.txt data/datasets/fox --resolution 768

This module owns reading every source shape (`SOURCE_FORMATS`), normalising pixels
(EXIF orientation, RGB, resize and centre-crop to the training resolution) and dropping what
would hurt training, with the reason written down; `training/downloads.py` fetches the URLs.

A source is input from someone else. Its local paths must stay inside the source's own folder
(unless `allow_paths_outside_source`) and be regular files under `max_download_bytes`, read
with the cap enforced while reading (/dev/zero is neither); its URLs go through the download
policy (no loopback, private or link-local hosts unless allowed); its pictures are decoded by
`generation.images.decode_untrusted` (PNG, JPEG and WebP, `max_image_pixels` from the header).

The output is an sft dataset in the layout `training/dataset.py` owns (which curation also
writes and training reads):

    OUT/<sha256[:16]>.png        one square RGB image per picture kept
    OUT/metadata.jsonl           {"file_name": ..., "text": ...} per line ("" when uncaptioned)
    OUT/report.json              what was kept and what was dropped, and why
    OUT/dataset_hash             the content hash training records

The folder is built beside OUT and renamed into place at the end, so an interrupted import
never leaves a half-written dataset where training would find it.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import stat
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

from generation.images import ImageRefused, decode_untrusted
from loraloop.config import DatasetConfig
from training.dataset import (
    METADATA_FILE,
    REPORT_FILE,
    SFT,
    DatasetError,
    NearDuplicateIndex,
    check_output_folder,
    image_file_name,
    perceptual_hash,
    read_metadata,
    record_dataset_hash,
    staged_folder,
    write_metadata,
)
from training.downloads import HostPolicy, Refused, download_all

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("folder", "metadata", "json", "csv", "dreambooth", "urls")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Sidecar caption files: `.txt` is the common one, kohya's scripts also write `.caption`.
CAPTION_SUFFIXES = (".txt", ".caption")
# `<trigger>_<class>`, optionally after kohya's `<repeats>_` prefix: `sks_dog`, `10_sks_dog`.
DREAMBOOTH_FOLDER = re.compile(r"^(?:\d+_)?([^_\s]+)_(.+)$")

# Why a picture was left out; the report counts by these codes.
DOWNLOAD_FAILED = "download_failed"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
TOO_SMALL = "too_small"
CAPTION_TOO_SHORT = "caption_too_short"
REFUSED_HOST = "refused_host"
OUTSIDE_SOURCE = "outside_source"


# With workers = 0 ("auto"), at least this many images per extra process.
AUTO_IMAGES_PER_WORKER = 24


@dataclass(frozen=True)
class SourceImage:
    """One picture a source offers: a local file or a URL, and its caption if the source has one."""

    origin: str  # what the report calls it: the path as the source wrote it, or the URL
    caption: str | None
    path: Path | None = None
    url: str | None = None


# One source of truth for the defaults: the [dataset] and [training] sections of the config.
_DATASET = DatasetConfig()


@dataclass(frozen=True)
class ImportSettings:
    """How to import; defaults come from `[dataset]` (and the resolution from `[training]`)."""

    # SD 1.5's native size; `dataset import` passes [training] resolution, "auto" resolved for the base model.
    resolution: int = 512
    min_image_size: int = _DATASET.min_image_size
    min_caption_chars: int = _DATASET.min_caption_chars
    near_duplicate_distance: int = _DATASET.near_duplicate_distance
    max_download_bytes: int = _DATASET.max_download_bytes
    download_concurrency: int = _DATASET.download_concurrency
    download_timeout_s: float = _DATASET.download_timeout_s
    csv_image_column: str = _DATASET.csv_image_column
    csv_caption_column: str = _DATASET.csv_caption_column
    workers: int = _DATASET.import_workers  # processes decoding and resizing; 0: one per CPU core
    allow_private_hosts: tuple[str, ...] = tuple(_DATASET.allow_private_hosts)
    allow_paths_outside_source: bool = _DATASET.allow_paths_outside_source
    max_image_pixels: int = _DATASET.max_image_pixels

    @classmethod
    def from_config(cls, dataset_config: DatasetConfig, resolution: int) -> ImportSettings:
        """ImportSettings from the [dataset] section plus the training resolution."""
        return cls(
            resolution=resolution,
            min_image_size=dataset_config.min_image_size,
            min_caption_chars=dataset_config.min_caption_chars,
            near_duplicate_distance=dataset_config.near_duplicate_distance,
            max_download_bytes=dataset_config.max_download_bytes,
            download_concurrency=dataset_config.download_concurrency,
            download_timeout_s=dataset_config.download_timeout_s,
            csv_image_column=dataset_config.csv_image_column,
            csv_caption_column=dataset_config.csv_caption_column,
            workers=dataset_config.import_workers,
            allow_private_hosts=tuple(dataset_config.allow_private_hosts),
            allow_paths_outside_source=dataset_config.allow_paths_outside_source,
            max_image_pixels=dataset_config.max_image_pixels,
        )


@dataclass
class ImportReport:
    source: str
    format: str
    resolution: int
    dataset_hash: str = ""
    kept: list[dict[str, str]] = field(default_factory=list)  # {"file_name", "text", "source"}
    dropped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason", "detail"}

    def drop(self, candidate: SourceImage, reason: str, detail: str) -> None:
        log.debug("dropped %s: %s (%s)", candidate.origin, reason, detail)
        self.dropped.append({"source": candidate.origin, "reason": reason, "detail": detail})

    def dropped_by_reason(self) -> dict[str, int]:
        return dict(Counter(entry["reason"] for entry in self.dropped).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "resolution": self.resolution,
            "dataset_hash": self.dataset_hash,
            "kept_count": len(self.kept),
            "dropped_count": len(self.dropped),
            "dropped_by_reason": self.dropped_by_reason(),
            "kept": self.kept,
            "dropped": self.dropped,
        }

    def summary(self) -> str:
        """One line for people: how many kept, how many dropped and for what."""
        reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in self.dropped_by_reason().items())
        dropped = f"dropped {len(self.dropped)} ({reasons})" if self.dropped else "dropped none"
        return f"kept {len(self.kept)} image{'' if len(self.kept) == 1 else 's'}, {dropped}"


# ---------------------------------------------------------------------------------------------
# Reading sources: each reader returns the pictures it names, or raises DatasetError before any slow work.


def clean_caption(text: str | None) -> str | None:
    """Captions as one line with single spaces; None stays None (no caption at all)."""
    if text is None:
        return None
    return " ".join(str(text).split())


def is_url(link: str) -> bool:
    return link.startswith(("http://", "https://"))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _sidecar_caption(image: Path) -> str | None:
    for suffix in CAPTION_SUFFIXES:
        sidecar = image.with_suffix(suffix)
        if sidecar.is_file():
            return clean_caption(sidecar.read_text(encoding="utf-8", errors="replace"))
    return None


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, in a stable order, skipping hidden files and folders."""
    return sorted(
        p for p in folder.rglob("*")
        if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _local_or_url(link: str, base: Path, caption: str | None) -> SourceImage:
    if is_url(link):
        return SourceImage(origin=link, caption=caption, url=link)
    path = Path(link).expanduser()
    return SourceImage(origin=link, caption=caption, path=path if path.is_absolute() else base / path)


def read_folder(src: Path) -> list[SourceImage]:
    """Images anywhere under SRC, each captioned by the `.txt` beside it (if any)."""
    return [
        SourceImage(origin=str(p.relative_to(src)), caption=_sidecar_caption(p), path=p)
        for p in _images_under(src)
    ]


def dreambooth_caption(folder_name: str) -> str | None:
    """`sks_dog` -> "sks dog"; kohya's repeat count (`10_sks_dog`) is not part of the caption."""
    match = DREAMBOOTH_FOLDER.match(folder_name)
    if match is None:
        return None
    trigger, class_words = match.groups()
    return clean_caption(f"{trigger} {class_words.replace('_', ' ')}")


def _dreambooth_folders(src: Path) -> list[Path]:
    return sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_under(d))


def read_dreambooth(src: Path) -> list[SourceImage]:
    """Folders named `<trigger>_<class>`; a `.txt` beside an image beats the folder's caption."""
    folders = _dreambooth_folders(src)
    bad = [d.name for d in folders if dreambooth_caption(d.name) is None]
    if bad:
        raise DatasetError(
            f"{src}: DreamBooth folders must be named <trigger>_<class> (e.g. sks_dog); "
            f"these are not: {', '.join(bad[:5])}"
        )
    candidates = []
    for folder in folders:
        folder_caption = dreambooth_caption(folder.name)
        for image in _images_under(folder):
            caption = _sidecar_caption(image)
            candidates.append(
                SourceImage(origin=str(image.relative_to(src)), caption=caption or folder_caption, path=image)
            )
    return candidates


def read_image_folder_metadata(src: Path) -> list[SourceImage]:
    """`metadata.jsonl` (Hugging Face imagefolder): one {"file_name", "text"} object per line."""
    path = src / METADATA_FILE if src.is_dir() else src
    rows = read_metadata(path, without_file_name='each line needs a "file_name" (and usually a "text")')
    return [_local_or_url(row.values["file_name"], path.parent, clean_caption(row.values.get("text")))
            for row in rows]


def read_json_list(src: Path) -> list[SourceImage]:
    """A JSON list of {"link", "caption"}; a link is a path (relative to the file) or a URL."""
    try:
        rows = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{src}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise DatasetError(f"{src}: nests lists or objects too deeply; expected a flat list of links") from None
    except ValueError:  # an integer of over 4300 digits, which Python will not convert
        raise DatasetError(f"{src}: holds a number with thousands of digits; expected a list of links") from None
    if not isinstance(rows, list):
        raise DatasetError(f'{src}: expected a JSON list of {{"link", "caption"}} objects')
    candidates = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("link"), str):
            raise DatasetError(f'{src}: item {index} has no "link" (expected {{"link", "caption"}})')
        candidates.append(_local_or_url(row["link"], src.parent, clean_caption(row.get("caption"))))
    return candidates


def read_csv(src: Path, image_column: str, caption_column: str) -> list[SourceImage]:
    """A CSV with a header row; the image column holds a path (relative to the file) or a URL."""
    with src.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = reader.fieldnames or []
            missing = [name for name in (image_column, caption_column) if name not in columns]
            if missing:
                raise DatasetError(
                    f"{src}: no column {', '.join(repr(m) for m in missing)} "
                    f"(columns: {', '.join(columns) or 'none'}); pick them with --image-column and --caption-column"
                )
            return [
                _local_or_url(row[image_column].strip(), src.parent, clean_caption(row[caption_column]))
                for row in reader
                if (row[image_column] or "").strip()
            ]
        except csv.Error:
            # The csv module's own words ("field larger than field limit (131072)") name no line.
            raise DatasetError(f"{src}:{reader.line_num + 1}: not a readable CSV row (a field over "
                               f"{csv.field_size_limit()} characters, or a NUL byte)") from None


def read_url_list(src: Path) -> list[SourceImage]:
    """One image URL per line, optionally followed by a caption; blank lines and `#` comments skipped."""
    candidates = []
    for number, line in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        url, *caption = line.split(maxsplit=1)
        if not is_url(url):
            raise DatasetError(f"{src}:{number}: not an http(s) URL: {url[:80]}")
        candidates.append(SourceImage(origin=url, caption=clean_caption(caption[0]) if caption else None, url=url))
    return candidates


def detect_format(src: Path) -> str:
    """Which reader fits SRC: by file suffix, or for a folder by what it contains."""
    if src.is_file():
        by_suffix = {".jsonl": "metadata", ".json": "json", ".csv": "csv", ".txt": "urls"}
        if src.suffix.lower() in by_suffix:
            return by_suffix[src.suffix.lower()]
        raise DatasetError(
            f"{src}: unknown source format; expected a folder, metadata.jsonl, a .json list, "
            "a .csv or a .txt of URLs (or name one with --format)"
        )
    if (src / METADATA_FILE).is_file():
        return "metadata"
    top_level_images = any(_is_image(p) for p in src.iterdir())
    folders = _dreambooth_folders(src)
    if not top_level_images and folders and all(dreambooth_caption(d.name) for d in folders):
        return "dreambooth"
    return "folder"


def read_source(src: Path, source_format: str, settings: ImportSettings) -> tuple[str, list[SourceImage]]:
    """The format SRC was read as (resolving "auto") and the pictures it names."""
    if not src.exists():
        raise DatasetError(f"{src}: no such file or folder")
    if source_format == "auto":
        source_format = detect_format(src)
    try:
        return source_format, _read(src, source_format, settings)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{src}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise DatasetError(f"{exc.filename or src}: cannot read: {exc.strerror or exc}") from None


def _read(src: Path, source_format: str, settings: ImportSettings) -> list[SourceImage]:
    if source_format in {"folder", "dreambooth"} and not src.is_dir():
        raise DatasetError(f"{src}: the {source_format} format reads a folder, not a file")
    if source_format in {"json", "csv", "urls"} and not src.is_file():
        raise DatasetError(f"{src}: the {source_format} format reads a file, not a folder")
    if source_format == "folder":
        return read_folder(src)
    if source_format == "dreambooth":
        return read_dreambooth(src)
    if source_format == "metadata":
        if src.is_dir() and not (src / METADATA_FILE).is_file():
            raise DatasetError(f"{src}: no {METADATA_FILE} in this folder")
        return read_image_folder_metadata(src)
    if source_format == "json":
        return read_json_list(src)
    if source_format == "csv":
        return read_csv(src, settings.csv_image_column, settings.csv_caption_column)
    if source_format == "urls":
        return read_url_list(src)
    raise DatasetError(f"unknown format {source_format!r}; expected one of: auto, {', '.join(SOURCE_FORMATS)}")


# ---------------------------------------------------------------------------------------------
# Normalising pixels.


def open_normalised(data: bytes, resolution: int, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode, upright (EXIF), flatten to RGB and fit to a resolution square; also the stored size
    (before JPEG's draft shrinks it; its shorter side survives rotation). Raises ImageRefused."""
    # A 108 MP phone JPEG decodes at 1/8 scale for free (draft keeps both sides >= resolution),
    # so the pixel cap applies to what is decoded, not to what the header says.
    opened, stored_size = decode_untrusted(data, max_pixels, draft_size=resolution)
    image = _to_rgb(ImageOps.exif_transpose(opened))
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS), stored_size


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        # Transparent pixels often hide black RGB; on white, cut-outs look the way people saw them.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# The import itself.


def import_dataset(
    src: Path,
    out: Path,
    settings: ImportSettings,
    source_format: str = "auto",
    progress: bool = True,
) -> ImportReport:
    """Read SRC, normalise and filter its pictures, and write the dataset folder OUT."""
    src, out = Path(src), Path(out)
    check_output_folder(out)
    source_format, candidates = read_source(src, source_format, settings)
    if not candidates:
        raise DatasetError(f"{src}: no images found (read as {source_format})")

    report = ImportReport(source=str(src), format=source_format, resolution=settings.resolution)
    root = (src if src.is_dir() else src.parent).resolve()
    with staged_folder(out, f"importing-{os.getpid()}") as staging:
        _build(candidates, root, staging, settings, report, progress)
        if not report.kept:
            raise DatasetError(f"{src}: nothing left to import: {report.summary()}")
        write_metadata(staging, [SFT.row(file_name=k["file_name"], text=k["text"]) for k in report.kept])
        # The content hash training computes, so a run names what it learned from.
        report.dataset_hash = record_dataset_hash(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    log.debug("imported %s into %s: %s", src, out, report.summary())
    return report


@dataclass(frozen=True)
class Normalised:
    """A file a worker read, hashed and normalised: the PNG to keep unless it duplicates another."""

    sha256: str
    fingerprint: int  # its perceptual hash
    png: bytes


@dataclass(frozen=True)
class Unusable:
    """A file a worker could not use, and why; no sha256 when it could not even be read."""

    sha256: str | None
    reason: str
    detail: str


class NotAFile(Exception):
    """A local entry that is not a regular file under the size cap; the message says which."""


def read_local_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; NotAFile or OSError otherwise.

    Opened without blocking (a FIFO would wait for a writer) and checked on the open file, then
    read with the cap enforced while reading: /dev/zero or a file still growing never fills memory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFile("not a regular file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise NotAFile(f"too large (over the {max_bytes}-byte limit)")
    return data


def process_file(path: Path, resolution: int, min_image_size: int, max_bytes: int,
                 max_pixels: int) -> Normalised | Unusable:
    """Read, hash and normalise one file; pure, so it runs the same inline or in a worker process."""
    try:
        data = read_local_file(path, max_bytes)
    except NotAFile as exc:
        return Unusable(None, UNREADABLE, str(exc))
    except OSError as exc:
        return Unusable(None, UNREADABLE, exc.strerror or str(exc))
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        image, (width, height) = open_normalised(data, resolution, max_pixels)
    except ImageRefused as exc:
        return Unusable(sha256, UNREADABLE, exc.message)
    if min(width, height) < min_image_size:
        return Unusable(sha256, TOO_SMALL, f"{width}x{height}, shorter side under {min_image_size}")
    buffer = io.BytesIO()
    # zlib level 1: about 3x faster to write than the default 6 for ~20% more disk; training
    # reads each file once into its latent cache, so speed wins here.
    image.save(buffer, format="PNG", compress_level=1)
    return Normalised(sha256, perceptual_hash(image), buffer.getvalue())


def _process_all(files: list[Path], settings: ImportSettings) -> Iterator[Normalised | Unusable]:
    """process_file over `files`, in order; on several processes when there is enough work."""
    work = functools.partial(process_file, resolution=settings.resolution, min_image_size=settings.min_image_size,
                             max_bytes=settings.max_download_bytes, max_pixels=settings.max_image_pixels)
    if settings.workers:
        workers = min(settings.workers, len(files))
    else:
        # Starting a worker re-imports this module (a second or more), so "auto" only pays it
        # for imports with some dozens of images per core.
        workers = min(os.cpu_count() or 1, len(files) // AUTO_IMAGES_PER_WORKER)
    if workers <= 1:
        yield from map(work, files)
        return
    # spawn, not fork: the download step may leave resolver threads behind, and forking a
    # process with threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(work, files, chunksize=4)


def _outside(path: Path, root: Path) -> bool:
    """Whether `path`, its symlinks resolved, lies outside the source's folder `root`."""
    return not path.resolve().is_relative_to(root)


def _build(candidates: list[SourceImage], root: Path, staging: Path, settings: ImportSettings,
           report: ImportReport, progress: bool) -> None:
    # Captions are checked first: a junk caption is dropped before its image is downloaded.
    wanted = []
    for candidate in candidates:
        caption = candidate.caption or ""
        if caption and len(caption) < settings.min_caption_chars:
            report.drop(candidate, CAPTION_TOO_SHORT, f"{caption!r} is under {settings.min_caption_chars} characters")
        elif (candidate.path is not None and not settings.allow_paths_outside_source
              and _outside(candidate.path, root)):
            report.drop(candidate, OUTSIDE_SOURCE,
                        f"outside the source's folder {root}; allow it with --allow-paths-outside-source")
        else:
            wanted.append(candidate)

    # Of two copies of a picture the first one seen is kept, so captioned pictures go first.
    wanted.sort(key=lambda candidate: not candidate.caption)

    downloads_dir = staging / ".downloads"
    urls = [c.url for c in wanted if c.url is not None]
    downloaded: dict[str, Path | Refused | str] = {}
    if urls:
        downloads_dir.mkdir()
        policy = HostPolicy.allowing(settings.allow_private_hosts)
        downloaded = asyncio.run(download_all(
            urls, downloads_dir, policy, max_bytes=settings.max_download_bytes,
            concurrency=settings.download_concurrency, timeout_s=settings.download_timeout_s, progress=progress))

    files: list[tuple[SourceImage, Path]] = []
    for candidate in wanted:
        fetched = downloaded[candidate.url] if candidate.url is not None else candidate.path
        if isinstance(fetched, Refused):
            report.drop(candidate, REFUSED_HOST,
                        f"{fetched.reason}; allow a host of your own with --allow-private-host ADDRESS")
        elif isinstance(fetched, str):
            report.drop(candidate, DOWNLOAD_FAILED, fetched)
        elif fetched is not None:  # every source gives a picture a path or a URL
            files.append((candidate, fetched))

    # Decoding and resizing run in parallel; keeping or dropping is decided here, in source
    # order, so the result does not depend on the number of workers.
    seen_sha256: dict[str, str] = {}
    near_duplicates: NearDuplicateIndex[str] = NearDuplicateIndex(settings.near_duplicate_distance)
    results = _process_all([file for _, file in files], settings)
    for (candidate, _), result in tqdm(
        zip(files, results, strict=True), total=len(files), desc="importing", unit="image", disable=not progress
    ):
        if result.sha256 is not None and result.sha256 in seen_sha256:
            report.drop(candidate, DUPLICATE, f"same file as {seen_sha256[result.sha256]}")
            continue
        if result.sha256 is not None:
            seen_sha256[result.sha256] = candidate.origin
        if isinstance(result, Unusable):
            report.drop(candidate, result.reason, result.detail)
            continue
        match = near_duplicates.closest(result.fingerprint)
        if match is not None:
            report.drop(candidate, NEAR_DUPLICATE, f"looks like {match[0]}, distance {match[1]}")
            continue
        file_name = image_file_name(result.sha256)
        (staging / file_name).write_bytes(result.png)
        near_duplicates.add(result.fingerprint, candidate.origin)
        report.kept.append({"file_name": file_name, "text": candidate.caption or "", "source": candidate.origin})
    if downloads_dir.exists():
        shutil.rmtree(downloads_dir)
