"""`loraloop db`: where the feedback database lives and what is in it, for admins."""

from __future__ import annotations

import json
from typing import Any

import click

from loraloop.context import AppContext, pass_app
from loraloop.store import Store, StoreError


def open_store(app: AppContext) -> Store:
    """The configured store, with store problems turned into one-line CLI errors."""
    try:
        return Store.from_config(app.config)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def db() -> None:
    """The feedback database: prompts, images, votes, flags, adapters."""


@db.command()
@pass_app
def path(app: AppContext) -> None:
    """Print the database file's path, to open it in Datasette or the sqlite-utils CLI.

    \b
        loraloop db path
        datasette "$(loraloop db path)"
        sqlite-utils tables "$(loraloop db path)" --counts
    """
    click.echo(str(app.config.database_path))
    click.echo(f"({app.config.whereabouts()})", err=True)  # stderr: "$(loraloop db path)" stays the path


@db.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@pass_app
def stats(app: AppContext, as_json: bool) -> None:
    """Row counts, schema version, file size and how each adapter version is received.

    \b
        loraloop db stats
        loraloop db stats --json | jq .counts.ratings
    """
    if not app.config.database_path.exists():
        raise click.ClickException(
            f"No database at {app.config.database_path} yet ({app.config.whereabouts()}): the bot creates it "
            "on first use (check --config and $LORALOOP_DATA_DIR if you expected one)."
        )
    with open_store(app) as store:
        report: dict[str, Any] = {
            "database": str(store.db_path),
            "size_bytes": store.db_path.stat().st_size,
            "schema": store.schema_version(),
            "counts": store.counts(),
            "adapters": [
                {"adapter": s.adapter, "version": s.version, "images": s.images, "votes": s.votes,
                 "likes": s.likes, "like_rate": s.like_rate}
                for s in store.adapter_stats()
            ],
        }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['database']} ({report['size_bytes'] / 1e6:.1f} MB, "
               f"schema {report['schema'][-1]})")
    for table, rows in report["counts"].items():
        click.echo(f"  {table:<14} {rows:>10,}")
    if report["adapters"]:
        click.echo("Adapter versions (images, votes, like rate):")
    for row in report["adapters"]:
        name = row["adapter"] or "base model"
        if row["version"] is not None:
            name += f" v{row['version']}"
        rate = "-" if row["like_rate"] is None else f"{row['like_rate']:.0%}"
        click.echo(f"  {name:<24} {row['images']:>8,} {row['votes']:>8,} {rate:>6}")


commands = [db]
