"""The web console: generate, rate and run the loop in a browser, without Discord.

A package beside `bot/`: it speaks HTTP to people as the bot speaks Discord, and uses the same
owners underneath (the store for votes and flags, `generation.client` for the service,
`loraloop.bans`, `loraloop.experiments`, and training's own functions for curate, train, compare
and publish). Pages are rendered on the server (Jinja2, templates/), with a little plain
JavaScript (static/console.js) for live progress over EventSource and keyboard rating.
"""
