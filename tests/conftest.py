"""Shared fixtures: tiny Stable Diffusion models (SD 1.x, SDXL) built once per run, and a private data dir.

Nothing here touches the network: the model is built from small configs with random
weights, saved with `save_pretrained`, and loaded back by the same loader users hit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a model hub; fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def no_config_but_the_tests_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test sees ./config.toml (or the one it names), never the developer's ~/.config/loraloop
    nor the checkout's config.toml, which the search falls back to from any other folder."""
    import loraloop.config

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setattr(loraloop.config, "CHECKOUT_CONFIG", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD model directory, shared by every test in the run (read-only by convention)."""
    from loraloop.tiny import tiny_model_path

    return tiny_model_path(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL model directory (two text encoders, size conditioning), shared read-only by the run."""
    from loraloop.tiny import tiny_sdxl_path

    return tiny_sdxl_path(tmp_path_factory.mktemp("tiny-sdxl-data"))


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny BLIP captioner (random weights, gibberish captions), shared by the run."""
    from loraloop.tiny import tiny_blip_path

    return tiny_blip_path(tmp_path_factory.mktemp("tiny-blip-data"))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data directory, also exported as LORALOOP_DATA_DIR for code that reads it."""
    path = tmp_path / "data"
    path.mkdir()
    monkeypatch.setenv("LORALOOP_DATA_DIR", str(path))
    return path


@pytest.fixture
async def make_service(tiny_model_dir: Path, data_dir: Path):
    """Start the real generation service on 127.0.0.1 (ephemeral port) on the tiny model.

    `await make_service(token="s3cret", max_queue=2)` overrides [service] keys; the result has
    `.url`, `.app`, `.service` and `.adapters_dir` (DATA_DIR/adapters, empty). Stopped after the test.
    Defaults are made cheap for tests: 4 steps, 20 ms batch wait.
    """
    from generation.server import start_service
    from loraloop.config import Config, Secrets

    started = []

    async def make(token: str | None = None, metrics_token: str | None = None, **service_keys):
        keys = {"model": str(tiny_model_dir), "default_steps": 4, "batch_wait_ms": 20, **service_keys}
        config = Config().replace("service", **keys)
        running = await start_service(config, Secrets(discord_token=None, service_token=token,
                                                      metrics_token=metrics_token))
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()


@pytest.fixture
async def service(make_service):
    """The real generation service with test defaults (see `make_service`)."""
    return await make_service()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole run (starting one takes seconds): every service on the
    Ray backend joins it, as `[service] ray_address` does when the process already has a cluster.
    Four logical CPUs: two services of two one-thread CPU workers fit at once."""
    import logging

    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
