"""The product's promise in one test: votes in Discord become a new style the bot then uses.

`loraloop run`'s own code starts the real service (tiny model) and the real bot (discord.py
against the fake Discord on loopback) with a real SQLite store. Users /imagine and vote; an
admin curates, trains a few steps and publishes through the real CLI; the new version shows
in /styles, /imagine uses it, and /stats counts the votes per adapter version. It runs on both
backends of the service: the local worker thread and Ray worker actors.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_discord import FakeDiscord

from loraloop.cli import cli
from loraloop.config import Secrets
from loraloop.context import AppContext
from loraloop.run import run_all
from loraloop.store import Store

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The same test on each backend: the Ray one with two one-thread CPU workers on the session's cluster.
BACKENDS = {"local": "", "ray": 'backend = "ray"\nray_workers = 2\nray_cpu_threads = 1\n'}


def write_config(path: Path, fake: FakeDiscord, model_dir: Path, backend: str = "local") -> Path:
    path.write_text(f"""
[service]
model = "{model_dir}"
port = {free_port()}
default_steps = 4
batch_wait_ms = 20
{BACKENDS[backend]}

[console]
port = {free_port()}

[bot]
base_size = 64
cooldown_seconds = 0.0
progress_interval = 0.0
max_active_per_user = 4
max_queued_per_user = 4
admin_role_ids = [{fake.admin_role_id}]

[training]
resolution = 64
rank = 4
learning_rate = 0.05
max_steps = 4
batch_size = 2
validation_split = 0.0
log_with = "none"
""")
    return path


async def loraloop(config: Path, *args: str) -> str:
    """Run one `loraloop` CLI command off the event loop, so the bot and service keep serving."""
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


async def answered(fake: FakeDiscord, command: str, options: dict | None = None, **kwargs) -> list[str]:
    """Run a slash command and return what its user was shown once the bot answered."""
    interaction = await fake.slash(command, options, **kwargs)
    await fake.wait_for(lambda: interaction.followup_ids, timeout=30)
    return fake.texts_seen_by(interaction)


async def eventually(read, expected, timeout: float = 30.0) -> None:
    """Poll a plain read (the bot writes the store from its own handlers) until it matches."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"expected {expected!r}, still {value!r}"
        await asyncio.sleep(0.05)


async def imagine(fake: FakeDiscord, options: dict, user: dict) -> list[dict]:
    """/imagine and wait for its image messages; returns them."""
    before = {m["id"] for m in fake.image_messages()}
    interaction = await fake.slash("imagine", options, user=user)
    count = options.get("count", 1)
    try:
        await fake.wait_for(lambda: len([m for m in fake.image_messages() if m["id"] not in before]) == count,
                            timeout=90)
    except AssertionError:
        raise AssertionError(
            f"/imagine {options} posted no images; the user saw {fake.texts_seen_by(interaction)}") from None
    return [m for m in fake.image_messages() if m["id"] not in before]


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
async def test_votes_become_a_published_style_that_the_bot_then_uses(backend, tiny_model_dir, data_dir, tmp_path,
                                                                      monkeypatch, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    fake = FakeDiscord()
    await fake.start()
    fake.point_discord_py_here(monkeypatch)
    config = write_config(tmp_path / "config.toml", fake, tiny_model_dir, backend)
    app = AppContext(str(config))
    product = asyncio.create_task(run_all(app, Secrets(discord_token="fake-token", service_token=None)))
    try:
        await fake.wait_for(lambda: fake.connected and fake.commands, timeout=60)
        assert "no styles yet" in " ".join(await answered(fake, "styles"))

        # Alice and Bob imagine; Bob and Carol like some images and dislike others.
        images = [*await imagine(fake, {"prompt": "a red fox", "count": 3, "seed": 1}, fake.alice),
                  *await imagine(fake, {"prompt": "a blue whale", "count": 3, "seed": 2}, fake.bob)]
        liked, disliked = images[:2] + images[3:5], [images[2], images[5]]
        for message in liked:
            await fake.react(int(message["id"]), "👍", fake.carol)
            await fake.react(int(message["id"]), "👍", fake.bob if message in images[:3] else fake.alice)
        for message in disliked:
            await fake.react(int(message["id"]), "👎", fake.carol)

        def votes_recorded() -> int:
            with Store(data_dir / "loraloop.db", data_dir) as store:
                return store.counts()["ratings"]

        await eventually(votes_recorded, 2 * len(liked) + len(disliked))

        # The admin's workflow, through the real CLI: curate, train, publish (which tells the service).
        dataset = tmp_path / "liked"
        await loraloop(config, "dataset", "curate", str(dataset), "--format", "sft", "--min-raters", "2",
                       "--min-score", "0.5", "--min-wilson", "0", "--near-duplicate-distance", "0")
        curated = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
        assert len(curated) == len(liked)
        assert {row["text"] for row in curated} == {"a red fox", "a blue whale"}
        run = tmp_path / "run"
        await loraloop(config, "train", str(dataset), "--name", "foxes", "--output", str(run))
        output = await loraloop(config, "adapters", "publish", str(run), "--name", "foxes")
        assert "foxes" in output and "v1" in output

        # The new version is a style in Discord, /imagine uses it, /stats counts its votes.
        assert any("**foxes** v1" in text for text in await answered(fake, "styles"))
        (styled,) = await imagine(fake, {"prompt": "a red fox", "style": "foxes", "seed": 1}, fake.alice)
        assert "foxes v1" in styled["content"]
        await fake.react(int(styled["id"]), "👍", fake.bob)
        await eventually(votes_recorded, 2 * len(liked) + len(disliked) + 1)
        stats = " ".join(await answered(fake, "stats"))
        assert f"**base model**: 6 images, {2 * len(liked) + len(disliked)} votes" in stats
        assert "**foxes v1**: 1 images, 1 votes, 100% liked" in stats
        with Store(data_dir / "loraloop.db", data_dir) as store:
            (adapter,) = store.adapters("foxes")
            assert adapter.version == 1 and store.training_run(adapter.training_run_id).status == "done"
    finally:
        product.cancel()
        with pytest.raises(asyncio.CancelledError):
            await product
        await fake.stop()
