"""`loraloop dataset caption`: BLIP fills empty captions, keeps the rest, and fails early on bad input.

The captioner is a tiny BLIP with random weights (built from configs, saved with
save_pretrained, loaded by the same `from_pretrained` calls users hit), so its captions are
gibberish: the tests check which captions get written, not what they say.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from loraloop.cli import cli
from training.caption import with_prefix


def make_dataset(root: Path, texts: list[str], extra: dict | None = None) -> Path:
    root.mkdir(parents=True)
    lines = []
    for i, text in enumerate(texts):
        Image.new("RGB", (64, 64), (40 * i % 256, 90, 200 - 30 * i % 200)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text, **(extra or {})}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def rows(dataset: Path) -> list[dict]:
    return [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]


def run_caption(tmp_path: Path, *args: str):
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text("[dataset]\ncaption_batch_size = 2\ncaption_device = \"cpu\"\n")
    return CliRunner().invoke(cli, ["--config", str(config), "dataset", "caption", "--no-progress", *map(str, args)])


def test_missing_captions_are_filled_and_existing_ones_kept(tmp_path, tiny_blip_dir):
    dataset = make_dataset(tmp_path / "fox", ["a red fox in the snow", "", "   ", "", "an owl"], extra={"label": True})

    result = run_caption(tmp_path, dataset, "--model", tiny_blip_dir)

    assert result.exit_code == 0, result.output
    texts = [row["text"] for row in rows(dataset)]
    assert texts[0] == "a red fox in the snow" and texts[4] == "an owl"
    assert all(texts[i].strip() for i in (1, 2, 3)), texts
    assert all(row["label"] is True for row in rows(dataset)), "other columns survive the rewrite"
    assert "captioned 3 of 5 images, kept 2 existing captions" in result.output
    assert not (dataset / ".metadata.jsonl.partial").exists()


def test_a_prefix_goes_before_every_new_caption_and_overwrite_redoes_all(tmp_path, tiny_blip_dir):
    dataset = make_dataset(tmp_path / "fox", ["a red fox", "", ""])

    result = run_caption(tmp_path, dataset, "--model", tiny_blip_dir, "--prefix", "sks fox,", "--overwrite")

    assert result.exit_code == 0, result.output
    for row in rows(dataset):
        assert row["text"].startswith("sks fox, ") and len(row["text"]) > len("sks fox, ")
    assert "captioned 3 of 3" in result.output


def test_captioning_a_fully_captioned_dataset_loads_no_model_and_changes_nothing(tmp_path):
    dataset = make_dataset(tmp_path / "fox", ["a red fox", "a grey owl"])
    before = (dataset / "metadata.jsonl").read_bytes()

    # A model that cannot load proves it was never loaded.
    result = run_caption(tmp_path, dataset, "--model", str(tmp_path / "no-such-model"))

    assert result.exit_code == 0, result.output
    assert "captioned 0 of 2" in result.output
    assert (dataset / "metadata.jsonl").read_bytes() == before


def test_the_tiny_model_name_builds_an_offline_captioner_in_the_data_dir(tmp_path, data_dir):
    dataset = make_dataset(tmp_path / "fox", [""])

    result = run_caption(tmp_path, dataset, "--model", "tiny")

    assert result.exit_code == 0, result.output
    assert rows(dataset)[0]["text"].strip()
    assert (data_dir / "models" / "tiny-blip" / "config.json").is_file()


def test_a_model_that_cannot_be_loaded_is_a_clear_error_and_the_dataset_is_untouched(tmp_path):
    dataset = make_dataset(tmp_path / "fox", [""])
    before = (dataset / "metadata.jsonl").read_bytes()

    result = run_caption(tmp_path, dataset, "--model", str(tmp_path / "no-such-model"))

    assert result.exit_code == 1
    assert "cannot load the captioning model" in result.output
    assert (dataset / "metadata.jsonl").read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_blip_dir):
    dataset = make_dataset(tmp_path / "fox", [""])

    result = run_caption(tmp_path, dataset, "--model", tiny_blip_dir, "--device", "cuda")

    assert result.exit_code == 1 and "no CUDA GPU; use --device cpu" in result.output


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda ds: None, "no such dataset folder"),
        (lambda ds: ds.mkdir(), "no metadata.jsonl"),
        (lambda ds: (ds.mkdir(), (ds / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": ""}\n')),
         "image gone.png is missing"),
        (lambda ds: (ds.mkdir(), (ds / "metadata.jsonl").write_text('{"caption": "x", "jpg_0": "a.png"}\n')),
         'captioning needs {"file_name", "text"} rows'),
        (lambda ds: (ds.mkdir(), (ds / "metadata.jsonl").write_text("{oops\n")), "metadata.jsonl:1: not valid JSON"),
    ],
    ids=["missing-folder", "no-metadata", "missing-image", "pairs-dataset", "broken-json"],
)
def test_bad_datasets_fail_before_any_model_loads(tmp_path, setup, message):
    dataset = tmp_path / "fox"
    setup(dataset)

    result = run_caption(tmp_path, dataset, "--model", str(tmp_path / "no-such-model"))

    assert result.exit_code == 1
    assert message in result.output


def test_a_prefix_joins_with_one_space_and_never_decorates_an_empty_caption():
    assert with_prefix("sks,", " a  dog ") == "sks, a dog"
    assert with_prefix("", "a dog") == "a dog"
    assert with_prefix("sks", "") == ""


def test_an_imported_then_captioned_folder_is_a_dataset_training_accepts(tmp_path, tiny_blip_dir):
    from training.data import load_dataset

    src = tmp_path / "pictures"
    src.mkdir()
    for i in range(3):
        # Noise, so the import does not drop them as near-duplicates of one another.
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(src / f"{i}.png")
    (src / "0.txt").write_text("a green field")
    config = tmp_path / "config.toml"
    config.write_text('[training]\nresolution = 64\n\n'
                      '[dataset]\nmin_image_size = 48\nimport_workers = 1\ncaption_device = "cpu"\n')
    runner = CliRunner()

    imported = runner.invoke(cli, ["--config", str(config), "dataset", "import", "--no-progress",
                                   str(src), str(tmp_path / "out")])
    captioned = run_caption(tmp_path, tmp_path / "out", "--model", tiny_blip_dir, "--prefix", "zzq,")

    assert imported.exit_code == 0 and captioned.exit_code == 0, imported.output + captioned.output
    dataset = load_dataset(tmp_path / "out", "sft")
    assert len(dataset.examples) == 3
    assert (tmp_path / "out" / "dataset_hash").read_text().strip() == dataset.content_hash, "refreshed after captioning"
    assert sorted(e.caption.startswith("zzq, ") for e in dataset.examples) == [False, True, True]
    assert "a green field" in [e.caption for e in dataset.examples]


def test_an_unreadable_image_stops_with_its_name_and_keeps_the_captions_already_made(tmp_path, tiny_blip_dir):
    dataset = make_dataset(tmp_path / "fox", ["", "", ""])
    (dataset / "2.png").write_bytes(b"not a png")

    result = run_caption(tmp_path, dataset, "--model", tiny_blip_dir)  # batches of 2

    assert result.exit_code == 1
    assert "2.png: unreadable image" in result.output
    texts = [row["text"] for row in rows(dataset)]
    assert texts[0] and texts[1] and texts[2] == ""
