"""loraloop: a Discord image bot that learns from its own server's votes.

This small shared package holds what every other package uses: settings (`config`), the
SQLite store (`store`), the tiny offline model (`tiny`) and the `loraloop` command (`cli`).
It imports only the standard library and sqlite-utils at module level, so the bot can use
it without pulling in torch.
"""

__version__ = "0.1.0"
