"""`loraloop run`: the generation service and the Discord bot together, for a single machine.

    export DISCORD_TOKEN=...        # see the README's "Discord setup"
    loraloop run                    # service on [service] host:port, bot talking to it

The service may also run alone on a GPU box (`loraloop serve`) with `loraloop bot` elsewhere;
this command is the one-machine shortcut and shares one event loop between the two. With
`[loop] start_with_run = true` it also starts `loraloop loop` (rounds that run themselves) as a
child process: training holds the GIL for long stretches, which the bot's event loop must never
wait on, so it gets a process of its own, stopped when this command stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import click

from loraloop.config import ConfigError, Secrets
from loraloop.context import AppContext, pass_app

log = logging.getLogger(__name__)

NO_TOKEN_HINT = (
    "\n\nTo try the generation service without Discord: `loraloop serve --model tiny`, then "
    "`loraloop imagine \"a red fox\" -o fox.png` in another terminal."
)


async def run_service_and_bot(app: AppContext, secrets: Secrets) -> None:
    """Start the service, point the bot at it, and stop both when either ends."""
    from bot.cli import run_bot
    from generation.server import exposure_refusal, start_service

    settings = app.config.service
    refusal = exposure_refusal(settings.host, secrets.service_token)
    if refusal:
        raise click.ClickException(f"{refusal} ([service] host).")
    service = await start_service(app.config, secrets, host=settings.host, port=settings.port)
    log.info("generation service ready at %s (model %s)", service.url, settings.model)
    loop = await start_loop(app, service.url) if app.config.loop.start_with_run else None
    try:
        app.config = app.config.replace("bot", service_url=service.url)
        await run_bot(app, secrets.discord_token or "", secrets.service_token)
    finally:
        if loop is not None:
            await stop_loop(loop)
        await service.stop()


async def start_loop(app: AppContext, service_url: str) -> asyncio.subprocess.Process:
    """`loraloop loop` as a child process with this command's config, told where the service is."""
    config_args = ["--config", str(app.config.source)] if app.config.source is not None else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loraloop", *config_args, "loop", "--service-url", service_url)
    log.info("loop started (process %d)", process.pid)
    return process


async def stop_loop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()
            await process.wait()
    log.info("loop stopped")


@click.command("run")
@click.option("--model", help="Model id, local directory, .safetensors file, or 'tiny' (default: [service] model).")
@click.option("--port", type=click.IntRange(1, 65535), help="Service port (default: [service] port).")
@pass_app
def run(app: AppContext, model: str | None, port: int | None) -> None:
    """Run the generation service and the Discord bot together on this machine.

    \b
    Examples:
      export DISCORD_TOKEN=...            # see the README: Discord setup
      loraloop run                        # the model from config.toml ("tiny" by default: offline)
      loraloop run --model stable-diffusion-v1-5/stable-diffusion-v1-5
    """
    from bot.cli import MISSING_TOKEN
    from generation.pipeline import ModelLoadError

    secrets = Secrets.from_env()
    if not secrets.discord_token:
        raise click.ClickException(MISSING_TOKEN + NO_TOKEN_HINT)
    changes = {k: v for k, v in {"model": model, "port": port}.items() if v}
    if changes:
        try:
            app.config = app.config.replace("service", **changes)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        asyncio.run(run_service_and_bot(app, secrets))
    except KeyboardInterrupt:
        log.info("stopped")
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        settings = app.config.service
        raise click.ClickException(
            f"Cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}. "
            "Stop whatever uses that port, or pick another with --port."
        ) from None


commands = [run]
