"""`loraloop train` on SDXL: both text encoders, size conditioning in the cache, every objective,
resume, samples, the kohya copy under SGM names that diffusers loads back, and the service serving it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import FAST, picture, write_dataset  # pytest puts tests/ on sys.path (no package)

from loraloop.cli import cli
from loraloop.store import Store
from training.adapter_files import ADAPTER_FILE, KOHYA_FILE, read_provenance, sgm_module_path
from training.data import size_conditioning
from training.train import Job, train, validate


@pytest.fixture(autouse=True)
def defaults_only(tmp_path, monkeypatch):
    """The CLI reads ./config.toml: run where there is none, so these tests see the shipped defaults."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALOOP_CONFIG", raising=False)


def run(tmp_path: Path, model: Path, dataset: Path, output: str, **settings) -> dict:
    job = Job(dataset=dataset, name="disc", model=str(model), settings=dataclasses.replace(FAST, **settings),
              data_dir=tmp_path / "data", output=tmp_path / output)
    return train(validate(job))


def render(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return pipe("a yellow disc", height=32, width=32, num_inference_steps=3, generator=generator,
                output_type="pt").images


def cache_entries(data_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(path) for path in (data_dir / "cache" / "training").rglob("*.safetensors")]


def test_sdxl_trains_from_the_command_line_with_pooled_text_and_size_conditioning_cached_per_image(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=4)
    Image.open(dataset / "0.png").resize((48, 32)).save(dataset / "0.png")  # a landscape: cropped at the sides
    result = CliRunner().invoke(cli, [
        "train", str(dataset), "--name", "disc", "--model", "tiny-sdxl", "--output", str(tmp_path / "run"),
        "--steps", "4", "--set", "resolution=32", "--set", "log_with='none'", "--set", "validation_split=0.25",
        "--set", "validation_every=2", "--set", "validation_prompts=['a disc']", "--set", "sample_every=4",
        "--set", "sample_steps=2", "--set", "random_flip=false",
    ], env={"LORALOOP_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in report["history"])
    assert report["final_val_loss"] is not None and (tmp_path / "run" / "samples" / "step-000004.png").is_file()

    entries = cache_entries(tmp_path / "data")
    images = [e for e in entries if "mean" in e]
    captions = [e for e in entries if "embedding" in e]
    assert len(images) == 4 and len(captions) == 4
    # Each image carries its size conditioning; the landscape's says where the centre crop cut it.
    assert sorted(tuple(e["time_ids"].int().tolist()) for e in images) == [(32, 32, 0, 0, 32, 32)] * 3 + [
        (32, 48, 0, 8, 32, 32)]
    # Each caption: both encoders' 32-wide hidden states side by side, and the second one's pooled projection.
    assert {(tuple(e["embedding"].shape), tuple(e["pooled"].shape)) for e in captions} == {((77, 64), (32,))}

    assert read_provenance(tmp_path / "run" / ADAPTER_FILE)["base_model"] == "tiny-sdxl"
    with safe_open(str(tmp_path / "run" / KOHYA_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_size_conditioning_is_the_original_size_and_the_centre_crop_in_the_scaled_image(tmp_path):
    picture(tmp_path / "tall.png", 10, size=40)
    Image.open(tmp_path / "tall.png").resize((40, 100)).save(tmp_path / "tall.png")
    # Scaled to cover 32 px: 32 x 80, so the crop starts 24 px down.
    assert size_conditioning(tmp_path / "tall.png", 32) == (100, 40, 24, 0, 32, 32)


def test_sgm_names_are_the_ones_kohya_writes_for_sdxl():
    # SDXL's real layout: 2 layers per block, 3 rows per input level after conv_in, 3 per output level.
    assert sgm_module_path("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", 2) == (
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q")
    assert sgm_module_path("down_blocks.2.resnets.1.conv2", 2) == "input_blocks.8.0.out_layers.3"
    assert sgm_module_path("mid_block.attentions.0.proj_in", 2) == "middle_block.1.proj_in"
    assert sgm_module_path("mid_block.resnets.1.conv1", 2) == "middle_block.2.in_layers.2"
    assert sgm_module_path("up_blocks.0.attentions.2.proj_out", 2) == "output_blocks.2.1.proj_out"
    assert sgm_module_path("up_blocks.1.resnets.0.conv_shortcut", 2) == "output_blocks.3.0.skip_connection"
    with pytest.raises(ValueError, match="no SGM name"):
        sgm_module_path("conv_in", 2)


def test_the_sdxl_kohya_copy_has_sgm_keys_and_loads_in_diffusers_to_what_the_diffusers_file_gives(
        tmp_path, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    run(tmp_path, tiny_sdxl_dir, write_dataset(tmp_path / "ds", count=4), "run", max_steps=2, learning_rate=5e-2,
        targets=["attention", "proj", "resnet"], alpha=8.0)
    kohya = load_file(tmp_path / "run" / KOHYA_FILE)
    assert kohya and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                       "lora_unet_output_blocks_")) for k in kohya)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    images = []
    for name in (None, ADAPTER_FILE, KOHYA_FILE):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        pipe.set_progress_bar_config(disable=True)
        if name:
            pipe.load_lora_weights(str(tmp_path / "run"), weight_name=name)
        images.append(render(pipe))
    base, diffusers_file, kohya_file = images
    assert not torch.allclose(base, diffusers_file, atol=1e-3)
    # Every layer on every target kind arrived: the kohya copy renders what the diffusers file renders.
    assert torch.allclose(diffusers_file, kohya_file, atol=1e-5)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_sdxl_trains_with_the_preference_objectives(tmp_path, tiny_sdxl_dir, objective):
    report = run(tmp_path, tiny_sdxl_dir, write_dataset(tmp_path / "ds", count=4, kind=objective), "run",
                 objective=objective, max_steps=3, validation_every=3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in report["history"])
    assert report["history"][0]["implicit_acc"] == 0.5 and any(r["ref_gap"] != 0.0 for r in report["history"][1:])
    weights = load_file(tmp_path / "run" / ADAPTER_FILE)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_resuming_an_sdxl_run_equals_the_uninterrupted_one(tmp_path, tiny_sdxl_dir):
    dataset = write_dataset(tmp_path / "ds", count=4)
    settings = dict(caption_dropout=0.5, max_steps=4, checkpoint_every=2, validation_every=2)
    whole = run(tmp_path, tiny_sdxl_dir, dataset, "whole", **settings)
    job = Job(dataset=dataset, name="disc", model=str(tiny_sdxl_dir), settings=dataclasses.replace(FAST, **settings),
              data_dir=tmp_path / "data", output=tmp_path / "resumed",
              resume=tmp_path / "whole" / "checkpoints" / "step-000002")
    resumed = train(validate(job))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"]]
    a, b = load_file(tmp_path / "whole" / ADAPTER_FILE), load_file(tmp_path / "resumed" / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


async def test_a_published_sdxl_adapter_is_served_by_the_running_service(tmp_path, tiny_sdxl_dir, make_service,
                                                                        data_dir):
    from generation.client import ServiceClient
    from generation.contract import AdapterRef, JobRequest, JobState
    from training.publish import publish, tell_service

    run(tmp_path, tiny_sdxl_dir, write_dataset(tmp_path / "ds", count=4), "run", max_steps=2, learning_rate=5e-2)
    service = await make_service(model=str(tiny_sdxl_dir))
    with Store(data_dir / "loraloop.db", data_dir) as store:
        published = publish(tmp_path / "run", "disc", service.adapters_dir, store)
    assert await tell_service(service.url, None, published) == f"the service at {service.url} now serves disc@1"

    async def image(adapters: tuple) -> tuple[bytes, tuple]:
        accepted = await client.submit(JobRequest(prompt="a yellow disc", seed=3, width=64, height=64,
                                                  adapters=adapters))
        final = [s async for s in client.events(accepted.id)][-1]
        assert final.state == JobState.DONE, final
        return await client.image(accepted.id, 0), final.adapters

    async with ServiceClient(service.url) as client:
        base, _ = await image(())
        adapted, applied = await image((AdapterRef("disc"),))
    assert base != adapted
    assert [(a.name, a.version) for a in applied] == [("disc", 1)]
