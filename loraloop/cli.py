"""The `loraloop` command: a click group whose verbs live with the package that owns them.

    loraloop serve --model tiny          # the generation service, offline, in seconds
    loraloop imagine "a red fox" -o fox.png

The roof of the house: each package exposes its commands in its own `cli` module (which takes
`AppContext`/`pass_app` from the floor, `loraloop.context`); this file only gathers them, so the
group stays one screen long and nothing below imports it.
"""

from __future__ import annotations

import logging

import click

from bot.cli import commands as bot_commands
from console.cli import commands as console_commands
from generation.cli import commands as generation_commands
from loraloop import __version__
from loraloop.context import AppContext
from loraloop.db_cli import commands as db_commands
from loraloop.run import commands as run_commands
from training.cli import commands as training_commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loraloop")
@click.option(
    "--config",
    "config_path",
    envvar="LORALOOP_CONFIG",
    type=click.Path(dir_okay=False),
    help="Settings file (default: $LORALOOP_CONFIG, else ./config.toml, ~/.config/loraloop/config.toml, "
         "then the checkout's config.toml).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """loraloop: a Discord image bot that learns from its own server's votes."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = AppContext(config_path)


for command in [*run_commands, *generation_commands, *training_commands, *db_commands, *bot_commands,
                *console_commands]:
    cli.add_command(command)


def main() -> None:
    cli()

