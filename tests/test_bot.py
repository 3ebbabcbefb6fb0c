"""The Discord bot end to end: the real discord.py client against the fake Discord on loopback,
a real SQLite store, and (for the tests that make images) the real service on the tiny model."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import re
from pathlib import Path

import pytest
from fake_discord import FakeDiscord
from PIL import Image

from bot.app import LoraloopBot
from loraloop.config import Config
from loraloop.store import AsyncStore, Store

pytestmark = pytest.mark.timeout(60)


def png_bytes(size: int = 16, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
async def fake(monkeypatch):
    discord_fake = FakeDiscord()
    await discord_fake.start()
    discord_fake.point_discord_py_here(monkeypatch)
    yield discord_fake
    await discord_fake.stop()


@pytest.fixture
async def store(data_dir: Path):
    opened = await AsyncStore.open(data_dir / "loraloop.db", data_dir)
    yield opened
    await opened.close()


def make_config(fake: FakeDiscord, loop: dict | None = None, **bot_settings) -> Config:
    settings = {"base_size": 64, "cooldown_seconds": 0.0, "progress_interval": 0.0,
                "admin_role_ids": [fake.admin_role_id], "max_active_per_user": 4, "max_queued_per_user": 4,
                **bot_settings}
    config = Config()
    return dataclasses.replace(config, bot=dataclasses.replace(config.bot, **settings),
                               loop=dataclasses.replace(config.loop, **(loop or {})))


class Bots:
    """Starts and stops bots (a restart is a stop and a fresh start on the same store)."""

    def __init__(self, fake: FakeDiscord, store: AsyncStore) -> None:
        self.fake = fake
        self.store = store
        self.running: list[tuple[LoraloopBot, asyncio.Task]] = []

    async def start(self, service=None, loop: dict | None = None, **bot_settings) -> LoraloopBot:
        # The fake sends every guild at once, so discord.py need not wait 2 s for stragglers.
        bot = LoraloopBot(make_config(self.fake, loop, **bot_settings), service, self.store,
                          guild_ready_timeout=0.05)
        task = asyncio.create_task(bot.start("fake-token"))
        await asyncio.wait_for(bot.caught_up.wait(), timeout=15)
        self.running.append((bot, task))
        return bot

    async def stop(self, bot: LoraloopBot) -> None:
        for entry in list(self.running):
            if entry[0] is bot:
                self.running.remove(entry)
                await bot.close()
                await entry[1]
        await self.fake.wait_for(lambda: not self.fake.connected)


@pytest.fixture
async def bots(fake, store):
    manager = Bots(fake, store)
    yield manager
    for bot, _task in list(manager.running):
        await manager.stop(bot)


async def posted_image(fake: FakeDiscord, store: AsyncStore, requester: dict,
                       prompt: str = "a red fox") -> tuple[int, int]:
    """An image the bot posted before this test's bot started: (message id, image id)."""
    generation_id = await store.record_generation(
        job_id=f"job-{fake.snowflake()}", prompt=prompt, requester_id=int(requester["id"]),
        guild_id=fake.guild_id, channel_id=fake.channel_id, status="done",
        parameters={"width": 64, "height": 64, "steps": 2, "count": 1})
    png = png_bytes()
    image_id = await store.add_image(generation_id, index=0, seed=1, width=16, height=16, png=png)
    message = fake.post_as_bot(prompt, [("image.png", png)])
    await store.set_image_message(image_id, int(message["id"]))
    return int(message["id"]), image_id


async def votes(store: AsyncStore, image_id: int) -> dict[int, int]:
    return {v.user_id: v.value for v in await store.votes_for(image_id)}


# ---- connecting -------------------------------------------------------------------------------


async def test_the_bot_logs_in_and_syncs_its_slash_commands(fake, bots):
    await bots.start()
    names = {c["name"] for c in fake.commands}
    assert {"imagine", "styles", "stats", "optout", "optin", "admin"} <= names
    imagine = next(c for c in fake.commands if c["name"] == "imagine")
    options = {o["name"]: o for o in imagine["options"]}
    assert options["prompt"]["required"] and options["style"]["autocomplete"]
    assert [c["value"] for c in options["aspect"]["choices"]] == ["1:1", "2:3", "3:2", "16:9", "9:16"]
    assert options["count"]["max_value"] == 4


async def test_what_discord_shows_matches_what_the_bot_accepts(fake, bots):
    await bots.start(max_prompt_chars=300)
    synced = {c["name"]: c for c in fake.commands}
    prompt = next(o for o in synced["imagine"]["options"] if o["name"] == "prompt")
    assert (prompt["min_length"], prompt["max_length"]) == (1, 300)
    # allow_dms is off by default: no command is offered outside the server.
    for command in synced.values():
        assert command["dm_permission"] is False and command["contexts"] == [0], command["name"]
    # Members see /admin only with Manage Server (0x20); the bot's own role check still applies.
    assert int(synced["admin"]["default_member_permissions"]) == 0x20
    assert all(c["default_member_permissions"] is None for name, c in synced.items() if name != "admin")


async def test_with_allow_dms_the_commands_but_admin_are_offered_in_dms(fake, bots):
    await bots.start(allow_dms=True)
    synced = {c["name"]: c for c in fake.commands}
    assert synced["imagine"]["dm_permission"] is True and sorted(synced["imagine"]["contexts"]) == [0, 1, 2]
    assert synced["admin"]["dm_permission"] is False and synced["admin"]["contexts"] == [0]


# ---- reactions --------------------------------------------------------------------------------


async def test_adding_a_reaction_records_the_vote_and_removing_it_withdraws_it(fake, store, bots):
    await bots.start()
    message_id, image_id = await posted_image(fake, store, fake.alice)
    await fake.react(message_id, "👍", fake.bob)
    await fake.react(message_id, "👎", fake.carol)
    await fake.wait_for(lambda: True)
    await wait_until(lambda: votes(store, image_id), {int(fake.bob["id"]): 1, int(fake.carol["id"]): -1})
    await fake.unreact(message_id, "👍", fake.bob)
    await wait_until(lambda: votes(store, image_id), {int(fake.carol["id"]): -1})


async def test_a_vote_remembers_the_name_the_voter_goes_by_on_the_server(fake, store, bots):
    bot = await bots.start()
    message_id, image_id = await posted_image(fake, store, fake.alice)
    await fake.react(message_id, "👍", fake.bob)
    await wait_until(lambda: votes(store, image_id), {int(fake.bob["id"]): 1})
    assert await store.user_names() == {int(fake.bob["id"]): fake.bob["global_name"]}
    # A vote read back at the next start (made while the bot was away) carries the name too.
    await bots.stop(bot)
    await fake.react(message_id, "👎", fake.carol, gateway=False)
    await bots.start()
    assert (await store.user_names())[int(fake.carol["id"])] == fake.carol["global_name"]


async def test_the_flag_reaction_flags_the_image_apart_from_votes(fake, store, bots):
    await bots.start()
    message_id, image_id = await posted_image(fake, store, fake.alice)
    await fake.react(message_id, "🚩", fake.bob)
    await wait_until(lambda: store.flags_for(image_id), [(int(fake.bob["id"]), "nsfw")])
    assert await votes(store, image_id) == {}
    await fake.unreact(message_id, "🚩", fake.bob)
    await wait_until(lambda: store.flags_for(image_id), [])


async def test_the_bots_own_reactions_other_emojis_and_other_messages_are_ignored(fake, store, bots):
    await bots.start()
    message_id, image_id = await posted_image(fake, store, fake.alice)
    chat = fake.post_as_user(fake.bob, "just chatting")
    await fake.react(message_id, "👍", fake.bot_user)
    await fake.react(message_id, "🦊", fake.bob)
    await fake.react(int(chat["id"]), "👍", fake.carol)
    # A vote that is counted after all the ignored ones shows the bot has handled them.
    await fake.react(message_id, "👎", fake.carol)
    await wait_until(lambda: votes(store, image_id), {int(fake.carol["id"]): -1})
    assert await store.image_for_message(int(chat["id"])) is None


async def test_votes_made_while_the_bot_was_offline_are_picked_up_at_the_next_start(fake, store, bots):
    bot = await bots.start()
    message_id, image_id = await posted_image(fake, store, fake.alice)
    await fake.react(message_id, "👍", fake.bob)
    await wait_until(lambda: votes(store, image_id), {int(fake.bob["id"]): 1})
    await bots.stop(bot)

    # While offline: bob takes his like back, carol dislikes, and the bot's own reaction exists.
    await fake.unreact(message_id, "👍", fake.bob, gateway=False)
    await fake.react(message_id, "👎", fake.carol, gateway=False)
    await fake.react(message_id, "🚩", fake.carol, gateway=False)
    await fake.react(message_id, "👍", fake.bot_user, gateway=False)
    await bots.start()
    assert await votes(store, image_id) == {int(fake.carol["id"]): -1}
    assert await store.flags_for(image_id) == [(int(fake.carol["id"]), "nsfw")]


async def wait_until(read, expected, timeout: float = 10.0):
    """Poll an async read (the store is written from the bot's event handlers) until it matches."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await read()
        if value == expected:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"expected {expected!r}, still {value!r}")
        await asyncio.sleep(0.02)


# ---- refusals (decided before anything is queued) -----------------------------------------------


async def refused_with(fake: FakeDiscord, interaction, *words: str) -> str:
    await fake.wait_for(lambda: interaction.acknowledged_at is not None)
    assert interaction.ephemeral, "a refusal is shown only to the person who asked"
    text = interaction.callback_data["content"]
    for word in words:
        assert word in text
    assert "Traceback" not in text
    return text


async def test_a_dm_is_refused_unless_dms_are_enabled(fake, bots):
    await bots.start()
    interaction = await fake.slash("imagine", {"prompt": "a fox"}, channel_id=None)
    await refused_with(fake, interaction, "DMs")


async def test_a_channel_outside_the_allowlist_is_refused_with_where_to_go(fake, bots):
    await bots.start(channels=[fake.channel_id])
    interaction = await fake.slash("imagine", {"prompt": "a fox"}, channel_id=fake.other_channel_id)
    await refused_with(fake, interaction, f"<#{fake.channel_id}>")


async def test_blocked_terms_and_long_prompts_are_refused(fake, bots):
    await bots.start(blocked_terms=["gore"], max_prompt_chars=40)
    blocked = await fake.slash("imagine", {"prompt": "a fox, gore"})
    await refused_with(fake, blocked, "blocked term", "rephrase")
    long = await fake.slash("imagine", {"prompt": "a fox " * 10})
    await refused_with(fake, long, "60 characters", "40")


async def test_an_attachment_that_is_not_an_image_or_too_large_is_refused(fake, bots):
    await bots.start(max_attachment_bytes=1000)
    text = fake.upload("notes.txt", b"hello", content_type="text/plain")
    interaction = await fake.slash("imagine", {"prompt": "a fox", "image": text})
    await refused_with(fake, interaction, "notes.txt", "not an image")
    big = fake.upload("big.png", png_bytes(size=256, color=(1, 2, 3)) + b"\0" * 2000)
    interaction = await fake.slash("imagine", {"prompt": "a fox", "image": big})
    await refused_with(fake, interaction, "big.png", "too large")


async def test_an_admin_can_ban_and_unban_and_a_banned_user_is_refused(fake, bots):
    fake.admins.add(int(fake.carol["id"]))
    await bots.start()
    not_admin = await fake.slash("admin ban", {"user": fake.bob}, user=fake.alice)
    await refused_with(fake, not_admin, "Only the image admins")
    ban = await fake.slash("admin ban", {"user": fake.bob}, user=fake.carol)
    await refused_with(fake, ban, "can no longer make images")
    refused = await fake.slash("imagine", {"prompt": "a fox"}, user=fake.bob)
    await refused_with(fake, refused, "can't make images")
    unban = await fake.slash("admin unban", {"user": fake.bob}, user=fake.carol)
    await refused_with(fake, unban, "can make images again")


# ---- opting out ---------------------------------------------------------------------------------


async def test_optout_and_optin_change_what_datasets_may_use(fake, store, bots):
    await bots.start()
    bob = int(fake.bob["id"])
    interaction = await fake.slash("optout", user=fake.bob)
    await fake.wait_for(lambda: interaction.followup_ids)
    assert await store.is_opted_out(bob)
    assert "/optin" in fake.texts_seen_by(interaction)[-1]
    interaction = await fake.slash("optin", user=fake.bob)
    await fake.wait_for(lambda: interaction.followup_ids)
    assert not await store.is_opted_out(bob)


# ---- buttons after a restart ---------------------------------------------------------------------


async def test_the_delete_button_works_after_a_restart_for_the_requester_only(fake, store, bots, data_dir):
    from bot.views import image_view

    bot = await bots.start()
    await bots.stop(bot)
    message_id, image_id = await posted_image(fake, store, fake.alice)
    # The message's buttons as the bot posts them, made before this bot process existed.
    fake.messages[message_id]["components"] = image_view(int(fake.alice["id"])).to_components()
    delete_id = next(c["custom_id"] for row in fake.messages[message_id]["components"]
                     for c in row["components"] if c["custom_id"].startswith("loraloop:delete"))

    await bots.start()
    refused = await fake.click(message_id, delete_id, user=fake.bob)
    await refused_with(fake, refused, "Only the person who asked")
    assert message_id not in fake.deleted_messages
    clicked = await fake.click(message_id, delete_id, user=fake.alice)
    await fake.wait_for(lambda: message_id in fake.deleted_messages)
    assert clicked.ack_seconds < 3
    with Store(data_dir / "loraloop.db", data_dir) as reader:
        (rated,) = [r for r in reader.rated_images() if r.id == image_id]
    assert rated.deleted, "a deleted image leaves future datasets"


async def test_stats_show_votes_per_style_version_and_the_weeks_top_image(fake, store, bots):
    await bots.start()
    message_id, image_id = await posted_image(fake, store, fake.alice, prompt="a lighthouse at dusk")
    await fake.react(message_id, "👍", fake.bob)
    await wait_until(lambda: votes(store, image_id), {int(fake.bob["id"]): 1})
    interaction = await fake.slash("stats")
    await fake.wait_for(lambda: interaction.followup_ids)
    embed = fake.messages[interaction.followup_ids[0]]["embeds"][0]
    assert "**base model**: 1 images, 1 votes, 100% liked" in embed["description"]
    top = embed["fields"][0]["value"]
    assert "a lighthouse at dusk" in top and str(message_id) in top


# ---- with the real service on the tiny model ----------------------------------------------------


@pytest.fixture
async def services(tiny_model_dir, data_dir):
    """Start the real service on the tiny model, with service settings a test chooses."""
    from generation.client import ServiceClient
    from generation.server import start_service
    from loraloop.config import Secrets

    started = []

    async def start(**settings) -> ServiceClient:
        config = Config()
        settings = {"model": str(tiny_model_dir), "device": "cpu", "default_steps": 4, "preview_every": 1,
                    "max_queue": 16, "max_per_requester": 16, **settings}
        config = dataclasses.replace(config, service=dataclasses.replace(config.service, **settings))
        running = await start_service(config, Secrets(discord_token=None, service_token=None))
        client = ServiceClient(running.url)
        client.running = running
        started.append(client)
        return client

    yield start
    for client in started:
        # A paused queue would hold event streams open, and the server waits for them on stop.
        await client.resume()
        await client.close()
        await client.running.stop()


@pytest.fixture
async def service(services):
    return await services()


async def test_imagine_defers_shows_progress_and_posts_one_message_per_image_with_votes(fake, store, bots, service):
    await bots.start(service)
    interaction = await fake.slash("imagine", {"prompt": "a red fox", "count": 2, "steps": 6, "seed": 7})
    await fake.wait_for(lambda: len(fake.image_messages()) == 2, timeout=60)
    assert interaction.callback_type == 5 and interaction.ack_seconds < 3
    images = fake.image_messages()
    for message in images:
        (attachment,) = message["attachments"]
        png = fake.attachment_bytes(attachment)
        with Image.open(io.BytesIO(png)) as image:
            assert image.size == (64, 64)
        assert "a red fox" in message["content"] and "6 steps" in message["content"]
    await fake.wait_for(lambda: all(fake.bot_reactions(int(m["id"])) == ["👍", "👎", "🚩"] for m in images))
    texts = fake.texts_seen_by(interaction)
    assert any(t.startswith("🕒 Queued") for t in texts)
    assert any(t.startswith("⏳ Step") for t in texts)
    await finished(fake, interaction)

    generation = await store.generation_for_job(images[0]["attachments"][0]["filename"].rsplit("-", 1)[0])
    assert generation.status == "done" and generation.requester_id == int(fake.alice["id"])
    recorded = await store.images_for_generation(generation.id)
    assert sorted(i.message_id for i in recorded) == sorted(int(m["id"]) for m in images)
    await fake.react(int(images[1]["id"]), "👍", fake.bob)
    await wait_until(lambda: votes(store, recorded[1].id), {int(fake.bob["id"]): 1})


async def test_a_reaction_that_beats_the_bot_recording_its_message_still_counts(fake, store, bots, service,
                                                                              monkeypatch):
    link = store.set_image_message

    async def slow_link(image_id, message_id):
        await asyncio.sleep(0.5)  # the store is slow: the reaction arrives before the link
        return await link(image_id, message_id)

    monkeypatch.setattr(store, "set_image_message", slow_link)
    await bots.start(service)
    await fake.slash("imagine", {"prompt": "a quick fox", "steps": 2})
    await fake.wait_for(lambda: fake.image_messages(), timeout=60)
    (message,) = fake.image_messages()
    await fake.react(int(message["id"]), "👍", fake.bob)
    image = None
    while image is None:
        image = await store.image_for_message(int(message["id"]))
        await asyncio.sleep(0.02)
    await wait_until(lambda: votes(store, image.id), {int(fake.bob["id"]): 1})


async def test_a_catch_up_during_a_running_job_does_not_post_its_images_twice(fake, store, bots, service):
    bot = await bots.start(service)
    await service.pause()
    interaction = await fake.slash("imagine", {"prompt": "a patient fox", "count": 2, "steps": 2})
    await fake.wait_for(lambda: (m := fake.original_message(interaction)) and m["content"].startswith("🕒"))
    # The first READY can arrive after the first /imagine: its catch-up sees this job unfinished.
    assert await bot.generate.resume_unfinished() == 0
    await service.resume()
    await finished(fake, interaction)
    await asyncio.sleep(0.3)
    assert len(fake.image_messages()) == 2


def custom_ids(message: dict) -> list[str]:
    return [c["custom_id"] for row in message.get("components", []) for c in row["components"]]


async def finished(fake: FakeDiscord, interaction) -> None:
    """Wait until the job of an interaction is over: its images posted and recorded."""
    await fake.wait_for(lambda: (m := fake.original_message(interaction)) is not None
                        and m["content"].startswith("✅ Done"), timeout=60)


async def queued_job(fake: FakeDiscord, interaction) -> str:
    """Wait until the interaction's message shows a queued job; return the cancel button's id."""
    await fake.wait_for(lambda: (m := fake.original_message(interaction)) is not None
                        and any(i.startswith("loraloop:cancel") for i in custom_ids(m)))
    return next(i for i in custom_ids(fake.original_message(interaction)) if i.startswith("loraloop:cancel"))


async def test_a_prompt_cannot_ping_the_server(fake, bots, service):
    await bots.start(service)
    interaction = await fake.slash("imagine", {"prompt": "@everyone look, a *fox*", "steps": 2})
    await finished(fake, interaction)
    (message,) = fake.image_messages()
    assert message["allowed_mentions"] == {"parse": []}
    assert "\\*fox\\*" in message["content"], "Markdown in a prompt is shown, not applied"


async def test_progress_edits_are_throttled_and_carry_a_preview(fake, bots, service):
    await bots.start(service, progress_interval=0.05)
    interaction = await fake.slash("imagine", {"prompt": "a slow fox", "steps": 40, "count": 2})
    await fake.wait_for(lambda: len(fake.image_messages()) == 2, timeout=60)
    original = interaction.original_message_id
    versions = [*fake.message_edits[original], fake.messages[original]]
    times = fake.edit_times[original]
    progress = [t for t, v in zip(times, versions[1:], strict=True) if v["content"].startswith("⏳")]
    assert len(progress) >= 2, "a 40-step job shows progress more than once"
    gaps = [b - a for a, b in itertools.pairwise(progress)]
    assert min(gaps) >= 0.04
    assert any(a["filename"] == "preview.png" for v in versions for a in v["attachments"])


async def test_the_requester_can_cancel_a_queued_job_and_others_cannot(fake, store, bots, service):
    await bots.start(service)
    await service.pause()
    interaction = await fake.slash("imagine", {"prompt": "a patient fox"})
    cancel_id = await queued_job(fake, interaction)
    refused = await fake.click(interaction.original_message_id, cancel_id, user=fake.bob)
    await refused_with(fake, refused, "Only the person who asked")
    clicked = await fake.click(interaction.original_message_id, cancel_id, user=fake.alice)
    await fake.wait_for(lambda: fake.original_message(interaction)["content"] == "❌ Cancelled.")
    assert "Cancelled." in fake.texts_seen_by(clicked)
    assert custom_ids(fake.original_message(interaction)) == [], "the cancel button goes away"
    generation = await store.generation_for_job(cancel_id.split(":")[2])
    assert generation.status == "cancelled"
    assert fake.image_messages() == []


async def test_reroll_and_variation_buttons_work_after_a_restart(fake, store, bots, service):
    bot = await bots.start(service)
    first = await fake.slash("imagine", {"prompt": "a lighthouse", "steps": 3, "seed": 7})
    await finished(fake, first)
    (message,) = fake.image_messages()
    assert "seed 7" in message["content"]
    await bots.stop(bot)
    await bots.start(service)

    reroll, vary, _upscale, _delete = custom_ids(message)
    clicked = await fake.click(int(message["id"]), reroll, user=fake.bob)
    await fake.wait_for(lambda: len(fake.image_messages()) == 2, timeout=60)
    assert clicked.ack_seconds < 3
    rerolled = fake.image_messages()[1]
    assert "a lighthouse" in rerolled["content"] and "3 steps" in rerolled["content"]
    assert not re.search(r"seed 7\b", rerolled["content"]), "a reroll draws a new seed"
    image = await store.image_for_message(int(rerolled["id"]))
    assert (await store.generation(image.generation_id)).requester_id == int(fake.bob["id"])

    await fake.click(int(message["id"]), vary, user=fake.carol)
    await fake.wait_for(lambda: len(fake.image_messages()) == 3, timeout=60)
    image = await store.image_for_message(int(fake.image_messages()[2]["id"]))
    generation = await store.generation(image.generation_id)
    assert generation.parameters["strength"] == 0.35 and generation.prompt == "a lighthouse"
    assert first.followup_ids, "the first job's images were followups of its interaction"


async def test_a_job_left_behind_by_a_restart_is_finished_in_the_channel(fake, store, bots, service):
    bot = await bots.start(service)
    await service.pause()
    interaction = await fake.slash("imagine", {"prompt": "a fox that waited", "steps": 2, "count": 2})
    job_id = (await queued_job(fake, interaction)).split(":")[2]
    await bots.stop(bot)
    await service.resume()
    await bots.start(service)
    await fake.wait_for(lambda: len(fake.image_messages()) == 2, timeout=60)
    for message in fake.image_messages():
        assert message["content"].startswith(f"<@{fake.alice['id']}>") and "a fox that waited" in message["content"]
    await wait_until(lambda: generation_status(store, job_id), "done")
    assert len(await store.images_for_generation((await store.generation_for_job(job_id)).id)) == 2


async def generation_status(store: AsyncStore, job_id: str) -> str:
    return (await store.generation_for_job(job_id)).status


async def test_a_job_the_service_forgot_is_recorded_as_failed_at_the_next_start(fake, store, bots, service):
    generation_id = await store.record_generation(job_id="job-the-service-never-had", prompt="a fox",
                                                  requester_id=int(fake.alice["id"]), channel_id=fake.channel_id)
    await bots.start(service)
    generation = await store.generation(generation_id)
    assert generation.status == "failed" and "no longer knows" in generation.error


async def test_an_unreachable_service_is_a_short_private_message(fake, bots):
    from generation.client import ServiceClient

    async with ServiceClient("http://127.0.0.1:9") as unreachable:
        await bots.start(unreachable)
        interaction = await fake.slash("imagine", {"prompt": "a fox"})
        await fake.wait_for(lambda: interaction.followup_ids)
        (followup,) = [fake.messages[i] for i in interaction.followup_ids]
        assert followup["flags"] & 64 and "not reachable" in followup["content"]
        assert interaction.original_message_id in fake.deleted_messages, "no public error is left behind"


async def test_a_full_queue_and_an_unknown_style_are_explained(fake, bots, services):
    service = await services(max_queue=1)
    await bots.start(service)
    await service.pause()
    first = await fake.slash("imagine", {"prompt": "a fox"})
    await queued_job(fake, first)
    full = await fake.slash("imagine", {"prompt": "a fox"}, user=fake.bob)
    await fake.wait_for(lambda: full.followup_ids)
    assert "queue is full" in fake.messages[full.followup_ids[0]]["content"]
    await service.resume()
    unknown = await fake.slash("imagine", {"prompt": "a fox", "style": "nope"}, user=fake.carol)
    await fake.wait_for(lambda: unknown.followup_ids)
    message = fake.messages[unknown.followup_ids[0]]
    assert message["flags"] & 64 and "nope" in message["content"]


async def test_cooldown_and_per_user_caps_refuse_a_second_request(fake, bots, service):
    await bots.start(service, cooldown_seconds=60, max_active_per_user=1, max_queued_per_user=1)
    await service.pause()
    first = await fake.slash("imagine", {"prompt": "a fox"})
    await queued_job(fake, first)
    capped = await fake.slash("imagine", {"prompt": "another fox"})
    await refused_with(fake, capped, "1 jobs in progress")
    await bots.stop(bots.running[0][0])
    cooling = await bots.start(service, cooldown_seconds=60, max_active_per_user=3, max_queued_per_user=3)
    cooling.limits.started(int(fake.alice["id"]), "earlier")
    slow = await fake.slash("imagine", {"prompt": "a fox"})
    await refused_with(fake, slow, "Slow down", "try again in")


async def test_a_job_that_outlives_its_interaction_token_finishes_in_the_channel(fake, bots, service):
    await bots.start(service)
    await service.pause()
    interaction = await fake.slash("imagine", {"prompt": "a sleepy fox", "steps": 2})
    await queued_job(fake, interaction)
    interaction.token_expired = True
    await service.resume()
    await fake.wait_for(lambda: fake.image_messages(), timeout=60)
    (message,) = fake.image_messages()
    assert int(message["id"]) not in interaction.followup_ids
    assert message["content"].startswith(f"<@{fake.alice['id']}>") and "a sleepy fox" in message["content"]
    assert message["allowed_mentions"]["users"] == [int(fake.alice["id"])], "only the requester is pinged"
    await fake.wait_for(lambda: fake.bot_reactions(int(message["id"])) == ["👍", "👎", "🚩"])


async def test_images_over_the_upload_limit_are_re_encoded_not_dropped(fake, bots, service):
    fake.attachment_size_limit = 2500
    await bots.start(service)
    await fake.slash("imagine", {"prompt": "a detailed fox", "steps": 2, "count": 2})
    await fake.wait_for(lambda: len(fake.image_messages()) == 2, timeout=60)
    posted = [a for m in fake.image_messages() for a in m["attachments"]]
    assert len(posted) == 2 and all(a["size"] <= 2500 for a in posted)


async def test_imagine_works_in_dms_when_enabled(fake, bots, service):
    await bots.start(service, allow_dms=True)
    await fake.slash("imagine", {"prompt": "a private fox", "steps": 2}, channel_id=None)
    dm = fake.dm_channel_for(int(fake.alice["id"]))
    await fake.wait_for(lambda: fake.image_messages(dm), timeout=60)
    assert fake.image_messages() == []


async def test_admins_reload_styles_which_then_list_autocomplete_and_apply(fake, bots, service, tiny_model_dir,
                                                                          data_dir):
    from generation.testing import write_lora

    fake.admins.add(int(fake.carol["id"]))
    await bots.start(service)
    empty = await fake.slash("styles")
    await fake.wait_for(lambda: empty.followup_ids)
    assert "no styles yet" in fake.texts_seen_by(empty)[-1]

    write_lora(tiny_model_dir, data_dir / "adapters" / "pixel" / "v1.safetensors", description="Pixel art")
    refused = await fake.slash("admin reload", user=fake.alice)
    await refused_with(fake, refused, "Only the image admins")
    reload = await fake.slash("admin reload", user=fake.carol)
    await fake.wait_for(lambda: reload.followup_ids)
    assert "Reloaded" in fake.texts_seen_by(reload)[-1]

    listed = await fake.slash("styles")
    await fake.wait_for(lambda: listed.followup_ids)
    assert "**pixel** v1: Pixel art" in fake.texts_seen_by(listed)[-1]
    typed = await fake.slash("imagine", {"prompt": "a fox", "style": "pix"}, focused="style")
    await fake.wait_for(lambda: typed.acknowledged_at is not None)
    assert typed.choices == [{"name": "pixel", "value": "pixel"}]

    await fake.slash("imagine", {"prompt": "a pixel fox", "style": "pixel", "steps": 2})
    await fake.wait_for(lambda: fake.image_messages(), timeout=60)
    assert "pixel v1" in fake.image_messages()[0]["content"]


async def test_admins_pause_and_resume_the_queue(fake, bots, service):
    fake.admins.add(int(fake.carol["id"]))
    await bots.start(service)
    pause = await fake.slash("admin pause", user=fake.carol)
    await fake.wait_for(lambda: pause.followup_ids)
    assert (await service.health()).paused
    resume = await fake.slash("admin resume", user=fake.carol)
    await fake.wait_for(lambda: resume.followup_ids)
    assert not (await service.health()).paused


async def test_an_attachment_that_claims_to_be_an_image_but_is_not_is_refused_privately(fake, bots, service):
    await bots.start(service)
    broken = fake.upload("fox.png", b"this is not a png at all", content_type="image/png")
    interaction = await fake.slash("imagine", {"prompt": "a fox", "image": broken, "strength": 0.5})
    await fake.wait_for(lambda: interaction.followup_ids)
    message = fake.messages[interaction.followup_ids[0]]
    assert message["flags"] & 64 and "image" in message["content"].lower()
    assert "Traceback" not in message["content"]


async def test_an_unexpected_failure_reaches_the_user_as_a_reference_not_a_traceback(fake, store, bots):
    await bots.start()
    await store.close()  # every store call now fails
    interaction = await fake.slash("optout")
    await fake.wait_for(lambda: interaction.followup_ids)
    (text,) = [fake.messages[i]["content"] for i in interaction.followup_ids]
    assert f"reference `{interaction.id}`" in text and "Traceback" not in text and "StoreError" not in text


async def test_discord_administrators_are_admins_even_without_a_configured_role(fake, bots):
    fake.admins.add(int(fake.carol["id"]))  # the fake gives admins the Administrator permission
    await bots.start(admin_role_ids=[])
    ban = await fake.slash("admin ban", {"user": fake.bob}, user=fake.carol)
    await refused_with(fake, ban, "can no longer make images")


# ---- the command line ---------------------------------------------------------------------------


def test_loraloop_bot_without_a_token_says_how_to_get_one(monkeypatch):
    from click.testing import CliRunner

    from loraloop.cli import cli

    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["bot"])
    assert result.exit_code == 1
    assert "DISCORD_TOKEN is not set" in result.output and "discord.com/developers" in result.output


async def test_loraloop_bot_wires_the_store_and_service_from_config_and_connects(fake, data_dir):
    from bot.cli import run_bot
    from loraloop.context import AppContext

    app = AppContext(None)
    app.config = Config()
    running = asyncio.create_task(run_bot(app, "fake-token", None))
    await fake.wait_for(lambda: fake.connected and fake.commands)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert (data_dir / "loraloop.db").exists(), "the store was opened where the config says"


async def test_a_job_older_than_the_token_lifetime_stops_using_the_token(fake, bots, service, monkeypatch):
    import bot.imagine

    monkeypatch.setattr(bot.imagine, "TOKEN_LIFETIME_S", 0.3)
    await bots.start(service)
    await service.pause()
    interaction = await fake.slash("imagine", {"prompt": "a very patient fox", "steps": 2})
    await queued_job(fake, interaction)
    await asyncio.sleep(0.4)
    webhook_calls = sum(1 for _t, _m, path in fake.requests if interaction.token in path)
    await service.resume()
    await fake.wait_for(lambda: fake.image_messages(), timeout=60)
    (message,) = fake.image_messages()
    assert message["content"].startswith(f"<@{fake.alice['id']}>")
    await fake.wait_for(lambda: fake.bot_reactions(int(message["id"])))
    assert sum(1 for _t, _m, path in fake.requests if interaction.token in path) == webhook_calls


async def test_a_failing_service_gives_a_reference_and_no_internals(fake, bots):
    from aiohttp import web

    from generation.client import ServiceClient

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "internal", "message": "CUDA error: device-side assert"}},
                                 status=500)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ServiceClient(f"http://127.0.0.1:{port}") as failing:
            await bots.start(failing)
            interaction = await fake.slash("imagine", {"prompt": "a fox"})
            await fake.wait_for(lambda: interaction.followup_ids)
            (text,) = [fake.messages[i]["content"] for i in interaction.followup_ids]
            assert "Something went wrong" in text and "reference" in text and "CUDA" not in text
    finally:
        await runner.cleanup()


@pytest.mark.timeout(150)  # five images on the tiny model
async def test_an_experiment_serves_both_arms_without_saying_which_and_an_admin_can_promote(
        fake, store, bots, service, tiny_model_dir, data_dir, monkeypatch):
    from generation.testing import write_lora

    for version in (1, 2):
        write_lora(tiny_model_dir, data_dir / "adapters" / "fox" / f"v{version}.safetensors", seed=version)
    await store.record_adapter(name="fox", version=1, file_sha256="sha-v1")
    await store.record_adapter(name="fox", version=2, file_sha256="sha-v2",
                               experiment={"control_version": 1, "share": 0.5})
    await service.reload_adapters()
    fake.admins.add(int(fake.carol["id"]))
    await bots.start(service, loop={"admin_channel_id": fake.other_channel_id})
    # The experiment's start is announced in the admin channel.
    await fake.wait_for(lambda: any("on trial" in m["content"] for m in fake.channel_messages(fake.other_channel_id)))

    # Each request draws its arm; these draws alternate so both arms are served.
    draws = itertools.cycle([0.2, 0.8])
    monkeypatch.setattr("bot.imagine.random.random", lambda: next(draws))
    for n in range(4):
        await fake.slash("imagine", {"prompt": f"a fox {n}", "style": "fox", "steps": 2, "seed": n})
        await fake.wait_for(lambda n=n: len(fake.image_messages()) == n + 1, timeout=60)
    experiment = await store.running_experiment("fox")
    generations = [await store.generation(i) for i in range(1, 5)]
    assert [g.arm for g in generations] == ["candidate", "control"] * 2
    assert {g.arm: g.adapters[0]["version"] for g in generations} == {"candidate": 2, "control": 1}
    assert {g.experiment_id for g in generations} == {experiment.id}
    for message in fake.image_messages():
        assert "fox" in message["content"] and "fox v" not in message["content"]
        png = fake.attachment_bytes(message["attachments"][0])
        with Image.open(io.BytesIO(png)) as image:
            assert "parameters" not in image.info, "the PNG must not name the version either"

    stats = await fake.slash("stats")
    await fake.wait_for(lambda: stats.followup_ids)
    fields = fake.messages[stats.followup_ids[0]]["embeds"][0]["fields"]
    (running,) = [f["value"] for f in fields if f["name"] == "Experiments"]
    assert "candidate v2" in running and "control v1" in running and "collecting votes" in running

    refused = await fake.slash("admin promote", {"style": "fox"}, user=fake.alice)
    await refused_with(fake, refused, "Only the image admins")
    promote = await fake.slash("admin promote", {"style": "fox"}, user=fake.carol)
    await fake.wait_for(lambda: promote.followup_ids)
    assert "Promoted fox v2" in fake.texts_seen_by(promote)[-1]
    await fake.wait_for(lambda: any("promoted by an admin" in m["content"]
                                    for m in fake.channel_messages(fake.other_channel_id)))
    assert await store.default_version("fox") == 2
    (decision,) = await store.experiment_decisions("fox")
    assert decision.decided_by == f"admin:{fake.carol['id']}" and "candidate" in decision.figures
    again = await fake.slash("admin retire", {"style": "fox"}, user=fake.carol)
    await fake.wait_for(lambda: again.followup_ids)
    assert "No experiment is running for fox" in fake.texts_seen_by(again)[-1]

    # Outside an experiment the style's default version is pinned, and named.
    await fake.slash("imagine", {"prompt": "a fox again", "style": "fox", "steps": 2, "seed": 9})
    await fake.wait_for(lambda: len(fake.image_messages()) == 5, timeout=60)
    assert "fox v2" in fake.image_messages()[-1]["content"]
