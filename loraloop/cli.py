"""The `loraloop` command: a click group whose verbs live with the package that owns them.

    loraloop serve --model tiny          # the generation service, offline, in seconds
    loraloop imagine "a red fox" -o fox.png

Each package exposes its commands in its own `cli` module; this file only gathers them, so
the group stays one screen long.
"""

from __future__ import annotations

import logging

import click

from loraloop import __version__
from loraloop.config import Config, ConfigError, load_config


class AppContext:
    """What every subcommand gets: the config, loaded once and only when first needed."""

    def __init__(self, config_path: str | None) -> None:
        self._config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self._config_path)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
        return self._config

    @config.setter
    def config(self, value: Config) -> None:
        self._config = value


pass_app = click.make_pass_decorator(AppContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loraloop")
@click.option(
    "--config",
    "config_path",
    envvar="LORALOOP_CONFIG",
    type=click.Path(dir_okay=False),
    help="Settings file (default: ./config.toml, or $LORALOOP_CONFIG).",
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


def _register() -> None:
    # Imported here, not at the top, so each package's module can import `pass_app` from us.
    from bot.cli import commands as bot_commands
    from generation.cli import commands as generation_commands
    from loraloop.db_cli import commands as db_commands
    from loraloop.run import commands as run_commands
    from training.cli import commands as training_commands

    for command in [*run_commands, *generation_commands, *training_commands, *db_commands, *bot_commands]:
        cli.add_command(command)


_register()


def main() -> None:
    cli()

