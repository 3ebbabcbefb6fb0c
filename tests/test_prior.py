"""DreamBooth prior preservation: class images from the service or drawn locally, cached by prompt and
seed, trained on beside a DreamBooth folder's subject; bad flags refused before any weights load."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_train import FAST, picture, write_dataset  # pytest puts tests/ on sys.path (no package)

from loraloop.cli import cli
from training.adapter_files import ADAPTER_FILE, read_provenance
from training.prior import CLASS_IMAGES_DIR
from training.train import Job, train, validate


@pytest.fixture(autouse=True)
def defaults_only(tmp_path, monkeypatch):
    """The CLI reads ./config.toml: run where there is none, so these tests see the shipped defaults."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALOOP_CONFIG", raising=False)


def dead_url() -> str:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def class_images(data_dir: Path) -> list[Path]:
    return sorted((data_dir / CLASS_IMAGES_DIR).rglob("*.png"))


def test_a_dreambooth_folder_trains_beside_class_images_drawn_locally_and_cached_for_the_next_run(
        tmp_path, tiny_model_dir):
    (tmp_path / "photos" / "sks_dog").mkdir(parents=True)
    for i in range(3):
        picture(tmp_path / "photos" / "sks_dog" / f"{i}.png", 60 * i, size=48)
    env = {"LORALOOP_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    imported = runner.invoke(cli, ["dataset", "import", str(tmp_path / "photos"), str(tmp_path / "rex"),
                                   "--resolution", "32", "--min-size", "32"], env=env)
    assert imported.exit_code == 0, imported.output
    rows = [json.loads(line) for line in (tmp_path / "rex" / "metadata.jsonl").read_text().splitlines()]
    assert rows and {row["text"] for row in rows} == {"sks dog"}

    def train_rex(output: str):
        return runner.invoke(cli, [
            "train", str(tmp_path / "rex"), "--name", "rex", "--model", str(tiny_model_dir), "--output",
            str(tmp_path / output), "--steps", "3", "--class-prompt", "a photo of a dog", "--prior-images", "2",
            "--service-url", dead_url(), "--set", "resolution=32", "--set", "log_with='none'",
            "--set", "validation_split=0.0", "--set", "prior_steps=2",
        ], env=env)

    first = train_rex("first")
    assert first.exit_code == 0, first.output
    assert "class images of 'a photo of a dog': 2 drawn (local), 0 from the cache" in first.output
    drawn = class_images(tmp_path / "data")
    assert [p.name for p in drawn] == ["42.png", "43.png"]  # seeds: [training] seed and the next
    assert {Image.open(p).size for p in drawn} == {(32, 32)}
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in report["history"])
    # Every subject photo and class image encoded once (and flipped), and the two captions.
    assert report["encode_cache"]["encoded"] == 2 * (len(rows) + 2) + 2
    provenance = read_provenance(tmp_path / "first" / ADAPTER_FILE)
    assert (provenance["class_prompt"], provenance["prior_images"], provenance["prior_loss_weight"]) == (
        "a photo of a dog", 2, 1.0)

    second = train_rex("second")
    assert second.exit_code == 0, second.output
    assert "class images of 'a photo of a dog': 0 drawn (cache), 2 from the cache" in second.output
    assert class_images(tmp_path / "data") == drawn


async def test_class_images_come_from_the_running_service_when_it_serves_the_same_model(
        tmp_path, tiny_model_dir, service):
    settings = dataclasses.replace(FAST, max_steps=2, validation_split=0.0, class_prompt="a photo of a dog",
                                   prior_images=2, prior_steps=2)
    job = Job(dataset=write_dataset(tmp_path / "ds", count=2), name="rex", model=str(tiny_model_dir),
              settings=settings, data_dir=tmp_path / "data", output=tmp_path / "run", service_url=service.url)
    report = await asyncio.to_thread(lambda: train(validate(job)))  # off the loop the service runs on
    assert report["prior"] == {"class_prompt": "a photo of a dog", "images": 2, "generated": 2, "reused": 0,
                               "source": "service"}
    for path in class_images(tmp_path / "data"):
        assert "parameters" in Image.open(path).info  # the service's PNG, with its A1111 parameters


async def test_a_service_running_another_model_is_not_asked_for_class_images(tmp_path, tiny_model_dir,
                                                                            tiny_sdxl_dir, make_service):
    other = await make_service(model=str(tiny_sdxl_dir))
    settings = dataclasses.replace(FAST, max_steps=1, validation_split=0.0, class_prompt="a photo of a dog",
                                   prior_images=1, prior_steps=2)
    job = Job(dataset=write_dataset(tmp_path / "ds", count=2), name="rex", model=str(tiny_model_dir),
              settings=settings, data_dir=tmp_path / "data", output=tmp_path / "run", service_url=other.url)
    report = await asyncio.to_thread(lambda: train(validate(job)))
    assert report["prior"]["source"] == "local"


@pytest.mark.parametrize(("flags", "message"), [
    (["--prior-images", "4"], "--prior-images needs --class-prompt"),
    (["--class-prompt", "a dog"], "--class-prompt needs --prior-images N"),
    (["--class-prompt", "a dog", "--prior-images", "4", "--objective", "kto"], "prior preservation is for sft"),
])
def test_prior_preservation_needs_a_class_prompt_a_count_and_sft(tmp_path, flags, message):
    dataset = write_dataset(tmp_path / "ds", count=4, kind="kto")
    result = CliRunner().invoke(cli, ["train", str(dataset), "--name", "rex", "--set", "log_with='none'", *flags],
                                env={"LORALOOP_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 1 and message in result.output, result.output
