"""loraloop: a Discord image bot that learns from its own server's votes.

This small shared package is the floor every other package stands on: settings (`config`),
the SQLite store (`store`), what a subcommand is handed (`context`) and the tiny offline models
(`tiny`). The floor imports only the standard library, click and sqlite-utils at module level, so
the bot can use it without pulling in torch, and never imports `bot`, `generation` or `training`.
The roof is `cli` (the `loraloop` command, which gathers every package's verbs) and `run`
(service and bot in one process); nothing imports them but the entry points.
"""

__version__ = "0.1.0"
