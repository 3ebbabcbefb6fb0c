"""A dataset on disk: its folder layout, its row formats, metadata.jsonl, its content hash, and
the perceptual hash and near-duplicate index that keep look-alike pictures out of it.

Import, captioning and curation write datasets and training reads them; every one of them goes
through here, so the folder below means the same thing to all of them:

    OUT/<sha256[:16]>.png        sft, kto: the images (import and curation name them by content)
    OUT/metadata.jsonl           sft, kto: one JSON object a line, in one of `FORMATS`:
                                   sft  {"file_name": ..., "text": ...}
                                   kto  {"file_name": ..., "text": ..., "label": true | false}
    OUT/data/train-00000-of-00001.parquet
                                 dpo: Pick-a-Pic's columns, the images inside as bytes:
                                   caption (string), jpg_0, jpg_1 (binary), label_0 (1.0 | 0.0 | 0.5)
    every format's rows may also hold "weight", a per-example loss weight (curation writes it;
    without it an example weighs 1)
    OUT/dataset_hash             sha256 over metadata.jsonl, then each image it names (name, NUL,
                                 sha256) in name order; for Parquet, over each row with its images
                                 by sha256: what a trained adapter records it learned from
    OUT/report.json              what the step that wrote the folder kept and dropped, and why
    OUT/score_histogram.png      curation only: the net scores, kept and dropped

Every layout is what `datasets.load_dataset(OUT)` reads with no arguments: imagefolder's
metadata.jsonl for sft and kto, and for dpo the Hub's shard names, which it looks for before
anything else in a folder, so the report and histogram beside them are not taken for data. The
dpo shards are what diffusers' train_diffusion_dpo.py reads (`Image.open(io.BytesIO(jpg_0))`),
and a Pick-a-Pic shard dropped into data/ trains as it is (its extra columns are ignored).

A format is a `DatasetFormat`: its columns in the order they are written, which of them name
image files or hold image bytes, and where its rows live (metadata.jsonl or Parquet shards).

Floor: part of `training/`; imports only the stdlib, numpy, PIL and `loraloop`'s floor (pyarrow
when a Parquet dataset is read or written).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
from PIL import Image

METADATA_FILE = "metadata.jsonl"
# The Hub's name for the one shard of a train split: `datasets.load_dataset(folder)` finds it first.
PARQUET_FILE = "data/train-00000-of-00001.parquet"
PARQUET_GLOB = "data/train-*.parquet"
# Rows per Parquet row group: a group's images are in memory at once while writing or reading.
PARQUET_ROWS_PER_GROUP = 256
REPORT_FILE = "report.json"
HASH_FILE = "dataset_hash"
HISTOGRAM_FILE = "score_histogram.png"


class DatasetError(Exception):
    """A dataset problem a person can fix (bad input, a broken metadata.jsonl, a folder in the
    way); the message names the file, and the line where there is one, and says what to do."""


# --- formats --------------------------------------------------------------------------------

FormatName = Literal["sft", "kto", "dpo"]


@dataclass(frozen=True)
class ValueCheck:
    """What one column's value must be: `test` passes it; `expected` says so in an error."""

    column: str
    test: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True)
class DatasetFormat:
    """One shape of metadata.jsonl row: its columns in the order they are written (the bytes are
    part of the dataset hash), the columns that name image files, and the checks on the rest."""

    name: FormatName
    columns: tuple[str, ...]
    image_columns: tuple[str, ...]  # hold an image's file name, in the dataset folder
    value_checks: tuple[ValueCheck, ...] = ()
    image_bytes_columns: tuple[str, ...] = ()  # hold an image file's bytes (Parquet only)
    storage: Literal["jsonl", "parquet"] = "jsonl"
    # Columns a row may have (written after the others, checked when present): every format's
    # per-example loss `weight` (curation writes it; a row without one weighs 1).
    optional_columns: tuple[str, ...] = ("weight",)

    def row(self, **values: Any) -> dict[str, Any]:
        """A row to write, its columns in this format's order."""
        if not set(self.columns) <= set(values) <= set(self.columns) | set(self.optional_columns):
            raise ValueError(f"a {self.name} row has the columns {', '.join(self.columns)}"
                             f" (and optionally {', '.join(self.optional_columns)}), not {', '.join(values)}")
        return {column: values[column] for column in (*self.columns, *self.optional_columns) if column in values}

    def check(self, row: MetadataRow) -> None:
        """Raise DatasetError, naming the line, if `row` lacks a column or holds a wrong value."""
        missing = [column for column in self.columns if column not in row.values]
        if missing:
            raise DatasetError(f"{row.where}: missing column(s) {', '.join(missing)} "
                               f"(a {self.name} dataset needs {', '.join(self.columns)})")
        for check in (*self.value_checks, WEIGHT_CHECK):
            if check.column not in row.values and check.column in self.optional_columns:
                continue
            value = row.values[check.column]
            if not check.test(value):
                raise DatasetError(f"{row.where}: {check.column} must be {check.expected}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_probability(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


# A per-example loss weight: finite and not negative (0 leaves an example out of the loss).
WEIGHT_CHECK = ValueCheck(
    "weight", lambda value: _is_number(value) and 0 <= value < float("inf"), "a number of 0 or more")
SFT = DatasetFormat("sft", columns=("file_name", "text"), image_columns=("file_name",))
KTO = DatasetFormat(
    "kto", columns=("file_name", "text", "label"), image_columns=("file_name",),
    value_checks=(ValueCheck("label", lambda value: isinstance(value, bool), "true or false"),),
)
def _is_image_bytes(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) > 0


# label_0 is the probability that jpg_0 is the preferred image: 1.0, 0.0, or 0.5 for a tie.
DPO = DatasetFormat(
    "dpo", columns=("caption", "jpg_0", "jpg_1", "label_0"), image_columns=(),
    value_checks=(ValueCheck("caption", lambda value: isinstance(value, str), "a string"),
                  ValueCheck("jpg_0", _is_image_bytes, "an image file's bytes"),
                  ValueCheck("jpg_1", _is_image_bytes, "an image file's bytes"),
                  ValueCheck("label_0", _is_probability, "a number between 0 and 1")),
    image_bytes_columns=("jpg_0", "jpg_1"), storage="parquet",
)
FORMATS: dict[str, DatasetFormat] = {fmt.name: fmt for fmt in (SFT, KTO, DPO)}
# Every column, in any format, that names an image: what the dataset hash covers.
IMAGE_COLUMNS = tuple(dict.fromkeys(column for fmt in FORMATS.values() for column in fmt.image_columns))


def image_file_name(sha256: str) -> str:
    """The name import and curation give an image in a dataset: its content, shortened."""
    return f"{sha256[:16]}.png"


# --- metadata.jsonl -------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataRow:
    """One line of a metadata.jsonl: its JSON object, and where it is for error messages."""

    where: str  # "<path>:<line number>"
    values: dict[str, Any]


def read_metadata(path: Path, without_file_name: str | None = None) -> list[MetadataRow]:
    """The JSON object on each non-blank line of the metadata.jsonl at `path`, in file order.

    Raises DatasetError naming the file and line for text that is not UTF-8, a line that is not
    valid JSON, and one that is not an object. With `without_file_name` (what the caller needs,
    in its words), a row without a string "file_name" is an error too, with that message.
    """
    return _parse_metadata(path, _decode(path, path.read_bytes()), without_file_name)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _parse_metadata(path: Path, text: str, without_file_name: str | None) -> list[MetadataRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            values = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise DatasetError(f"{where}: nests lists or objects too deeply for a metadata row") from None
        except ValueError:  # an integer of over 4300 digits, which Python will not convert
            raise DatasetError(f"{where}: holds a number with thousands of digits") from None
        lacks_file_name = without_file_name is not None and not (
            isinstance(values, dict) and isinstance(values.get("file_name"), str))
        if not isinstance(values, dict) or lacks_file_name:
            raise DatasetError(f"{where}: {without_file_name or 'expected a JSON object'}")
        rows.append(MetadataRow(where, values))
    return rows


def write_metadata(folder: Path, rows: list[dict[str, Any]]) -> bytes:
    """Replace FOLDER/metadata.jsonl in one step (a reader sees the old file or the new one,
    never half) and return the bytes written, which the dataset hash starts with."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    path = folder / METADATA_FILE
    partial = path.with_name(f".{METADATA_FILE}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return data


# --- Parquet shards ---------------------------------------------------------------------------


def parquet_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob(PARQUET_GLOB))


def write_parquet(folder: Path, dataset_format: DatasetFormat, rows: Iterable[dict[str, Any]]) -> str:
    """Write `rows` as FOLDER/data/train-00000-of-00001.parquet, a row group at a time (so memory
    holds one group's images, not the dataset's), and return the dataset hash of what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"caption": pa.string(), "label_0": pa.float64(), "weight": pa.float64(),
             **{column: pa.binary() for column in dataset_format.image_bytes_columns}}
    schema = pa.schema([(column, types[column])
                        for column in (*dataset_format.columns, *dataset_format.optional_columns)])
    path = folder / PARQUET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = RowsDigest(dataset_format)
    group: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            digest.add(row)
            group.append(row)
            if len(group) == PARQUET_ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                group = []
        if group:
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
    return digest.hexdigest()


def read_parquet(folder: Path, dataset_format: DatasetFormat) -> Iterator[MetadataRow]:
    """The rows of FOLDER's Parquet shards, a row group at a time, each checked against the format.

    Raises DatasetError naming the file for a shard that is not Parquet or lacks a column, and
    naming the row for a wrong value. Other columns (Pick-a-Pic has a dozen more) are not read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in parquet_shards(folder):
        try:
            shard = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
        missing = [c for c in dataset_format.columns if c not in shard.schema_arrow.names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} "
                               f"(a {dataset_format.name} dataset needs {', '.join(dataset_format.columns)})")
        optional = [c for c in dataset_format.optional_columns if c in shard.schema_arrow.names]
        number = 0
        for batch in shard.iter_batches(batch_size=PARQUET_ROWS_PER_GROUP,
                                        columns=[*dataset_format.columns, *optional]):
            for values in batch.to_pylist():
                # An optional column is one Parquet column for all rows: null where a row has no value.
                values = {k: v for k, v in values.items() if v is not None or k not in optional}
                row = MetadataRow(f"{path}: row {number}", values)
                dataset_format.check(row)
                number += 1
                yield row


class RowsDigest:
    """The hash of a Parquet dataset, row by row: each row as JSON with its images by sha256
    (`dataset_hash` of the folder, computed while the rows go by)."""

    def __init__(self, dataset_format: DatasetFormat) -> None:
        self.format = dataset_format
        self._digest = hashlib.sha256()

    def add(self, values: Mapping[str, Any], image_sha256: Mapping[str, str] | None = None) -> None:
        """Add a row; `image_sha256` gives its images' digests by column when the caller has them."""
        known = image_sha256 or {}
        line = {column: known.get(column) or hashlib.sha256(values[column]).hexdigest()
                if column in self.format.image_bytes_columns else values[column] for column in self.format.columns}
        line.update({column: values[column] for column in self.format.optional_columns if column in values})
        self._digest.update(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


# --- the content hash -----------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content_hash(metadata: bytes, file_digests: Mapping[str, str]) -> str:
    """The dataset hash from metadata.jsonl's bytes and each image's sha256 by name."""
    digest = hashlib.sha256(metadata)
    for name in sorted(file_digests):
        digest.update(name.encode() + b"\0" + file_digests[name].encode())
    return digest.hexdigest()


def dataset_hash(folder: Path) -> str:
    """sha256 over metadata.jsonl, then each image it names (name, NUL, sha256) in name order; for
    Parquet shards (dpo), over each row with its images by sha256.

    Reads every image, so it also verifies a dataset on disk against its recorded hash.
    """
    if parquet_shards(folder):
        digest = RowsDigest(DPO)
        for row in read_parquet(folder, DPO):
            digest.add(row.values)
        return digest.hexdigest()
    path = folder / METADATA_FILE
    metadata = path.read_bytes()
    names = {row.values[column] for row in _parse_metadata(path, _decode(path, metadata), None)
             for column in IMAGE_COLUMNS if column in row.values}
    return content_hash(metadata, {name: file_sha256(folder / name) for name in names})


def record_dataset_hash(folder: Path, digest: str | None = None) -> str:
    """Write FOLDER/dataset_hash and return it; computed from the files unless given (a caller
    that has just verified every image's sha256 need not read them again)."""
    digest = digest if digest is not None else dataset_hash(folder)
    (folder / HASH_FILE).write_text(digest + "\n", encoding="utf-8")
    return digest


# --- the output folder ----------------------------------------------------------------------


def check_output_folder(out: Path, error: type[DatasetError] = DatasetError) -> None:
    """Refuse an output folder that holds anything: a dataset is never written over another."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise error(f"{out}: already exists and is not empty; choose a new output folder")


@contextmanager
def staged_folder(out: Path, tag: str) -> Iterator[Path]:
    """A scratch folder beside OUT (`.OUT.<tag>`) to build a dataset in: renamed to OUT when the
    block ends, removed when it raises, so an interruption never leaves a half-written dataset
    where training would look. OUT must have passed `check_output_folder`."""
    staging = out.parent / f".{out.name}.{tag}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty: check_output_folder said so
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # still there only when the block failed


# --- perceptual hash and near-duplicates ----------------------------------------------------


def _dct_matrix(size: int) -> np.ndarray:
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    return np.cos(np.pi * (2 * n + 1) * k / (2 * size))  # DCT-II, unscaled


_DCT_32 = _dct_matrix(32)
# A coefficient of a flat or mirror-symmetric block is exactly zero, but a matrix product leaves
# ~1e-13 of rounding there; a block that is mostly such zeros has a median of zero, so the noise
# would decide its bits. The reference pHash's FFT gives exact zeros, and snapping matches it; a
# genuine coefficient this small (of 0-255 pixels) flips a bit only if the median is as close.
_ROUNDING = 1e-6


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit pHash of `image`, bit for bit what the ImageHash library's `phash` gives
    (tests/test_dataset.py checks): the low 8x8 frequencies of a 32x32 greyscale DCT against
    their median. In numpy, without that library's scipy import and per-hash objects: a cold
    curation of 20,000 images is ~40% faster (bench/RESULTS.md)."""
    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT_32 @ pixels @ _DCT_32.T)[:8, :8]  # (8, 8), row 0 / column 0 the lowest
    low[np.abs(low) < _ROUNDING] = 0.0
    bits = (low > np.median(low)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


ImageId = TypeVar("ImageId")


class NearDuplicateIndex(Generic[ImageId]):
    """The perceptual hashes of the images kept so far, and which of them a new image is closest
    to, if any is within `max_distance` bits (at or under; 0-64).

    A lookup is one vectorised XOR and popcount over every kept hash: about 6 us against 10,000
    kept images at any distance (bench/dataset_import.py). Bucketing hashes by distance + 1
    chunks (two hashes that close share one chunk exactly) was as fast at distance 4 on random
    hashes, but slower on photos' clustered hashes (1.6x) and far slower at 8-16 bits (7-190x).
    """

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self._hashes = np.zeros(64, dtype=np.uint64)
        self._ids: list[ImageId] = []

    def closest(self, value: int) -> tuple[ImageId, int] | None:
        """The kept image this one duplicates and their distance; of equals, the first kept."""
        if not self._ids:
            return None
        distances = np.bitwise_count(self._hashes[: len(self._ids)] ^ np.uint64(value))
        best = int(distances.argmin())
        if distances[best] <= self.max_distance:
            return self._ids[best], int(distances[best])
        return None

    def find(self, value: int) -> ImageId | None:
        """The kept image this one duplicates, if any."""
        match = self.closest(value)
        return None if match is None else match[0]

    def add(self, value: int, image_id: ImageId) -> None:
        if len(self._ids) == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
        self._hashes[len(self._ids)] = np.uint64(value)
        self._ids.append(image_id)
