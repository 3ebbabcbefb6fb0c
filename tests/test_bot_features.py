"""The Discord features past /imagine: several styles, 🔍 upscale, /describe, the NSFW policy and
personal styles. The real discord.py client against the fake Discord, a real SQLite store, and
the real service on the tiny model (the fixtures are test_bot.py's)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from test_bot import (  # noqa: F401  pytest fixtures, found by name (pyproject: F811 here)
    bots,
    custom_ids,
    fake,
    finished,
    refused_with,
    service,
    services,
    store,
    votes,
    wait_until,
)

from bot.commands import parse_styles
from generation.contract import AdapterRef

pytestmark = pytest.mark.timeout(90)


def image_size(discord_fake, message: dict) -> tuple[int, int]:
    with Image.open(io.BytesIO(discord_fake.attachment_bytes(message["attachments"][0]))) as image:
        return image.size


# ---- several styles -----------------------------------------------------------------------------


def test_a_styles_option_reads_names_versions_and_weights():
    assert parse_styles("fox:0.8, ink@2:0.5,pixel") == (
        AdapterRef("fox", 0.8), AdapterRef("ink@2", 0.5), AdapterRef("pixel", 1.0))
    for bad, words in (("fox:lots", "not a number"), ("../up", "not a style name"), ("fox:3", "between 0 and 2")):
        with pytest.raises(ValueError, match=words):
            parse_styles(bad)


async def test_three_styles_reach_the_service_the_provenance_and_the_stats(
        fake, store, bots, service, tiny_model_dir, data_dir):
    from generation.testing import write_lora

    for seed, name in enumerate(("fox", "ink", "pixel"), start=1):
        write_lora(tiny_model_dir, data_dir / "adapters" / name / "v1.safetensors", seed=seed)
    await service.reload_adapters()
    await bots.start(service)

    typed = await fake.slash("imagine", {"prompt": "a fox", "styles": "fox:0.8, in"}, focused="styles")
    await fake.wait_for(lambda: typed.acknowledged_at is not None)
    assert typed.choices == [{"name": "fox:0.8, ink", "value": "fox:0.8, ink"}]

    interaction = await fake.slash("imagine", {"prompt": "an inked pixel fox", "style": "fox", "style_weight": 0.8,
                                               "styles": "ink@1:0.5, pixel", "steps": 2})
    await finished(fake, interaction)
    (message,) = fake.image_messages()
    assert "fox v1 + ink v1 + pixel v1" in message["content"]
    generation = await store.generation(1)
    assert [(a["name"], a["version"], a["weight"]) for a in generation.adapters] == [
        ("fox", 1, 0.8), ("ink", 1, 0.5), ("pixel", 1, 1.0)]

    await fake.react(int(message["id"]), "👍", fake.bob)
    image = await store.image_for_message(int(message["id"]))
    await wait_until(lambda: votes(store, image.id), {int(fake.bob["id"]): 1})
    stats = await fake.slash("stats")
    await fake.wait_for(lambda: stats.followup_ids)
    text = fake.messages[stats.followup_ids[0]]["embeds"][0]["description"]
    for name in ("fox", "ink", "pixel"):
        assert f"**{name} v1**: 1 images, 1 votes, 100% liked" in text, "each adapter version gets the vote"


async def test_more_than_three_styles_or_a_bad_one_is_refused_before_any_work(fake, bots):
    await bots.start()
    four = await fake.slash("imagine", {"prompt": "a fox", "style": "fox", "styles": "a, b, c"})
    await refused_with(fake, four, "At most 3 styles")
    bad = await fake.slash("imagine", {"prompt": "a fox", "styles": "fox:lots"})
    await refused_with(fake, bad, "not a number")


# ---- 🔍 upscale ---------------------------------------------------------------------------------


async def test_upscale_posts_a_twice_as_large_image_with_its_parent_recorded(
        fake, store, bots, service):
    bot = await bots.start(service)
    first = await fake.slash("imagine", {"prompt": "a lighthouse", "steps": 4, "seed": 11})
    await finished(fake, first)
    (original,) = fake.image_messages()
    upscale = next(i for i in custom_ids(original) if i == "loraloop:upscale")
    clicked = await fake.click(int(original["id"]), upscale, user=fake.bob)
    await fake.wait_for(lambda: len(fake.image_messages()) == 2, timeout=60)
    assert clicked.ack_seconds < 3
    larger = fake.image_messages()[1]
    assert image_size(fake, larger) == (128, 128) and "seed 11" in larger["content"]
    assert "upscale" in "".join(custom_ids(larger)), "the upscaled image has its own buttons"
    await fake.wait_for(lambda: fake.bot_reactions(int(larger["id"])) == ["👍", "👎", "🚩"])
    parent = await store.image_for_message(int(original["id"]))
    child = await store.image_for_message(int(larger["id"]))
    generation = await store.generation(child.generation_id)
    assert generation.parent_image_id == parent.id and generation.requester_id == int(fake.bob["id"])
    assert generation.parameters["strength"] == bot.settings.upscale_strength

    # Past the largest output the config allows, the button says so and starts nothing.
    await bots.stop(bot)
    await bots.start(service, upscale_max_pixels=64 * 64)
    refused = await fake.click(int(original["id"]), upscale, user=fake.bob)
    await refused_with(fake, refused, "as large as upscaling goes")
    assert len(fake.image_messages()) == 2


# ---- /describe ----------------------------------------------------------------------------------


@pytest.fixture
async def describing(tiny_model_dir, tiny_blip_dir, data_dir):
    """The real service on the tiny model, with the tiny BLIP as its captioner."""
    from generation.client import ServiceClient
    from generation.server import start_service
    from loraloop.config import Config, Secrets

    config = (Config().replace("service", model=str(tiny_model_dir), device="cpu", default_steps=2)
              .replace("dataset", caption_model=str(tiny_blip_dir), caption_device="cpu"))
    running = await start_service(config, Secrets(discord_token=None, service_token=None))
    client = ServiceClient(running.url)
    client.running = running
    yield client
    await client.close()
    await running.stop()


async def test_describe_answers_with_a_caption_and_imagine_this_starts_a_job(fake, store, bots,
                                                                            describing):
    from test_bot import png_bytes

    await bots.start(describing)
    upload = fake.upload("lake.png", png_bytes(size=48, color=(20, 90, 200)))
    interaction = await fake.slash("describe", {"image": upload})
    await fake.wait_for(lambda: interaction.followup_ids, timeout=60)
    assert interaction.callback_type == 5, "deferred before the caption is made"
    answer = fake.messages[interaction.followup_ids[0]]
    caption = answer["embeds"][0]["description"]
    assert caption.strip() and custom_ids(answer) == ["loraloop:imagine-caption"]

    clicked = await fake.click(int(answer["id"]), "loraloop:imagine-caption", user=fake.bob)
    await fake.wait_for(lambda: fake.image_messages(), timeout=60)
    assert clicked.ack_seconds < 3
    (message,) = fake.image_messages()
    image = await store.image_for_message(int(message["id"]))
    generation = await store.generation(image.generation_id)
    assert generation.prompt == caption[:500] and generation.requester_id == int(fake.bob["id"])


async def test_describe_refuses_what_is_not_an_image(fake, bots, describing):
    await bots.start(describing)
    text = fake.upload("notes.txt", b"hello", content_type="text/plain")
    refused = await fake.slash("describe", {"image": text})
    await refused_with(fake, refused, "notes.txt", "not an image")
    broken = fake.upload("fox.png", b"not a png at all", content_type="image/png")
    interaction = await fake.slash("describe", {"image": broken})
    await fake.wait_for(lambda: interaction.followup_ids, timeout=30)
    answer = fake.messages[interaction.followup_ids[0]]["content"]
    assert "'image' is refused" in answer and "Traceback" not in answer


# ---- the NSFW policy ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_safety_dir(tmp_path_factory) -> str:
    from loraloop.tiny import tiny_safety_checker_path

    return str(tiny_safety_checker_path(tmp_path_factory.mktemp("tiny-safety-data")))


@pytest.fixture
async def flagging(services, tiny_safety_dir):
    """The real service whose tiny safety checker flags every image (adjustment 2, see tiny.py)."""
    return await services(safety_checker=tiny_safety_dir, safety_adjustment=2.0)


async def test_a_flagged_image_is_blocked_in_an_ordinary_channel_and_kept_out_of_datasets(
        fake, store, bots, flagging, data_dir):
    from loraloop.store import Store

    await bots.start(flagging)
    interaction = await fake.slash("imagine", {"prompt": "a questionable fox", "steps": 2})
    await finished(fake, interaction)
    assert fake.image_messages() == [], "the image never reaches the channel"
    told = [fake.messages[i] for i in interaction.followup_ids if "held back" in fake.messages[i]["content"]]
    assert len(told) == 1 and told[0]["flags"] & 64, "only the requester is told"
    (image,) = await store.images_for_generation(1)
    assert image.nsfw is True and image.blocked and image.message_id is None
    with Store(data_dir / "loraloop.db", data_dir) as reader:
        (rated,) = reader.rated_images()
    assert "nsfw" in rated.flags, "curation drops it like a flagged image"

    stats = await fake.slash("stats")
    await fake.wait_for(lambda: stats.followup_ids)
    fields = {f["name"]: f["value"] for f in fake.messages[stats.followup_ids[0]]["embeds"][0]["fields"]}
    assert fields["Safety check"] == "1 images checked, 1 flagged, 1 held back from their channel"


async def test_a_flagged_image_is_posted_in_an_age_restricted_channel(fake, store, bots, flagging):
    fake.channels[fake.channel_id]["nsfw"] = True
    await bots.start(flagging)
    interaction = await fake.slash("imagine", {"prompt": "a questionable fox", "steps": 2})
    await finished(fake, interaction)
    (message,) = fake.image_messages()
    assert not message["attachments"][0]["filename"].startswith("SPOILER_")
    image = await store.image_for_message(int(message["id"]))
    assert image.nsfw is True and not image.blocked


async def test_under_the_spoiler_policy_a_flagged_image_is_posted_as_a_spoiler(fake, store, bots, flagging):
    await bots.start(flagging, nsfw_policy="spoiler")
    interaction = await fake.slash("imagine", {"prompt": "a questionable fox", "steps": 2})
    await finished(fake, interaction)
    (message,) = fake.image_messages()
    assert message["attachments"][0]["filename"].startswith("SPOILER_")
    await fake.wait_for(lambda: fake.bot_reactions(int(message["id"])) == ["👍", "👎", "🚩"])


# ---- personal styles ----------------------------------------------------------------------------


def picture(seed: int) -> bytes:
    """Noise, so no two pictures are near-duplicates that curation would collapse into one."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


async def voted_on(store, fake, user: dict, values: list[int]) -> None:
    """Images someone else asked for, each rated by USER (a like or a dislike)."""
    for n, value in enumerate(values):
        generation = await store.record_generation(job_id=f"job-{fake.snowflake()}", prompt=f"a fox {n}",
                                                   requester_id=int(fake.carol["id"]), status="done")
        image = await store.add_image(generation, index=0, seed=n, width=32, height=32, png=picture(n))
        await store.set_vote(image, int(user["id"]), value, "x")


def loop_runner(tiny_model_dir, service):
    from loraloop.config import Config
    from training.loop import LoopRunner

    config = (Config().replace("service", model=str(tiny_model_dir))
              .replace("training", resolution=32, rank=2, alpha=2.0, max_steps=2, batch_size=2,
                       validation_split=0.0, log_with="none", checkpoint_every=1000)
              .replace("loop", personal_min_votes=4))
    return LoopRunner(config, service_url=service.running.url)


async def answer(fake, interaction) -> str:
    await fake.wait_for(lambda: interaction.followup_ids, timeout=30)
    return fake.messages[interaction.followup_ids[-1]]["content"]


@pytest.mark.timeout(180)
async def test_a_personal_style_is_trained_from_ones_own_votes_used_and_refused_to_others(
        fake, store, bots, service, tiny_model_dir, data_dir):
    import asyncio

    from generation.client import ServiceError
    from generation.contract import JobRequest

    bob = int(fake.bob["id"])
    name = f"personal-{bob}"
    await voted_on(store, fake, fake.bob, [1, -1, 1, -1, 1])
    await bots.start(service, loop={"personal_min_votes": 4})
    assert "needs 4 of your votes; you have 0" in await answer(fake, await fake.slash(
        "profile", {"action": "train"}, user=fake.alice))
    assert "Queued" in await answer(fake, await fake.slash("profile", {"action": "train"}, user=fake.bob))

    runner = loop_runner(tiny_model_dir, service)
    done = await asyncio.to_thread(runner.step)
    (trained,) = done.personal
    assert trained.error is None and trained.adapter == name and trained.candidate_version == 1
    assert (data_dir / "adapters" / name / "v1.safetensors").is_file()
    assert json_lines(trained.dataset) == {True: 3, False: 2}, "kto on bob's likes and dislikes alone"
    shown = await answer(fake, await fake.slash("profile", user=fake.bob))
    assert "Ready" in shown and "Version 1, learned from 5 of your votes" in shown

    used = await fake.slash("imagine", {"prompt": "my kind of fox", "personal": True, "steps": 2}, user=fake.bob)
    await finished(fake, used)
    (message,) = fake.image_messages()
    assert f"{name} v1" in message["content"]
    assert name not in [a.name for a in await bots.running[0][0].styles(refresh=True)], "never listed"

    stolen = await fake.slash("imagine", {"prompt": "a fox", "styles": name}, user=fake.alice)
    await refused_with(fake, stolen, "someone else's personal style")
    nothing = await fake.slash("imagine", {"prompt": "a fox", "personal": True}, user=fake.alice)
    await refused_with(fake, nothing, "no personal style yet")
    with pytest.raises(ServiceError, match="personal style") as refused:
        await service.submit(JobRequest(prompt="a fox", adapters=(AdapterRef(name),),
                                        requester=f"discord:{fake.alice['id']}"))
    assert refused.value.code == "unknown_adapter", "the service refuses it too, whatever the client"

    assert "Deleted" in await answer(fake, await fake.slash("profile", {"action": "delete"}, user=fake.bob))
    gone = await fake.slash("imagine", {"prompt": "a fox", "personal": True}, user=fake.bob)
    await refused_with(fake, gone, "no personal style yet")
    assert (await asyncio.to_thread(runner.step)).removed == [name]
    assert not (data_dir / "adapters" / name).exists()


def json_lines(dataset) -> dict[bool, int]:
    import json
    from collections import Counter

    rows = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    return dict(Counter(row["label"] for row in rows))


async def test_opting_out_deletes_ones_personal_style(fake, store, bots):
    bob = int(fake.bob["id"])
    await store.request_profile(bob)
    await bots.start()
    await answer(fake, await fake.slash("optout", user=fake.bob))
    assert (await store.profile(bob)).status == "deleted"
