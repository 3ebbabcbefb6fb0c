"""`training/dataset.py`: a dataset folder's formats, its metadata.jsonl, its hash, the output
folder, the perceptual hash (checked bit for bit against the ImageHash library's) and the
near-duplicate index.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from training.dataset import (
    DPO,
    FORMATS,
    KTO,
    SFT,
    DatasetError,
    MetadataRow,
    NearDuplicateIndex,
    check_output_folder,
    content_hash,
    dataset_hash,
    perceptual_hash,
    read_metadata,
    read_parquet,
    record_dataset_hash,
    staged_folder,
    write_metadata,
    write_parquet,
)


def shapes(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(1, width + 1), y0 + rng.randrange(1, height + 1))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def varied_images() -> dict[str, Image.Image]:
    """Pictures of every shape and mode an import or a curation meets, and the degenerate ones
    (flat, one-dimensional, mirror-symmetric) whose DCT has exact zeros a rounding error flips."""
    images: dict[str, Image.Image] = {}
    sizes = [(96, 80), (80, 96), (640, 480), (31, 200), (33, 33), (7, 3), (1, 50)]
    modes = ["RGB", "L", "RGBA", "LA", "P", "1", "I;16", "CMYK"]
    for seed in range(32):
        size, mode = sizes[seed % len(sizes)], modes[seed % len(modes)]
        images[f"shapes {seed} {mode} {size[0]}x{size[1]}"] = shapes(seed, size).convert(mode)
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (int(rng.integers(20, 120)), int(rng.integers(20, 120)), 4), dtype=np.uint8)
        images[f"noise {i} RGBA"] = Image.fromarray(pixels, "RGBA")
    ramp = np.linspace(0, 255, 300)[None, :].repeat(100, axis=0).astype(np.uint8)
    half = rng.integers(0, 256, (32, 16), dtype=np.uint8)
    images.update({
        "flat colour": Image.new("RGB", (64, 48), (120, 30, 200)),
        "flat black L": Image.new("L", (50, 70), 0),
        "horizontal ramp": Image.fromarray(ramp),
        "vertical ramp": Image.fromarray(ramp.T.copy()),
        "two halves": Image.fromarray(np.repeat(np.array([[0], [255]], dtype=np.uint8), 32, axis=0).repeat(64, 1)),
        "mirrored left-right": Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)),
        "checkerboard": Image.fromarray((np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)),
    })
    return images


def test_the_perceptual_hash_is_bit_for_bit_the_imagehash_phash_of_every_kind_of_picture():
    images = varied_images()
    assert len(images) >= 40

    different = {name: f"{perceptual_hash(image):016x} != {imagehash.phash(image)}"
                 for name, image in images.items() if perceptual_hash(image) != int(str(imagehash.phash(image)), 16)}

    assert different == {}


def test_a_resized_copy_hashes_close_and_a_different_picture_far():
    original = shapes(1, (200, 160))
    copy = perceptual_hash(original.resize((90, 72)))
    assert (perceptual_hash(original) ^ copy).bit_count() <= 4
    assert (perceptual_hash(original) ^ perceptual_hash(shapes(2, (200, 160)))).bit_count() > 10


def test_the_index_matches_at_or_under_the_distance_and_not_one_bit_further():
    index: NearDuplicateIndex[str] = NearDuplicateIndex(max_distance=4)
    assert index.closest(0) is None
    index.add(0, "zero")

    assert index.closest(0b1111) == ("zero", 4)
    assert index.find(0b1111) == "zero"
    assert index.closest(0b11111) is None and index.find(0b11111) is None


def test_the_index_names_the_closest_kept_image_and_the_first_kept_of_equals():
    index: NearDuplicateIndex[str] = NearDuplicateIndex(max_distance=4)
    index.add(0b1111, "four bits away")
    index.add(0b0011, "two bits away")
    index.add(0b0011, "two bits away, kept later")

    assert index.closest(0) == ("two bits away", 2)


def test_the_index_covers_the_whole_0_to_64_bit_range():
    exact: NearDuplicateIndex[int] = NearDuplicateIndex(max_distance=0)
    everything: NearDuplicateIndex[int] = NearDuplicateIndex(max_distance=64)
    for image_id, value in enumerate([0, (1 << 64) - 1, 0xDEAD_BEEF]):
        exact.add(value, image_id)
        everything.add(value, image_id)

    assert exact.closest((1 << 64) - 1) == (1, 0) and exact.find(1) is None
    assert everything.closest(1 << 63) == (0, 1)
    assert everything.find(0x0F0F_0F0F_0F0F_0F0F) is not None


# --- formats and metadata.jsonl -----------------------------------------------------------------


def test_each_format_writes_its_columns_in_order_and_refuses_others():
    assert list(SFT.row(text="a fox", file_name="a.png")) == ["file_name", "text"]
    assert list(KTO.row(label=True, text="a fox", file_name="a.png")) == ["file_name", "text", "label"]
    assert list(DPO.row(label_0=1.0, jpg_1="b.png", jpg_0="a.png", caption="a fox")) == [
        "caption", "jpg_0", "jpg_1", "label_0"]
    assert sorted(FORMATS) == ["dpo", "kto", "sft"]
    with pytest.raises(ValueError, match="a sft row has the columns file_name, text"):
        SFT.row(file_name="a.png", text="a fox", label=True)


def write_lines(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_the_reader_skips_blank_lines_and_says_where_each_row_is(tmp_path):
    path = write_lines(tmp_path / "metadata.jsonl",
                       '{"file_name": "a.png"}\n\n  \n{"file_name": "b.png", "text": "b"}\n')

    rows = read_metadata(path)

    assert [(row.where, row.values) for row in rows] == [
        (f"{path}:1", {"file_name": "a.png"}), (f"{path}:4", {"file_name": "b.png", "text": "b"})]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"file_name": "a.png"}\n{oops\n', r"metadata.jsonl:2: not valid JSON \("),
        ('["a.png"]\n', r"metadata.jsonl:1: expected a JSON object$"),
        ("caf\u00e9\n".encode("latin-1"), r"metadata.jsonl: not UTF-8 text \(invalid continuation byte at byte 3\)"),
    ],
    ids=["broken-json", "not-an-object", "not-utf8"],
)
def test_the_reader_names_the_file_and_line_of_a_broken_row(tmp_path, content, message):
    with pytest.raises(DatasetError, match=message):
        read_metadata(write_lines(tmp_path / "metadata.jsonl", content))


def test_a_caller_that_needs_file_names_says_so_in_its_own_words(tmp_path):
    path = write_lines(tmp_path / "metadata.jsonl", '{"file_name": "a.png"}\n{"file_name": 3}\n')

    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: captioning wants images$"):
        read_metadata(path, without_file_name="captioning wants images")
    with pytest.raises(DatasetError, match=r"metadata.jsonl:1: captioning wants images$"):
        read_metadata(write_lines(path, "[1, 2]\n"), without_file_name="captioning wants images")


@pytest.mark.parametrize(
    ("dataset_format", "values", "message"),
    [
        (SFT, {"file_name": "a.png"}, r"missing column\(s\) text \(a sft dataset needs file_name, text\)"),
        (KTO, {"file_name": "a.png", "text": "t", "label": "yes"}, "label must be true or false, got 'yes'"),
        (DPO, {"caption": "c", "jpg_0": b"a", "jpg_1": b"b", "label_0": True},
         "label_0 must be a number between 0 and 1, got True"),
        (DPO, {"caption": "c", "jpg_0": b"a", "jpg_1": b"b", "label_0": 1.5},
         "label_0 must be a number between 0 and 1, got 1.5"),
        (DPO, {"caption": "c", "jpg_0": "a.png", "jpg_1": b"b", "label_0": 1.0},
         "jpg_0 must be an image file's bytes, got 'a.png'"),
    ],
    ids=["sft-missing-text", "kto-label-not-bool", "dpo-label-bool", "dpo-label-above-one", "dpo-file-name"],
)
def test_a_format_rejects_a_row_that_lacks_a_column_or_holds_a_wrong_value(dataset_format, values, message):
    with pytest.raises(DatasetError, match=rf"where: {message}"):
        dataset_format.check(MetadataRow("where", values))


def test_rows_the_formats_write_pass_their_checks(tmp_path):
    for dataset_format, row in [
        (SFT, SFT.row(file_name="a.png", text="a fox")),
        (KTO, KTO.row(file_name="a.png", text="a fox", label=False)),
    ]:
        write_metadata(tmp_path, [row])
        dataset_format.check(read_metadata(tmp_path / "metadata.jsonl")[0])
    write_parquet(tmp_path, DPO, [DPO.row(caption="a fox", jpg_0=b"a", jpg_1=b"b", label_0=0.5)])
    assert [row.values for row in read_parquet(tmp_path, DPO)] == [
        {"caption": "a fox", "jpg_0": b"a", "jpg_1": b"b", "label_0": 0.5}]


# --- the hash and the output folder ---------------------------------------------------------


def test_the_dataset_hash_covers_the_metadata_and_every_image_it_names(tmp_path):
    (tmp_path / "a.png").write_bytes(b"first image")
    metadata = write_metadata(tmp_path, [SFT.row(file_name="a.png", text="a caf\u00e9")])
    digests = {"a.png": hashlib.sha256(b"first image").hexdigest()}

    assert metadata == '{"file_name": "a.png", "text": "a caf\u00e9"}\n'.encode()
    assert dataset_hash(tmp_path) == content_hash(metadata, digests)
    assert record_dataset_hash(tmp_path) == (tmp_path / "dataset_hash").read_text().strip() == dataset_hash(tmp_path)
    assert not (tmp_path / ".metadata.jsonl.partial").exists()

    (tmp_path / "a.png").write_bytes(b"first image, edited")
    assert dataset_hash(tmp_path) != content_hash(metadata, digests)


def test_a_parquet_datasets_hash_covers_every_row_and_the_bytes_of_its_images(tmp_path):
    rows = [DPO.row(caption="a caf\u00e9", jpg_0=b"first image", jpg_1=b"second image", label_0=1.0)]
    written = write_parquet(tmp_path, DPO, rows)
    assert written == dataset_hash(tmp_path)
    write_parquet(tmp_path, DPO, [dict(rows[0], jpg_1=b"second image, edited")])
    assert dataset_hash(tmp_path) != written


def test_a_dataset_is_built_beside_its_folder_and_appears_only_when_complete(tmp_path):
    out = tmp_path / "datasets" / "fox"

    def interrupted_build() -> None:
        with staged_folder(out, "partial") as staging:
            (staging / "half.png").write_bytes(b"...")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted_build()
    assert not out.exists() and list((tmp_path / "datasets").iterdir()) == []

    with staged_folder(out, "partial") as staging:
        (staging / "whole.png").write_bytes(b"...")
    assert [p.name for p in out.iterdir()] == ["whole.png"]
    assert list((tmp_path / "datasets").iterdir()) == [out]


def test_an_output_folder_with_anything_in_it_is_refused(tmp_path):
    check_output_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")

    class StepError(DatasetError):
        pass

    with pytest.raises(StepError, match=r"taken: already exists and is not empty; choose a new output folder"):
        check_output_folder(tmp_path / "taken", error=StepError)


def test_the_dataset_module_stands_on_the_stdlib_numpy_and_pil_alone():
    probe = "import json, sys; import training.dataset; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent, check=True)
    top_level = {name.split(".")[0] for name in json.loads(result.stdout)}
    allowed = set(sys.stdlib_module_names) | {"numpy", "PIL", "training", "loraloop"}
    assert {name for name in top_level - allowed if not name.startswith("_")} == set()
