"""The Discord client: wiring of commands, buttons, reactions and the start-up catch-up.

`LoraloopBot` is built with its collaborators (the service client and the store) so tests can
hand it real ones pointed at loopback. `setup_hook` does the slow start-up work once, before
the gateway connects: register the slash commands and the persistent buttons, sync commands.
After READY, reactions missed while offline are re-read in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.gate import Gate
from bot.imagine import Generate
from bot.limits import Limits
from bot.reactions import Votes
from bot.views import DYNAMIC_ITEMS
from loraloop.bans import BANS_FILE
from loraloop.config import Config

if TYPE_CHECKING:
    from generation.client import ServiceClient
    from generation.contract import AdapterInfo
    from loraloop.store import AsyncStore

log = logging.getLogger(__name__)

# How long the list of styles is trusted for autocomplete and for checking a chosen style.
STYLES_TTL_S = 60.0


class CommandTree(app_commands.CommandTree):
    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """No traceback ever reaches a user: log it, answer with a reference."""
        from bot.commands import OptionRefused

        if isinstance(error, app_commands.CheckFailure):
            text = str(error) or "You can't use that command here."
        elif isinstance(error, OptionRefused):
            text = str(error)
        else:
            log.error("interaction %s (/%s) failed", interaction.id,
                      interaction.command.qualified_name if interaction.command else "?", exc_info=error)
            text = f"Something went wrong (reference `{interaction.id}`); it has been logged."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("interaction %s: could not tell the user about the error", interaction.id)


class LoraloopBot(discord.Client):
    def __init__(self, config: Config, service: ServiceClient, store: AsyncStore, *,
                 limits: Limits | None = None, **client_options: Any) -> None:
        # Reactions come as raw events, so no message cache or message-content intent is needed.
        intents = discord.Intents(guilds=True, guild_reactions=True, dm_reactions=True)
        # Prompts are user text: "@everyone" in one must not ping the server.
        super().__init__(intents=intents, max_messages=None, allowed_mentions=discord.AllowedMentions.none(),
                         **client_options)
        self.config = config
        self.settings = config.bot
        self.service = service
        self.store = store
        self.limits = limits or Limits(config.bot, bans_path=config.data_dir / BANS_FILE)
        self.tree = CommandTree(self)
        self.generate = Generate(self)
        self.votes = Votes(self)
        self.gate = Gate(self)
        self._styles: list[AdapterInfo] | None = None
        self._styles_at = 0.0
        self.caught_up = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._announcer: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        from bot.commands import register

        register(self)
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        if self.settings.guild_ids:
            for guild_id in self.settings.guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()
        self.spawn(self._catch_up())
        self._announcer = asyncio.create_task(self.gate.run_announcer())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background, kept referenced until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _catch_up(self) -> None:
        await self.wait_until_ready()
        try:
            await self.votes.catch_up()
        except Exception:  # a failed catch-up must not take the bot down; live votes still work
            log.exception("catch-up of offline reactions failed")
        try:
            await self.generate.resume_unfinished()
        except Exception:  # likewise: new jobs still work
            log.exception("resuming unfinished jobs failed")
        finally:
            self.caught_up.set()

    async def close(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        await self.generate.stop()
        await super().close()

    # ---- reactions ---------------------------------------------------------------------------

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.votes.on_add(payload)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.votes.on_remove(payload)

    # ---- shared helpers ----------------------------------------------------------------------

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """An admin has one of `admin_role_ids`, or Discord's Administrator permission here."""
        roles = {role.id for role in getattr(interaction.user, "roles", [])}
        return bool(roles & set(self.settings.admin_role_ids)) or interaction.permissions.administrator

    async def styles(self, refresh: bool = False) -> list[AdapterInfo]:
        """The service's shared adapters (never anyone's personal style), cached for a minute
        (autocomplete asks on every keystroke)."""
        from loraloop.profiles import personal_owner

        if refresh or self._styles is None or time.monotonic() - self._styles_at > STYLES_TTL_S:
            self._styles = [a for a in await self.service.adapters() if personal_owner(a.name) is None]
            self._styles_at = time.monotonic()
        return self._styles

    def forget_styles(self) -> None:
        """Drop the cached styles (after a reload), so the next use asks the service."""
        self._styles = None
