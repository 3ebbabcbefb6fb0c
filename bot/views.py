"""The buttons under images and progress messages, working across bot restarts.

Each button is a `DynamicItem`: its custom id carries what it needs (the requester's id, the
job id) and everything else is found from the message it sits on (the store maps message ids to
images and generations). The bot registers the classes with `add_dynamic_items` in
`setup_hook`, so a click on a message posted before a restart still reaches the right code.

    🔁 reroll     the same settings with a new seed (anyone may reroll)
    🎨 variation  img2img from this image at low strength
    🔍 upscale    2x: this image enlarged, then img2img with its prompt, seed and styles
    🗑 delete     the requester or an admin removes the image message
    ❌ cancel     the requester or an admin stops a queued or running job
    ✨ imagine    under a /describe answer: /imagine its caption
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord

from bot.imagine import Spec
from generation.contract import AdapterRef

if TYPE_CHECKING:
    from bot.app import LoraloopBot
    from loraloop.store import Generation, Image

log = logging.getLogger(__name__)


def _bot(interaction: discord.Interaction) -> LoraloopBot:
    return interaction.client  # type: ignore[return-value]  # the bot that registered these items


async def _generation_for(interaction: discord.Interaction) -> tuple[Image, Generation] | None:
    """The image and generation behind the message a button sits on; None (and a reply) if gone."""
    bot = _bot(interaction)
    message_id = interaction.message.id if interaction.message else 0
    image = await bot.store.image_for_message(message_id)
    if image is None:
        await interaction.response.send_message(
            "I no longer know this image, so I can't do that; use /imagine instead.", ephemeral=True)
        return None
    return image, await bot.store.generation(image.generation_id)


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"loraloop:reroll"):
    def __init__(self) -> None:
        super().__init__(discord.ui.Button(emoji="🔁", label="Reroll", custom_id="loraloop:reroll",
                                           style=discord.ButtonStyle.secondary))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> RerollButton:
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        found = await _generation_for(interaction)
        if found is None:
            return
        _image, generation = found
        await _bot(interaction).generate.start(interaction, Spec.from_generation(generation))


class VaryButton(discord.ui.DynamicItem[discord.ui.Button], template=r"loraloop:vary"):
    def __init__(self) -> None:
        super().__init__(discord.ui.Button(emoji="🎨", label="Variation", custom_id="loraloop:vary",
                                           style=discord.ButtonStyle.secondary))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> VaryButton:
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        found = await _generation_for(interaction)
        if found is None:
            return
        image, generation = found
        bot = _bot(interaction)
        path = bot.store.data_dir / image.path
        spec = replace(Spec.from_generation(generation), count=1, width=image.width, height=image.height,
                       init_image=await asyncio.to_thread(path.read_bytes), strength=bot.settings.variation_strength)
        await bot.generate.start(interaction, spec)


class UpscaleButton(discord.ui.DynamicItem[discord.ui.Button], template=r"loraloop:upscale"):
    def __init__(self) -> None:
        super().__init__(discord.ui.Button(emoji="🔍", label="Upscale", custom_id="loraloop:upscale",
                                           style=discord.ButtonStyle.secondary))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> UpscaleButton:
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        found = await _generation_for(interaction)
        if found is None:
            return
        image, generation = found
        bot = _bot(interaction)
        width, height = image.width * 2, image.height * 2
        if width * height > bot.settings.upscale_max_pixels:
            await interaction.response.send_message(
                f"This image is already as large as upscaling goes here ({width}×{height} would be over "
                f"{bot.settings.upscale_max_pixels:,} pixels).", ephemeral=True)
            return
        # The versions that made the original, pinned: a newer one since would be another picture.
        styles = tuple(AdapterRef(a["name"] if a.get("version") is None else f"{a['name']}@{a['version']}",
                                  float(a.get("weight", 1.0))) for a in generation.adapters)
        path = bot.store.data_dir / image.path
        spec = replace(Spec.from_generation(generation), styles=styles, count=1, width=width, height=height,
                       seed=image.seed, init_image=await asyncio.to_thread(path.read_bytes),
                       strength=bot.settings.upscale_strength, parent_image_id=image.id)
        await bot.generate.start(interaction, spec)


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"loraloop:delete:(?P<requester>\d+)"):
    def __init__(self, requester: int) -> None:
        self.requester = requester
        super().__init__(discord.ui.Button(emoji="🗑️", label="Delete", custom_id=f"loraloop:delete:{requester}",
                                           style=discord.ButtonStyle.danger))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> DeleteButton:
        return cls(int(match["requester"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = _bot(interaction)
        if interaction.user.id != self.requester and not bot.is_admin(interaction):
            await interaction.response.send_message("Only the person who asked for this image (or an admin) "
                                                    "can delete it.", ephemeral=True)
            return
        await interaction.response.defer()
        if interaction.message is not None:
            image = await bot.store.image_for_message(interaction.message.id)
            if image is not None:
                # Deleted images leave every future dataset; their votes stay for /stats.
                await bot.store.mark_image_deleted(image.id, interaction.user.id)
        await interaction.delete_original_response()
        log.info("message %s deleted by user %s", interaction.message.id if interaction.message else None,
                 interaction.user.id)


class CancelButton(discord.ui.DynamicItem[discord.ui.Button],
                   template=r"loraloop:cancel:(?P<job>[A-Za-z0-9_-]+):(?P<requester>\d+)"):
    def __init__(self, job_id: str, requester: int) -> None:
        self.job_id = job_id
        self.requester = requester
        super().__init__(discord.ui.Button(emoji="❌", label="Cancel",
                                           custom_id=f"loraloop:cancel:{job_id}:{requester}",
                                           style=discord.ButtonStyle.secondary))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> CancelButton:
        return cls(match["job"], int(match["requester"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = _bot(interaction)
        if interaction.user.id != self.requester and not bot.is_admin(interaction):
            await interaction.response.send_message("Only the person who asked (or an admin) can cancel this.",
                                                    ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        from generation.client import ServiceError

        try:
            await bot.service.cancel(self.job_id)
        except ServiceError as exc:
            log.info("job %s: cancel refused: %s", self.job_id, exc)
            await interaction.followup.send("That job has already finished.", ephemeral=True)
            return
        log.info("job %s: cancelled by user %s", self.job_id, interaction.user.id)
        await interaction.followup.send("Cancelled.", ephemeral=True)


class ImagineCaptionButton(discord.ui.DynamicItem[discord.ui.Button], template=r"loraloop:imagine-caption"):
    def __init__(self) -> None:
        super().__init__(discord.ui.Button(emoji="✨", label="Imagine this", custom_id="loraloop:imagine-caption",
                                           style=discord.ButtonStyle.primary))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> ImagineCaptionButton:
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = _bot(interaction)
        embeds = interaction.message.embeds if interaction.message else []
        caption = (embeds[0].description or "") if embeds else ""
        if not caption.strip():
            await interaction.response.send_message("This message no longer holds a prompt; use /describe again.",
                                                    ephemeral=True)
            return
        prompt = caption[:bot.settings.max_prompt_chars]
        side = bot.settings.base_size
        await bot.generate.start(interaction, Spec(prompt=prompt, width=side, height=side))


def describe_view() -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(ImagineCaptionButton())
    return view


def image_view(requester: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in (RerollButton(), VaryButton(), UpscaleButton(), DeleteButton(requester)):
        view.add_item(item)
    return view


def progress_view(job_id: str, requester: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id, requester))
    return view


DYNAMIC_ITEMS = (RerollButton, VaryButton, UpscaleButton, DeleteButton, CancelButton, ImagineCaptionButton)
