"""`loraloop adapters publish|list`: versioned, atomic copies into the adapters directory, recorded in the store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_train import write_dataset  # pytest puts tests/ on sys.path (no package)

from loraloop.cli import cli
from loraloop.config import TrainingConfig
from loraloop.store import Store
from training.publish import PublishError, publish, refresh_a1111_alias, tell_service
from training.train import Job, train, validate


@pytest.fixture(autouse=True)
def defaults_only(tmp_path, monkeypatch):
    """The CLI reads ./config.toml: run where there is none, so these tests see the shipped defaults."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALOOP_CONFIG", raising=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One finished tiny training run, shared read-only by the tests here."""
    root = tmp_path_factory.mktemp("publish")
    # A high learning rate so even 2 steps change what the service renders.
    settings = TrainingConfig(resolution=32, rank=4, learning_rate=5e-2, max_steps=2, validation_split=0.25,
                              validation_every=1, checkpoint_every=1, log_with="none")
    job = Job(dataset=write_dataset(root / "ds", count=4), name="disc", model=str(tiny_model_dir),
              settings=settings, data_dir=root / "data", output=root / "run")
    train(validate(job))
    return root / "run"


def copy_run(run: Path, where: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, where))


def test_publishing_twice_makes_two_versions_recorded_with_their_training_run(tmp_path, trained_run, data_dir):
    run = copy_run(trained_run, tmp_path / "run")
    with Store(data_dir / "loraloop.db", data_dir) as store:
        first = publish(run, "disc", data_dir / "adapters", store)
        second = publish(run, "disc", data_dir / "adapters", store)
        assert (first.version, second.version) == (1, 2)
        published = data_dir / "adapters" / "disc" / "v2.safetensors"
        assert published.read_bytes() == (run / "adapter.safetensors").read_bytes()
        assert [a.version for a in store.adapters("disc")] == [1, 2]
        # The same run published twice is one training run with two versions.
        assert first.training_run_id == second.training_run_id
        recorded = store.training_run(first.training_run_id)
        report = json.loads((run / "report.json").read_text())
        assert recorded.dataset_hash == report["dataset_hash"] and recorded.status == "done"
        assert recorded.metrics["final_val_loss"] == pytest.approx(report["final_val_loss"])
    assert not list((data_dir / "adapters" / "disc").glob(".*")), "no temp file is left behind"


def test_a_version_already_on_disk_is_never_overwritten(tmp_path, trained_run, data_dir):
    folder = data_dir / "adapters" / "disc"
    folder.mkdir(parents=True)
    (folder / "v3.safetensors").write_bytes(b"someone else's file")
    with Store(data_dir / "loraloop.db", data_dir) as store:
        published = publish(copy_run(trained_run, tmp_path / "run"), "disc", data_dir / "adapters", store)
    assert published.version == 4 and (folder / "v3.safetensors").read_bytes() == b"someone else's file"


def test_an_invalid_name_or_an_unfinished_run_publishes_nothing(tmp_path, trained_run, data_dir):
    run = copy_run(trained_run, tmp_path / "run")
    with Store(data_dir / "loraloop.db", data_dir) as store:
        with pytest.raises(PublishError, match="not valid"):
            publish(run, "../up", data_dir / "adapters", store)
        (run / "adapter.safetensors").unlink()
        with pytest.raises(PublishError, match="did not finish"):
            publish(run, "disc", data_dir / "adapters", store)
        assert store.adapters() == []
    assert not (data_dir / "adapters" / "disc").exists() or not any((data_dir / "adapters" / "disc").iterdir())


def test_the_cli_publishes_and_lists_with_the_run_metrics(tmp_path, trained_run, data_dir):
    run = copy_run(trained_run, tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(cli, ["adapters", "publish", str(run), "--name", "disc"])
    assert result.exit_code == 0, result.output
    assert "published disc@1" in result.output
    listed = runner.invoke(cli, ["adapters", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = [json.loads(line) for line in listed.output.splitlines() if line.startswith("{")]
    assert row["label"] == "disc@1" and row["latest"] and row["training_run_id"] == 1
    assert row["metrics"]["steps"] == 2 and "sft LoRA" in row["description"]
    text = runner.invoke(cli, ["adapters", "list"])
    assert "disc@1" in text.output and "latest" in text.output


def test_published_versions_are_laid_out_for_a1111_named_as_the_service_names_them(tmp_path, trained_run, data_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file

    run = copy_run(trained_run, tmp_path / "run")
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(cli, ["adapters", "publish", str(run), "--name", "disc"])
        assert result.exit_code == 0, result.output
    folder = data_dir / "adapters-a1111"
    assert str(folder / "disc@2.safetensors") in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["disc.safetensors", "disc@1.safetensors", "disc@2.safetensors"]
    kohya = load_file(run / "adapter.kohya.safetensors")
    for file in folder.iterdir():
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
        # A1111 lists a LoRA under its ss_output_name: each file's is its own stem, so <lora:disc@1:1> and
        # <lora:disc:1> each resolve to one file.
        assert metadata["ss_output_name"] == file.stem
        assert metadata["ss_network_dim"] == "4" and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
        # Only the header changed: A1111's hash of the file is still the one recorded in it.
        data = file.read_bytes()
        after_header = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
        assert metadata["sshs_model_hash"] == after_header
        tensors = load_file(file)
        assert tensors.keys() == kohya.keys() and all(torch.equal(tensors[k], kohya[k]) for k in kohya)


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_a1111s_plain_name_follows_the_default_version_once_a_candidate_is_promoted(tmp_path, trained_run, data_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    first, second = copy_run(trained_run, tmp_path / "first"), copy_run(trained_run, tmp_path / "second")
    kohya = second / "adapter.kohya.safetensors"
    with safe_open(str(kohya), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "sshs_model_hash"}
    save_file({k: v * 2 for k, v in load_file(kohya).items()}, kohya, metadata=metadata)  # another adapter
    folder = data_dir / "adapters-a1111"
    alias = folder / "disc.safetensors"
    with Store(data_dir / "loraloop.db", data_dir) as store:
        publish(first, "disc", data_dir / "adapters", store, folder)
        publish(second, "disc", data_dir / "adapters", store, folder, experiment={"control_version": 1, "share": 0.5})
        assert refresh_a1111_alias(store, "disc", folder) is None  # v1 is still what people get
        assert same_tensors(alias, folder / "disc@1.safetensors")
        (experiment,) = store.experiments(status="running")
        store.decide_experiment(experiment.id, decision="promote", reason="better", decided_by="admin", figures={})
        assert refresh_a1111_alias(store, "disc", folder) == alias
        assert refresh_a1111_alias(store, "disc", folder) is None  # already right: not rewritten each pass
    assert same_tensors(alias, folder / "disc@2.safetensors")
    with safe_open(str(alias), framework="pt") as handle:
        assert handle.metadata()["ss_output_name"] == "disc"


def test_a_checkpoint_can_be_published_with_the_provenance_in_its_adapter(tmp_path, trained_run, data_dir):
    run = copy_run(trained_run, tmp_path / "run")
    with Store(data_dir / "loraloop.db", data_dir) as store:
        published = publish(run / "checkpoints" / "step-000001", "disc", data_dir / "adapters", store)
        recorded = store.training_run(published.training_run_id)
    report = json.loads((run / "report.json").read_text())
    assert published.version == 1 and recorded.dataset_hash == report["dataset_hash"]
    assert recorded.metrics["steps"] == 1 and recorded.config["objective"] == "sft"


def test_listing_adapters_reads_their_files_without_importing_torch(tmp_path, trained_run, data_dir):
    import os
    import subprocess
    import sys

    runner = CliRunner()
    assert runner.invoke(cli, ["adapters", "publish", str(copy_run(trained_run, tmp_path / "run")),
                               "--name", "disc"]).exit_code == 0
    probe = ("import sys; from click.testing import CliRunner; from loraloop.cli import cli; "
             "result = CliRunner().invoke(cli, ['adapters', 'list']); "
             "print('disc@1' in result.output, 'torch' in sys.modules)")
    # A fresh interpreter: this test process imported torch long ago.
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LORALOOP_DATA_DIR": str(data_dir)}, check=True)
    assert answer.stdout.split() == ["True", "False"], answer.stderr


def test_listing_an_empty_directory_says_how_to_publish(data_dir):
    result = CliRunner().invoke(cli, ["adapters", "list"])
    assert result.exit_code == 0 and "adapters publish" in result.output


def test_a_trained_adapter_is_accepted_by_the_service_adapter_scan(tmp_path, trained_run, data_dir):
    from generation.adapters import AdapterDirectory

    with Store(data_dir / "loraloop.db", data_dir) as store:
        publish(copy_run(trained_run, tmp_path / "run"), "disc", data_dir / "adapters", store)
    (file,) = AdapterDirectory(data_dir / "adapters").scan().files()
    assert file.label == "disc@1" and file.base_model.endswith("tiny")


async def render(client, adapters: tuple) -> bytes:
    from generation.contract import JobRequest, JobState

    accepted = await client.submit(JobRequest(prompt="a yellow disc", seed=3, adapters=adapters))
    final = [s async for s in client.events(accepted.id)][-1]
    assert final.state == JobState.DONE, final
    return await client.image(accepted.id, 0)


async def test_publishing_makes_the_running_service_serve_the_new_version(tmp_path, trained_run, service, data_dir):
    from generation.client import ServiceClient
    from generation.contract import AdapterRef

    with Store(data_dir / "loraloop.db", data_dir) as store:
        published = publish(copy_run(trained_run, tmp_path / "run"), "disc", service.adapters_dir, store)
    assert await tell_service(service.url, None, published) == f"the service at {service.url} now serves disc@1"
    async with ServiceClient(service.url) as client:
        assert [(a.name, a.version) for a in await client.adapters()] == [("disc", 1)]
        base = await render(client, ())
        adapted = await render(client, (AdapterRef("disc@1"),))
    assert base != adapted


def test_publishing_while_the_service_is_down_says_it_loads_at_start(tmp_path, trained_run, data_dir,
                                                                    tiny_model_dir):
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(cli, ["adapters", "publish", str(copy_run(trained_run, tmp_path / "run")),
                                      "--name", "disc", "--service-url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    assert "is not running; it will load disc@1 when it starts" in result.output
    # Trained on the tiny model directory, while [service] model is "tiny" by name: worth a warning.
    assert f"was trained on {tiny_model_dir}, but [service] model is tiny" in result.output
