"""`loraloop console`: the web console alone, in front of a running generation service.

    loraloop console                                   # [console] host:port, the service at [service] host:port
    loraloop console --service-url http://gpu-box:8765 --port 8080

`loraloop run` starts it together with the service (and the bot, with DISCORD_TOKEN); this
command is for a console on another machine than the service, or a second one.
"""

from __future__ import annotations

import asyncio
import logging

import click

from loraloop.config import ConfigError, Secrets
from loraloop.context import AppContext, pass_app

log = logging.getLogger(__name__)


def announce(url: str, login_url: str) -> None:
    """The console's address, and the admin login link, printed once at start (as Jupyter prints its token)."""
    click.echo(f"\n  loraloop console: {url}/\n  admin login (keep it private): {login_url}\n", err=True)


async def serve_console(app: AppContext, secrets: Secrets, service_url: str, host: str | None,
                        port: int | None) -> None:
    from console.app import start_console

    running = await start_console(app.config, secrets, service_url, host=host, port=port)
    announce(running.url, running.login_url)
    try:
        await asyncio.Event().wait()
    finally:
        await running.stop()


@click.command("console")
@click.option("--host", help="Address to listen on (default: [console] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [console] port, 8766).")
@click.option("--service-url", help="The generation service (default: http://[service] host:port).")
@pass_app
def console_command(app: AppContext, host: str | None, port: int | None, service_url: str | None) -> None:
    """Serve the web console: generate, rate, moderate and run the loop in a browser.

    \b
    Examples:
      loraloop console                                  # then open the URL it prints
      LORALOOP_CONSOLE_TOKEN=s3cret loraloop console --host 0.0.0.0
    """
    try:
        secrets = Secrets.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    settings = app.config.service
    url = service_url or f"http://{settings.host}:{settings.port}"
    try:
        asyncio.run(serve_console(app, secrets, url, host, port))
    except KeyboardInterrupt:
        log.info("console stopped")
    except PermissionError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"Cannot listen on {host or app.config.console.host}:"
                                   f"{port if port is not None else app.config.console.port}: "
                                   f"{exc.strerror or exc}. Pick another with --port.") from None


commands = [console_command]
