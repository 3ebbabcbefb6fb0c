"""Reactions on image messages become votes and flags in the store, including missed ones.

One table maps each emoji to what it means (config `rating_emojis` and `flag_emoji`). The raw
gateway events are used, so reactions on messages the bot never cached (older than its last
start) still count. Guard clauses drop the bot's own reactions, unknown emojis and messages
that are not generations.

While the bot is offline Discord sends it nothing, so `catch_up()` re-reads the reactions of
the newest posted images at start and makes the store agree with them: a vote whose reaction
is gone is withdrawn, a reaction without a vote is recorded. Every store call is idempotent,
so a reaction seen both live and by the catch-up counts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord

if TYPE_CHECKING:
    from bot.app import LoraloopBot
    from loraloop.store import Image

log = logging.getLogger(__name__)

FLAG_KIND = "nsfw"  # the 🚩 flag: bad or unsafe, kept out of every dataset
# How long a reaction on a not-yet-linked message waits for the bot to finish recording it.
LINK_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Meaning:
    """What one emoji records: a vote or a flag (exactly one of the two is set)."""

    vote: int | None = None  # +1 or -1
    flag: str | None = None  # a store flag kind


def meanings(rating_emojis: dict[str, int], flag_emoji: str) -> dict[str, Meaning]:
    table = {emoji: Meaning(vote=value) for emoji, value in rating_emojis.items()}
    table[flag_emoji] = Meaning(flag=FLAG_KIND)
    return table


class Votes:
    """The bot's reaction handling; one instance per bot."""

    def __init__(self, bot: LoraloopBot) -> None:
        self.bot = bot
        self.table = meanings(bot.settings.rating_emojis, bot.settings.flag_emoji)
        self._posting = 0
        self._posted = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def posting(self) -> AsyncIterator[None]:
        """Wrap posting an image message and linking it to its image in the store.

        Discord can deliver a reaction on the new message before the store knows which image it
        shows; such a reaction waits for the link instead of being taken for a stranger's message.
        """
        self._posting += 1
        try:
            yield
        finally:
            self._posting -= 1
            async with self._posted:
                self._posted.notify_all()

    async def _image_for(self, message_id: int) -> Image | None:
        image = await self.bot.store.image_for_message(message_id)
        deadline = asyncio.get_running_loop().time() + LINK_WAIT_SECONDS
        while image is None and self._posting:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            async with self._posted:
                try:
                    await asyncio.wait_for(self._posted.wait(), remaining)
                except TimeoutError:
                    return None
            image = await self.bot.store.image_for_message(message_id)
        return image

    def _meaning(self, payload: discord.RawReactionActionEvent) -> Meaning | None:
        if self.bot.user is not None and payload.user_id == self.bot.user.id:
            return None
        if payload.emoji.id is not None:  # custom server emojis carry no meaning here
            return None
        return self.table.get(payload.emoji.name or "")

    async def _meaning_and_image(self, payload: discord.RawReactionActionEvent) -> tuple[Meaning, Image] | None:
        """What a reaction means and the image it is on; None for a reaction that counts for nothing."""
        meaning = self._meaning(payload)
        if meaning is None:
            return None
        image = await self._image_for(payload.message_id)
        if image is None:
            return None
        return meaning, image

    async def on_add(self, payload: discord.RawReactionActionEvent) -> None:
        found = await self._meaning_and_image(payload)
        if found is None:
            return
        meaning, image = found
        emoji = str(payload.emoji)
        if meaning.vote is not None:
            # The name as the server shows it, so reports and `loraloop db raters` name people;
            # a reaction in a DM carries no member, and the name stays as it was.
            name = payload.member.display_name if payload.member is not None else None
            await self.bot.store.set_vote(image.id, payload.user_id, meaning.vote, emoji, name=name)
            log.info("image %s: vote %+d by user %s", image.id, meaning.vote, payload.user_id)
        elif meaning.flag is not None:
            await self.bot.store.flag(image.id, payload.user_id, meaning.flag)
            log.info("image %s: flagged %s by user %s", image.id, meaning.flag, payload.user_id)

    async def on_remove(self, payload: discord.RawReactionActionEvent) -> None:
        found = await self._meaning_and_image(payload)
        if found is None:
            return
        meaning, image = found
        if meaning.vote is not None:
            await self.bot.store.remove_vote(image.id, payload.user_id, str(payload.emoji))
            log.info("image %s: vote withdrawn by user %s", image.id, payload.user_id)
        elif meaning.flag is not None:
            await self.bot.store.unflag(image.id, payload.user_id, meaning.flag)

    async def catch_up(self) -> int:
        """Reconcile the newest posted images with their reactions; returns images re-read."""
        posted = await self.bot.store.posted_images(self.bot.settings.catch_up_messages)
        done = 0
        for image, channel_id in posted:
            if channel_id is None or image.message_id is None:
                continue
            try:
                await self._reconcile(image, image.message_id, channel_id)
            except discord.NotFound:
                continue  # the message was deleted; its votes stay as they were
            except discord.HTTPException as exc:
                log.warning("catch-up: image %s: %s", image.id, exc)
                continue
            done += 1
        log.info("catch-up: re-read reactions of %d image message(s)", done)
        return done

    async def _reconcile(self, image: Image, message_id: int, channel_id: int) -> None:
        channel = self.bot.get_partial_messageable(channel_id)
        message = await channel.fetch_message(message_id)
        me = self.bot.user.id if self.bot.user else None
        present: dict[str, dict[int, str]] = {}  # emoji -> user id -> display name
        for reaction in message.reactions:
            emoji = str(reaction.emoji)
            if emoji not in self.table or reaction.count == (1 if reaction.me else 0):
                continue
            present[emoji] = {user.id: user.display_name async for user in reaction.users(limit=None)
                              if user.id != me}
        for vote in await self.bot.store.votes_for(image.id):
            if vote.user_id not in present.get(vote.emoji, {}):
                await self.bot.store.remove_vote(image.id, vote.user_id, vote.emoji)
        for user_id, kind in await self.bot.store.flags_for(image.id):
            if kind == FLAG_KIND and user_id not in present.get(self.bot.settings.flag_emoji, {}):
                await self.bot.store.unflag(image.id, user_id, kind)
        for emoji, users in present.items():
            meaning = self.table[emoji]
            for user_id, name in sorted(users.items()):
                if meaning.vote is not None:
                    await self.bot.store.set_vote(image.id, user_id, meaning.vote, emoji, name=name)
                elif meaning.flag is not None:
                    await self.bot.store.flag(image.id, user_id, meaning.flag)
