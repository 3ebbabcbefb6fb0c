"""What every `loraloop` subcommand is handed: the settings, loaded once and only when first needed.

Floor: imports only the standard library, click and `loraloop.config`. Each package's `cli` module
imports `AppContext` and `pass_app` from here; only the command line's roof (`loraloop.cli`) imports
those modules, so no package ever needs the roof.
"""

from __future__ import annotations

import click

from loraloop.config import Config, ConfigError, load_config


class AppContext:
    """The config for one invocation, loaded on first use so `--help` never reads a file."""

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
