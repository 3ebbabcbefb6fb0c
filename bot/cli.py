"""`loraloop bot`: run the Discord bot against a running generation service.

    export DISCORD_TOKEN=...            # from https://discord.com/developers/applications
    loraloop serve &                    # the generation service
    loraloop bot                        # or: loraloop bot --service-url http://gpu-box:8765
"""

from __future__ import annotations

import asyncio
import logging

import click

from loraloop.config import Secrets
from loraloop.context import AppContext, pass_app

log = logging.getLogger(__name__)

MISSING_TOKEN = (
    "DISCORD_TOKEN is not set. Create an application at https://discord.com/developers/applications, "
    "open Bot -> Reset Token, copy the token and run `export DISCORD_TOKEN=<token>`; invite the bot "
    "with the 'bot' and 'applications.commands' scopes."
)


async def run_bot(app: AppContext, token: str, service_token: str | None) -> None:
    import discord

    from bot.app import LoraloopBot
    from generation.client import ServiceClient
    from loraloop.store import AsyncStore

    config = app.config
    store = await AsyncStore.open_from_config(config)
    service = ServiceClient(config.bot.service_url, token=service_token)
    try:
        async with LoraloopBot(config, service, store) as bot:
            try:
                await bot.start(token)
            except discord.LoginFailure:
                raise click.ClickException("Discord refused DISCORD_TOKEN; copy a fresh token from the "
                                           "developer portal (Bot -> Reset Token).") from None
            except discord.PrivilegedIntentsRequired:
                raise click.ClickException("Discord refused the bot's intents; check the Bot page of "
                                           "the developer portal.") from None
    finally:
        await service.close()
        await store.close()


@click.command("bot")
@click.option("--service-url", help="The generation service (default: [bot] service_url).")
@pass_app
def bot_command(app: AppContext, service_url: str | None) -> None:
    """Run the Discord bot: /imagine, reaction votes, buttons, /stats.

    \b
    Needs DISCORD_TOKEN in the environment and a running `loraloop serve`:
        export DISCORD_TOKEN=...
        loraloop bot --service-url http://127.0.0.1:8765
    """
    secrets = Secrets.from_env()
    if not secrets.discord_token:
        raise click.ClickException(MISSING_TOKEN)
    if service_url:
        app.config = app.config.replace("bot", service_url=service_url)
    try:
        asyncio.run(run_bot(app, secrets.discord_token, secrets.service_token))
    except KeyboardInterrupt:
        log.info("bot stopped")


commands = [bot_command]
