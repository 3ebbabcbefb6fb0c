"""`loraloop compare`: prompts x adapters, labelled, one fixed seed per prompt."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_train import write_dataset  # pytest puts tests/ on sys.path (no package)

from loraloop.cli import cli
from loraloop.config import TrainingConfig
from training.compare import CompareError, read_prompts, resolve_columns
from training.train import Job, train, validate

LABEL_WIDTH, LABEL_HEIGHT, CELL = 160, 24, 32


@pytest.fixture(autouse=True)
def defaults_only(tmp_path, monkeypatch):
    """The CLI reads ./config.toml: run where there is none, so these tests see the shipped defaults."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALOOP_CONFIG", raising=False)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("compare")
    # A high learning rate so the adapter visibly changes a 2-step render.
    settings = TrainingConfig(resolution=32, rank=4, learning_rate=5e-2, max_steps=3, validation_split=0.0,
                              log_with="none")
    job = Job(dataset=write_dataset(root / "ds", count=4), name="disc", model=str(tiny_model_dir),
              settings=settings, data_dir=root / "data", output=root / "run")
    train(validate(job))
    return root / "run"


def cell(grid: Image.Image, row: int, column: int) -> np.ndarray:
    left, top = LABEL_WIDTH + column * CELL, LABEL_HEIGHT + row * CELL
    return np.asarray(grid.crop((left, top, left + CELL, top + CELL)))


def test_the_grid_has_a_row_per_prompt_a_column_per_adapter_and_fixed_seeds(
        tmp_path, adapter_run, tiny_model_dir, data_dir):
    published = data_dir / "adapters" / "disc"
    published.mkdir(parents=True)
    shutil.copyfile(adapter_run / "adapter.safetensors", published / "v1.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# what we compare\na yellow disc\n\na blue square\n")
    args = ["compare", "--adapters", "base,disc@1,base", "--prompts", str(prompts), "--steps", "2",
            "--size", "32", "--model", str(tiny_model_dir), "-o"]
    result = CliRunner().invoke(cli, [*args, str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    assert grid.size == (LABEL_WIDTH + 3 * CELL, LABEL_HEIGHT + 2 * CELL)
    for row in range(2):
        # Same seed in every column: base twice is identical, the adapter is the only difference.
        assert np.array_equal(cell(grid, row, 0), cell(grid, row, 2))
        assert not np.array_equal(cell(grid, row, 0), cell(grid, row, 1))
    again = CliRunner().invoke(cli, [*args, str(tmp_path / "again.png")])
    assert again.exit_code == 0
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(tmp_path / "again.png").convert("RGB")))


def test_an_unknown_adapter_fails_before_any_model_loads_and_lists_what_exists(tmp_path, data_dir):
    (data_dir / "adapters" / "disc").mkdir(parents=True)
    with pytest.raises(CompareError, match="Unknown adapter 'nope'"):
        resolve_columns("base,nope@2", data_dir / "adapters")


def test_a_run_directory_can_be_compared_before_it_is_published(adapter_run, data_dir):
    (base, run) = resolve_columns(f"base,{adapter_run}", data_dir / "adapters")
    assert base.path is None and run.path == adapter_run / "adapter.safetensors"


def test_a_prompts_file_without_prompts_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("# nothing\n\n")
    with pytest.raises(CompareError, match="no prompts"):
        read_prompts(tmp_path / "p.txt")
