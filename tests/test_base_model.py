"""`[training] resolution = "auto"`: the base model's native size, for training and for `dataset import`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from test_train import FAST, write_dataset

from loraloop.cli import cli
from loraloop.config import TrainingConfig
from training.base_model import BaseModelError, native_resolution, resolve_resolution
from training.train import Job, validate


def diffusers_folder(root: Path, sample_size: int, vae_blocks: int) -> Path:
    """A model folder with only the two config files the native size is read from."""
    for part, config in (("unet", {"sample_size": sample_size}), ("vae", {"block_out_channels": [128] * vae_blocks})):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize(("sample_size", "native"), [(64, 512), (96, 768), (128, 1024)], ids=["sd15", "sd21v", "sdxl"])
def test_the_native_size_is_the_vae_scale_times_the_unet_sample_size(tmp_path, sample_size, native):
    assert native_resolution(str(diffusers_folder(tmp_path / "model", sample_size, vae_blocks=4))) == native


def test_the_tiny_model_is_64_px_by_name_and_by_its_files(tiny_model_dir):
    assert native_resolution("tiny") == native_resolution(str(tiny_model_dir)) == 64
    assert TrainingConfig().resolution == "auto"
    assert resolve_resolution(512, "tiny") == 512


def test_a_single_file_checkpoint_asks_for_a_resolution(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(BaseModelError, match=r"single-file checkpoint.*set \[training\] resolution"):
        native_resolution(str(checkpoint))


def test_training_at_the_default_resolution_trains_at_the_models_native_size(tmp_path, tiny_model_dir):
    settings = dataclasses.replace(FAST, resolution="auto")
    plan = validate(Job(dataset=write_dataset(tmp_path / "ds", count=2), name="disc", model=str(tiny_model_dir),
                        settings=settings, data_dir=tmp_path / "data"))
    assert plan.job.settings.resolution == 64 and plan.identity.settings["resolution"] == 64


def test_dataset_import_resizes_to_the_configured_models_native_size(tmp_path):
    src = tmp_path / "pictures"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (320, 280), (40 * i, 90, 200)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"a blue square {i}")
    config = tmp_path / "config.toml"
    config.write_text('[service]\nmodel = "tiny"\n\n[dataset]\nimport_workers = 1\n')
    result = CliRunner().invoke(cli, ["--config", str(config), "dataset", "import", "--no-progress",
                                      str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    sizes = {Image.open(path).size for path in (tmp_path / "out").glob("*.png")}
    assert sizes == {(64, 64)}
