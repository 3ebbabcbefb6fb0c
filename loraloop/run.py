"""`loraloop run`: the generation service, the web console and the Discord bot together, on one machine.

    loraloop run                    # service on [service] host:port, console on [console] host:port
    export DISCORD_TOKEN=...        # see the README's "Discord setup"
    loraloop run                    # ... and the bot, all three on one store

Without DISCORD_TOKEN it runs the service and the console (what `make run` starts): generate,
rate, curate, train and publish in a browser. The service may also run alone on a GPU box
(`loraloop serve`) with `loraloop bot` and `loraloop console` elsewhere; this command is the
one-machine shortcut and shares one event loop between them. With
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



async def run_all(app: AppContext, secrets: Secrets) -> None:
    """Start the service and the console in front of it, and the bot when there is a Discord token;
    stop them all when any ends (or on Ctrl-C)."""
    from console.app import exposure_refusal as console_refusal
    from console.app import start_console
    from console.cli import announce
    from generation.server import exposure_refusal, start_service

    settings = app.config.service
    refusal = exposure_refusal(settings.host, secrets.service_token)
    if refusal:
        raise click.ClickException(f"{refusal} ([service] host).")
    refusal = console_refusal(app.config.console.host, secrets.console_token)
    if refusal:
        raise click.ClickException(f"{refusal} ([console] host).")
    service = await start_service(app.config, secrets, host=settings.host, port=settings.port)
    log.info("generation service ready at %s (model %s)", service.url, settings.model)
    loop = None
    try:
        console = await start_console(app.config, secrets, service.url)
        try:
            announce(console.url, console.login_url)
            loop = await start_loop(app, service.url) if app.config.loop.start_with_run else None
            if secrets.discord_token:
                from bot.cli import run_bot

                app.config = app.config.replace("bot", service_url=service.url)
                await run_bot(app, secrets.discord_token, secrets.service_token)
            else:
                log.info("no DISCORD_TOKEN: running the service and the web console only")
                await asyncio.Event().wait()
        finally:
            if loop is not None:
                await stop_loop(loop)
            await console.stop()
    finally:
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
    """Run the generation service and the web console (and, with DISCORD_TOKEN, the bot) on this machine.

    \b
    Examples:
      loraloop run                        # service + console; open the URL it prints
      export DISCORD_TOKEN=...            # see the README: Discord setup
      loraloop run                        # service + console + bot, one store
      loraloop run --model stable-diffusion-v1-5/stable-diffusion-v1-5
    """
    from generation.pipeline import ModelLoadError

    try:
        secrets = Secrets.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    changes = {k: v for k, v in {"model": model, "port": port}.items() if v}
    if changes:
        try:
            app.config = app.config.replace("service", **changes)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        asyncio.run(run_all(app, secrets))
    except KeyboardInterrupt:
        log.info("stopped")
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        settings = app.config.service
        raise click.ClickException(
            f"Cannot listen on {settings.host}:{settings.port} (service) or {app.config.console.host}:"
            f"{app.config.console.port} (console): {exc.strerror or exc}. "
            "Stop whatever uses that port, or pick another with --port or [console] port."
        ) from None


commands = [run]
