"""`loraloop train`: SFT, DPO and KTO on the tiny model, adapters diffusers loads, exact resume, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from loraloop.cli import cli
from loraloop.config import TrainingConfig
from training.adapter_files import ADAPTER_FILE, KOHYA_FILE, base_model_family, read_provenance
from training.checkpoint import Interrupted
from training.dataset import DPO, dataset_hash, read_parquet, write_parquet
from training.train import Job, TrainError, train, validate

# Small and fast: 32 px images (16x16 latents), high learning rate so a few dozen steps show.
FAST = TrainingConfig(resolution=32, rank=4, alpha=8.0, learning_rate=1e-3, max_steps=6, validation_split=0.25,
                      validation_every=3, checkpoint_every=3, log_with="none", snr_gamma=0.0)


@pytest.fixture(autouse=True)
def defaults_only(tmp_path, monkeypatch):
    """The CLI reads ./config.toml: run where there is none, so these tests see the shipped defaults."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALOOP_CONFIG", raising=False)


def picture(path: Path, shade: int, size: int = 32) -> None:
    image = Image.new("RGB", (size, size), (shade, 40, 255 - shade))
    ImageDraw.Draw(image).ellipse([4, 4, size - 8, size - 8], fill=(250, 250, 30))
    image.save(path)


def write_dataset(root: Path, count: int = 8, kind: str = "sft", weights: dict[int, float] | None = None) -> Path:
    """`count` yellow discs as a `kind` dataset; `weights` gives some rows (by index) a loss weight."""
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for i in range(count):
        picture(root / f"{i}.png", 20 * i)
        if kind == "dpo":
            picture(root / f"{i}b.png", 255 - 20 * i)
            rows.append({"caption": f"a yellow disc {i}", "jpg_0": (root / f"{i}.png").read_bytes(),
                         "jpg_1": (root / f"{i}b.png").read_bytes(), "label_0": 1.0 if i % 2 else 0.0})
        else:
            row = {"file_name": f"{i}.png", "text": f"a yellow disc {i}"}
            if kind == "kto":
                row["label"] = i % 2 == 0
            rows.append(row)
    for index, weight in (weights or {}).items():
        rows[index]["weight"] = weight
    if kind == "dpo":
        write_parquet(root, DPO, rows)
        for image in root.glob("*.png"):  # the images live in the Parquet file, as curation writes them
            image.unlink()
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(tmp_path: Path, tiny_model_dir: Path, dataset: Path, output: str, **settings) -> dict:
    job = Job(dataset=dataset, name="disc", model=str(tiny_model_dir),
              settings=dataclasses.replace(FAST, **settings), data_dir=tmp_path / "data",
              output=tmp_path / output)
    return train(validate(job))


def test_a_few_dozen_steps_lower_the_validation_loss_and_write_report_curve_and_adapter(
        tmp_path, tiny_model_dir, data_dir):
    dataset = write_dataset(tmp_path / "ds")
    result = CliRunner().invoke(cli, [
        "train", str(dataset), "--name", "disc", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"),
        "--steps", "40", "--rank", "8", "--lr", "2e-3", "--set", "resolution=32", "--set", "validation_every=20",
        "--set", "log_with='none'", "--set", "validation_split=0.25", "--set", "checkpoint_every=10",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 40 and len(report["history"]) == 40
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in report["history"])
    assert report["final_val_loss"] < report["base_val_loss"]
    assert Image.open(tmp_path / "run" / "loss.png").size == (640, 400)
    # A checkpoint every 10 steps, the newest 3 kept (checkpoints_keep).
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000020", "step-000030", "step-000040"]
    provenance = read_provenance(tmp_path / "run" / ADAPTER_FILE)
    assert provenance["dataset_hash"] == report["dataset_hash"] == dataset_hash(dataset)  # as curation hashes it
    assert provenance["objective"] == "sft"
    assert provenance["rank"] == 8 and provenance["steps"] == 40
    assert provenance["final_val_loss"] == pytest.approx(report["final_val_loss"])
    assert "adapters publish" in result.output


def render(pipe, prompt: str = "a yellow disc") -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return pipe(prompt, height=32, width=32, num_inference_steps=3, generator=generator, output_type="pt").images


def test_the_adapter_loads_in_diffusers_changes_the_output_and_keeps_alpha(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, set_peft_model_state_dict

    run(tmp_path, tiny_model_dir, write_dataset(tmp_path / "ds"), "run", rank=4, alpha=16.0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(str(tmp_path / "run"), weight_name=ADAPTER_FILE)
    loaded = render(pipe)
    assert not torch.equal(base, loaded)

    # The same weights put in by hand with alpha 16 / rank 4: diffusers must have read alpha from the file.
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000006" / "state.pt", weights_only=False)
    by_hand = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    by_hand.set_progress_bar_config(disable=True)
    by_hand.unet.add_adapter(LoraConfig(r=4, lora_alpha=16.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    set_peft_model_state_dict(by_hand.unet, state["lora"])
    assert torch.allclose(render(by_hand), loaded, atol=1e-5)


def test_an_adapter_on_attention_proj_and_resnet_layers_loads_whole_in_diffusers(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, set_peft_model_state_dict

    from training.train import TARGET_MODULES

    targets = ["attention", "proj", "resnet"]
    run(tmp_path, tiny_model_dir, write_dataset(tmp_path / "ds"), "run", rank=4, alpha=8.0, targets=targets)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "run"), weight_name=ADAPTER_FILE)

    # Every trained layer, attention included, must be in what diffusers loaded.
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000006" / "state.pt", weights_only=False)
    by_hand = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    by_hand.set_progress_bar_config(disable=True)
    by_hand.unet.add_adapter(LoraConfig(r=4, lora_alpha=8.0,
                                        target_modules=[m for t in targets for m in TARGET_MODULES[t]]))
    set_peft_model_state_dict(by_hand.unet, state["lora"])
    assert torch.allclose(render(by_hand), render(pipe), atol=1e-5)


def a1111_data_hash(path: Path) -> str:
    """A1111's hash of a LoRA file, by its rule: the sha256 of the bytes after the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_the_kohya_copy_is_always_written_with_a1111_keys_the_real_alpha_and_kohya_metadata(tmp_path, tiny_model_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file

    run(tmp_path, tiny_model_dir, write_dataset(tmp_path / "ds"), "run", max_steps=1, learning_rate=5e-2)
    kohya = load_file(tmp_path / "run" / "adapter.kohya.safetensors")
    assert kohya and all(key.startswith("lora_unet_") for key in kohya)
    alphas = [value.item() for key, value in kohya.items() if key.endswith(".alpha")]
    assert alphas and set(alphas) == {8.0}
    with safe_open(str(tmp_path / "run" / "adapter.kohya.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_output_name"] == "disc"
    assert (metadata["ss_network_dim"], float(metadata["ss_network_alpha"])) == ("4", 8.0)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"

    # What an A1111/ComfyUI user gets is what the diffusers file gives (alpha 8 on rank 4 included).
    from diffusers import StableDiffusionPipeline

    images = []
    for name in ("adapter.safetensors", "adapter.kohya.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(tmp_path / "run"), weight_name=name)
        images.append(render(pipe))
    assert torch.allclose(images[0], images[1], atol=1e-5)


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    dataset = write_dataset(tmp_path / "ds")
    # Cosine schedule, dropout, flips and caption dropout: everything random must be restored.
    settings = dict(lr_scheduler="cosine", warmup_steps=2, dropout=0.1, caption_dropout=0.3, grad_accumulation=2,
                    noise_offset=0.05, snr_gamma=5.0, trigger_word="sks")
    whole = run(tmp_path, tiny_model_dir, dataset, "whole", **settings)
    job = Job(dataset=dataset, name="disc", model=str(tiny_model_dir),
              settings=dataclasses.replace(FAST, **settings), data_dir=tmp_path / "data",
              output=tmp_path / "resumed", resume=tmp_path / "whole" / "checkpoints" / "step-000003")
    resumed = train(validate(job))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"]]
    a = load_file(tmp_path / "whole" / ADAPTER_FILE)
    b = load_file(tmp_path / "resumed" / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "ds")
    job = Job(dataset=dataset, name="disc", model=str(tiny_model_dir), settings=dataclasses.replace(FAST, max_steps=4),
              data_dir=tmp_path / "data", output=tmp_path / "run")

    def press_ctrl_c(progress):
        if progress.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as interrupted:
        train(validate(job), on_step=press_ctrl_c)
    assert interrupted.value.checkpoint.name == "step-000002"
    report = train(validate(dataclasses.replace(job, resume=tmp_path / "run")))
    assert report["steps"] == 4 and len(report["history"]) == 4


def test_ctrl_c_in_the_middle_of_a_step_rolls_back_to_its_start_so_resume_is_exact(
        tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    import training.train as train_module

    dataset = write_dataset(tmp_path / "ds")
    settings = dataclasses.replace(FAST, max_steps=4, grad_accumulation=2, dropout=0.1, checkpoint_every=100)
    job = Job(dataset=dataset, name="disc", model=str(tiny_model_dir), settings=settings,
              data_dir=tmp_path / "data", output=tmp_path / "interrupted")
    whole = train(validate(dataclasses.replace(job, output=tmp_path / "whole")))

    real_loss, calls = train_module.micro_batch_loss, []

    def ctrl_c_after_the_fifth_micro_batch(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        calls.append(kwargs["training"])
        if calls.count(True) == 5:  # first micro-batch of step 3: noise drawn, no update yet
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(train_module, "micro_batch_loss", ctrl_c_after_the_fifth_micro_batch)
    with pytest.raises(Interrupted) as interrupted:
        train(validate(job))
    monkeypatch.setattr(train_module, "micro_batch_loss", real_loss)
    assert interrupted.value.checkpoint.name == "step-000002"
    resumed = train(validate(dataclasses.replace(job, resume=tmp_path / "interrupted")))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"]]
    a, b = load_file(tmp_path / "whole" / ADAPTER_FILE), load_file(tmp_path / "interrupted" / ADAPTER_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_different_settings_is_refused_before_loading(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "ds")
    run(tmp_path, tiny_model_dir, dataset, "run", max_steps=3)
    job = Job(dataset=dataset, name="disc", model=str(tiny_model_dir),
              settings=dataclasses.replace(FAST, rank=8), data_dir=tmp_path / "data", resume=tmp_path / "run")
    with pytest.raises(TrainError, match=r"different settings \(rank: 4 -> 8\)"):
        validate(job)


def test_a_retrain_encodes_only_the_new_images(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "ds", count=4)
    first = run(tmp_path, tiny_model_dir, dataset, "first", max_steps=1, random_flip=False, validation_split=0.0)
    picture(dataset / "new.png", 99)
    with (dataset / "metadata.jsonl").open("a") as handle:
        handle.write(json.dumps({"file_name": "new.png", "text": "a new disc"}) + "\n")
    second = run(tmp_path, tiny_model_dir, dataset, "second", max_steps=1, random_flip=False, validation_split=0.0)
    assert first["encode_cache"] == {"encoded": 8, "reused": 0}  # 4 latents + 4 captions
    assert second["encode_cache"] == {"encoded": 2, "reused": 8}
    assert first["dataset_hash"] != second["dataset_hash"]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_objectives_change_the_adapter_and_log_their_metrics(tmp_path, tiny_model_dir, objective):
    from safetensors.torch import load_file

    dataset = write_dataset(tmp_path / "ds", kind=objective)
    report = run(tmp_path, tiny_model_dir, dataset, "run", objective=objective, max_steps=4, validation_every=2)
    for record in report["history"]:
        assert 0.0 <= record["implicit_acc"] <= 1.0 and "ref_gap" in record
    # The adapter starts as the reference (B = 0): a coin flip, and then it moves away from it.
    assert report["history"][0]["implicit_acc"] == 0.5 and report["history"][0]["ref_gap"] == 0.0
    assert any(r["ref_gap"] != 0.0 for r in report["history"][1:])
    assert "val_implicit_acc" in report["validation"][-1]
    weights = load_file(tmp_path / "run" / ADAPTER_FILE)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    assert read_provenance(tmp_path / "run" / ADAPTER_FILE)["objective"] == objective


def test_early_stopping_keeps_the_best_adapter(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    # A learning rate this high makes the validation loss worse, so it stops after `patience` evaluations.
    report = run(tmp_path, tiny_model_dir, write_dataset(tmp_path / "ds"), "run", learning_rate=0.5, max_steps=30,
                 validation_every=1, early_stopping_patience=2)
    assert report["stopped_early"] and report["steps"] < 30
    assert report["adapter_step"] == report["best_step"]
    for name in (ADAPTER_FILE, KOHYA_FILE):  # both files are the best step's, never one of each
        best = load_file(tmp_path / "run" / "best" / name)
        final = load_file(tmp_path / "run" / name)
        assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)


def test_every_adapter_file_a_run_writes_carries_a1111s_hash_of_itself(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    run(tmp_path, tiny_model_dir, write_dataset(tmp_path / "ds"), "run", max_steps=3, validation_every=1)
    files = [*(tmp_path / "run").rglob("*.safetensors")]
    assert {f.parent.name for f in files} == {"run", "best", "step-000003"} and len(files) == 6
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            assert handle.metadata()["sshs_model_hash"] == a1111_data_hash(file), file


@pytest.mark.parametrize(("unet_config", "version", "architecture"), [
    ({"cross_attention_dim": 768, "sample_size": 64}, "sd_v1", "stable-diffusion-v1"),
    ({"cross_attention_dim": 1024, "sample_size": 64}, "sd_v2", "stable-diffusion-v2-512"),
    ({"cross_attention_dim": 1024, "sample_size": 96}, "sd_v2_v", "stable-diffusion-v2-768-v"),
    ({"cross_attention_dim": 2048, "sample_size": 128, "addition_embed_type": "text_time"}, "sdxl_base_v1-0",
     "stable-diffusion-xl-v1-base"),
])
def test_the_kohya_metadata_names_sd1_sd2_and_sdxl_as_kohya_does(unet_config, version, architecture):
    family = base_model_family(unet_config)
    assert (family.ss_base_model_version, family.architecture) == (version, architecture)
    assert family.ss_v2 == version.startswith("sd_v2")


def test_validation_prompts_are_rendered_to_a_grid(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, write_dataset(tmp_path / "ds"), "run", max_steps=2, sample_every=2, sample_steps=2,
        validation_prompts=["a disc", "a square"])
    grid = Image.open(tmp_path / "run" / "samples" / "step-000002.png")
    assert grid.width > 2 * 32


# --- bad input: each one a clear error before any weights load ---------------------------------


def invoke_train(tmp_path: Path, *args: str):
    return CliRunner().invoke(cli, ["train", *args, "--set", "log_with='none'"],
                              env={"LORALOOP_DATA_DIR": str(tmp_path / "data")})


def test_a_missing_dataset_is_a_clear_error(tmp_path):
    result = invoke_train(tmp_path, str(tmp_path / "nope"), "--name", "x")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_an_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "metadata.jsonl").write_text("")
    result = invoke_train(tmp_path, str(tmp_path / "ds"), "--name", "x")
    assert result.exit_code == 1 and "is empty" in result.output


def test_missing_columns_name_the_line_and_the_columns(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2)
    result = invoke_train(tmp_path, str(dataset), "--name", "x", "--objective", "kto")
    assert result.exit_code == 1 and "metadata.jsonl:1: missing column(s) label" in result.output


def test_an_unreadable_image_is_named(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2)
    (dataset / "1.png").write_bytes(b"not a png")
    result = invoke_train(tmp_path, str(dataset), "--name", "x")
    assert result.exit_code == 1 and "image 1.png is unreadable" in result.output


def test_a_base_model_path_that_does_not_exist_is_a_clear_error(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2)
    result = invoke_train(tmp_path, str(dataset), "--name", "x", "--model", str(tmp_path / "no-model"))
    assert result.exit_code == 1 and "does not exist" in result.output


def test_an_invalid_adapter_name_is_refused(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2)
    result = invoke_train(tmp_path, str(dataset), "--name", "../evil")
    assert result.exit_code == 1 and "adapter name '../evil' is not valid" in result.output


def test_a_dpo_run_with_only_ties_is_refused(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2, kind="dpo")
    write_parquet(dataset, DPO, [dict(row.values, label_0=0.5) for row in list(read_parquet(dataset, DPO))])
    result = invoke_train(tmp_path, str(dataset), "--name", "x", "--objective", "dpo")
    assert result.exit_code == 1 and "no preference pairs" in result.output and "2 tie(s) dropped" in result.output


def test_a_dpo_parquet_dataset_reads_into_preferred_and_rejected_image_files(tmp_path):
    from training.data import load_dataset

    dataset = write_dataset(tmp_path / "ds", count=3, kind="dpo")
    loaded = load_dataset(dataset, "dpo", image_cache=tmp_path / "cache")
    rows = [row.values for row in read_parquet(dataset, DPO)]
    assert loaded.content_hash == dataset_hash(dataset)
    for example, row in zip(loaded.examples, rows, strict=True):
        preferred, rejected = (row["jpg_0"], row["jpg_1"]) if row["label_0"] > 0.5 else (row["jpg_1"], row["jpg_0"])
        assert (example.image.read_bytes(), example.rejected.read_bytes()) == (preferred, rejected)
        assert example.caption == row["caption"]


def test_an_unknown_set_key_is_refused(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2)
    result = invoke_train(tmp_path, str(dataset), "--name", "x", "--set", "rnak=3")
    assert result.exit_code == 1 and "rnak: unknown [training] key" in result.output


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    dataset = write_dataset(tmp_path / "ds", count=4)
    run(tmp_path, tiny_model_dir, dataset, "plain", max_steps=2)
    run(tmp_path, tiny_model_dir, dataset, "checkpointed", max_steps=2, gradient_checkpointing=True)
    plain = load_file(tmp_path / "plain" / ADAPTER_FILE)
    checkpointed = load_file(tmp_path / "checkpointed" / ADAPTER_FILE)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
    assert any(v.abs().sum() > 0 for k, v in checkpointed.items() if k.endswith("lora_B.weight"))


def test_a_tracker_that_is_not_installed_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    dataset = write_dataset(tmp_path / "ds", count=2)
    result = CliRunner().invoke(cli, ["train", str(dataset), "--name", "x", "--set", "log_with='wandb'"],
                                env={"LORALOOP_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 1 and "pip install wandb" in result.output


def test_an_sdxl_model_without_its_second_text_encoder_is_refused_before_loading(tmp_path, tiny_model_dir):
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "xl"))
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    result = invoke_train(tmp_path, str(write_dataset(tmp_path / "ds", count=2)), "--name", "x", "--model", str(model))
    assert result.exit_code == 1 and "is an SDXL model without both text encoders (a refiner?)" in result.output


def test_a_resume_path_without_a_checkpoint_or_with_a_foreign_file_is_a_clear_error(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2)
    (tmp_path / "empty").mkdir()
    result = invoke_train(tmp_path, str(dataset), "--name", "x", "--resume", str(tmp_path / "empty"))
    assert result.exit_code == 1 and "no checkpoint there" in result.output
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "state.pt").write_bytes(b"definitely not a checkpoint")
    result = invoke_train(tmp_path, str(dataset), "--name", "x", "--resume", str(tmp_path / "foreign"))
    assert result.exit_code == 1 and "is not a loraloop checkpoint" in result.output


def test_uncaptioned_images_are_a_warning_that_says_how_to_caption_them(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "ds", count=3)
    rows = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = ""
    (dataset / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = Job(dataset=dataset, name="disc", model=str(tiny_model_dir), settings=FAST, data_dir=tmp_path / "data")
    (warning,) = validate(job).warnings
    assert warning.startswith("1 of 3 images have no caption") and "loraloop dataset caption" in warning


def test_epochs_set_the_steps_and_each_epoch_sees_every_example_once(tmp_path, tiny_model_dir):
    from training.train import batch_indices

    dataset = write_dataset(tmp_path / "ds", count=8)
    settings = dataclasses.replace(FAST, epochs=3, batch_size=3, grad_accumulation=2, validation_split=0.25)
    plan = validate(Job(dataset=dataset, name="disc", model=str(tiny_model_dir), settings=settings,
                        data_dir=tmp_path / "data"), processes=1)
    # 6 training examples in batches of 3: 2 micro-batches an epoch, 6 in 3 epochs, 3 steps of 2.
    assert len(plan.train) == 6 and plan.total_steps == 3
    for epoch in range(3):
        seen = [i for m in (2 * epoch, 2 * epoch + 1) for i in batch_indices(m, 6, 3, seed=1, processes=1, rank=0)]
        assert sorted(seen) == list(range(6))
    # Two processes split each epoch between them.
    halves = [batch_indices(0, 6, 3, seed=1, processes=2, rank=r) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(6))


def test_a_resume_from_a_state_pt_that_is_not_a_checkpoint_says_what_is_wrong_in_one_sentence(tmp_path):
    import torch

    from training.checkpoint import STATE_TYPES, state_problem

    dataset = write_dataset(tmp_path / "ds", count=2)
    cases = {
        "a-list": ([1, 2, 3], "it holds a list, not a dict"),
        "missing-keys": ({"step": 3, "settings": {}}, "missing progress, lora"),
        "wrong-type": ({**{key: {} for key in STATE_TYPES}, "step": "3"}, "step is a str"),
    }
    for name, (state, words) in cases.items():
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / "state.pt")
        result = invoke_train(tmp_path, str(dataset), "--name", "x", "--resume", str(tmp_path / name))
        assert result.exit_code == 1, (name, result.output)
        assert "is not a loraloop checkpoint" in result.output and words in result.output, (name, result.output)
        assert "Traceback" not in result.output and result.output.strip().splitlines()[-1].startswith("Error: --resume")
    well_typed = {"step": 1, "progress": {"step": 1}, "lora": {}, "optimizer": {}, "lr_scheduler": {},
                  "generator": torch.zeros(1), "torch_rng": torch.zeros(1), "cuda_rng": None, "python_rng": (),
                  "numpy_rng": [], "processes": 1, "settings": {}, "dataset_hash": "", "base_model": ""}
    assert state_problem(well_typed) is None
    assert state_problem({**well_typed, "progress": {"step": 1, "mood": 2}}) == "its progress has unknown fields mood"


@pytest.mark.parametrize("objective", ["sft", "kto", "dpo"])
def test_per_example_weights_from_the_dataset_scale_each_examples_share_of_the_loss(tmp_path, objective):
    from training import objectives
    from training.data import load_dataset

    dataset = write_dataset(tmp_path / "ds", count=4, kind=objective, weights={0: 0.0})
    assert [e.weight for e in load_dataset(dataset, objective, tmp_path / "cache").examples] == [0.0, 1.0, 1.0, 1.0]

    # A weight of 0 leaves an example out of the loss; the others keep theirs.
    errors = torch.tensor([9.0, 1.0, 2.0, 3.0])
    weights = torch.tensor([0.0, 1.0, 1.0, 1.0])
    if objective == "sft":
        loss, _ = objectives.sft(errors, weights)
        assert loss.item() == pytest.approx((1.0 + 2.0 + 3.0) / 4)
    elif objective == "dpo":
        reference = torch.full((4,), 2.0)
        loss, _ = objectives.dpo(errors, errors.flip(0), reference, reference, 1.0, weights)
        full, _ = objectives.dpo(errors[1:], errors.flip(0)[1:], reference[1:], reference[1:], 1.0)
        assert loss.item() == pytest.approx(full.item() * 3 / 4)
    else:
        desirable = torch.tensor([True, True, False, True])
        loss, _, _ = objectives.kto(errors, torch.full((4,), 2.0), desirable, 1.0, 0.0, weights)
        unweighted, _, _ = objectives.kto(errors, torch.full((4,), 2.0), desirable, 1.0, 0.0)
        assert loss.item() < unweighted.item()


def test_a_negative_weight_is_refused_with_the_line(tmp_path):
    dataset = write_dataset(tmp_path / "ds", count=2)
    rows = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    rows[1]["weight"] = -1
    (dataset / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke_train(tmp_path, str(dataset), "--name", "x")
    assert result.exit_code == 1 and "metadata.jsonl:2: weight must be a number of 0 or more" in result.output


def test_the_speed_options_change_no_number_of_the_loss_curve_or_the_adapter(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from training import speed

    dataset = write_dataset(tmp_path / "ds", count=4)
    settings = dataclasses.replace(FAST, max_steps=4, dropout=0.1)
    reports = {}
    for name, options in (("plain", speed.PLAIN), ("fast", speed.FAST)):
        job = Job(dataset=dataset, name="disc", model=str(tiny_model_dir), settings=settings,
                  data_dir=tmp_path / "data", output=tmp_path / name)
        reports[name] = train(validate(job), speed=options)
    plain_curve = [(r["loss"], r.get("val_loss")) for r in reports["plain"]["history"]]
    assert [(r["loss"], r.get("val_loss")) for r in reports["fast"]["history"]] == plain_curve
    plain, fast = load_file(tmp_path / "plain" / ADAPTER_FILE), load_file(tmp_path / "fast" / ADAPTER_FILE)
    assert plain.keys() == fast.keys() and all(torch.equal(plain[k], fast[k]) for k in plain)


def test_an_uncached_run_encodes_whole_batches_and_follows_the_cached_run_to_float_rounding(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "ds", count=4)
    # The cache encodes one image at a time, an uncached step its whole batch in one VAE call.
    cached = run(tmp_path, tiny_model_dir, dataset, "cached", max_steps=3, batch_size=4, validation_split=0.0)
    uncached = run(tmp_path, tiny_model_dir, dataset, "uncached", max_steps=3, batch_size=4, validation_split=0.0,
                   cache_latents=False)
    assert uncached["encode_cache"] == {"encoded": 0, "reused": 0}
    assert torch.allclose(torch.tensor([r["loss"] for r in uncached["history"]]),
                          torch.tensor([r["loss"] for r in cached["history"]]), rtol=1e-4)
