"""The Discord bot: slash commands, progress messages, buttons and reaction votes."""
