"""`loraloop db`: where the feedback database lives and what is in it, for admins."""

from __future__ import annotations

import json
from typing import Any

import click

from loraloop import experiments
from loraloop.context import AppContext, pass_app
from loraloop.raters import RaterSettings, estimate
from loraloop.store import Store, StoreError


def open_store(app: AppContext) -> Store:
    """The configured store, with store problems turned into one-line CLI errors."""
    if not app.config.database_path.exists():
        raise click.ClickException(
            f"No database at {app.config.database_path} yet ({app.config.whereabouts()}): the bot creates it "
            "on first use (check --config and $LORALOOP_DATA_DIR if you expected one)."
        )
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
    """Row counts, schema version, file size, how each adapter version is received, and the
    running A/B experiments with the gate's current verdict.

    \b
        loraloop db stats
        loraloop db stats --json | jq .counts.ratings
        loraloop db stats --json | jq '.experiments[] | {adapter, verdict}'
    """
    gate = experiments.GateSettings.from_config(app.config.loop)
    raters = RaterSettings.from_config(app.config.curation)
    with open_store(app) as store:
        running = []
        for experiment in store.experiments(status="running"):
            verdict = experiments.experiment_verdict(store, experiment, gate, raters)
            running.append({"adapter": experiment.adapter, "control_version": experiment.control_version,
                             "candidate_version": experiment.candidate_version, "share": experiment.share,
                             "started_at": experiment.started_at, "verdict": verdict.to_dict(),
                             "summary": experiments.describe(experiment, verdict)})
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
            "experiments": running,
            "decisions": [
                {"experiment_id": d.experiment_id, "decision": d.decision, "reason": d.reason,
                 "decided_by": d.decided_by, "p_better": d.figures.get("p_better"), "at": d.created_at}
                for d in store.experiment_decisions()
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
    if running:
        click.echo("Running experiments (weighted votes; the gate's verdict now):")
    for row in running:
        click.echo(f"  {row['summary']}")
    if report["decisions"]:
        latest = [f"{d['decision']} ({d['reason'].replace('_', ' ')}, by {d['decided_by']})"
                  for d in report["decisions"][-3:]]
        click.echo(f"Decisions: {len(report['decisions'])}, the latest: " + ", ".join(latest))


@db.command()
@click.option("--adapter", help="Only votes on images made with this adapter (NAME or NAME@VERSION).")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Raters to list, most votes first; 0 lists all.")
@click.option("--json", "as_json", is_flag=True, help="Print every rater as a JSON list.")
@pass_app
def raters(app: AppContext, adapter: str | None, limit: int, as_json: bool) -> None:
    """Who votes, how often they agree with everyone else, and what their votes weigh.

    The weight (0 to 1) is what the rater model (the README's admin section) makes of each
    person's votes, the same weight curation and the A/B gate use; "agrees" is the share of their
    votes that side with everyone else's consensus on the same image.

    \b
        loraloop db raters
        loraloop db raters --adapter fox@3
        loraloop db raters --json --limit 0 | jq '.[] | select(.weight == 0)'
    """
    name, _, pinned = (adapter or "").partition("@")
    if pinned and not pinned.isdigit():
        raise click.UsageError("write the adapter as NAME or NAME@VERSION")
    with open_store(app) as store:
        votes = store.rated_votes(adapter=name or None, adapter_version=int(pinned) if pinned else None)
        model = estimate(votes, RaterSettings.from_config(app.config.curation))
        names = store.user_names(model.raters)
    listed = sorted(model.raters.values(), key=lambda r: (-r.votes, r.user_id))
    if limit:
        listed = listed[:limit]
    if as_json:
        click.echo(json.dumps([{"name": names.get(r.user_id), **r.to_dict()} for r in listed], indent=2))
        return
    if not listed:
        click.echo("No votes yet" + (f" on images of {adapter}." if adapter else "."))
        return
    click.echo(f"{len(model.raters)} raters, {len(votes):,} votes; weight 0-1 (a new rater: "
               f"{model.settings.prior_weight:.2f})")
    click.echo(f"  {'rater':<24} {'votes':>7} {'likes':>6} {'agrees':>7} {'weight':>7}  why")
    for rater in listed:
        who = names.get(rater.user_id) or str(rater.user_id)
        agrees = "-" if rater.agreement is None else f"{rater.agreement:.0%}"
        click.echo(f"  {who[:24]:<24} {rater.votes:>7,} {rater.likes / rater.votes:>6.0%} {agrees:>7} "
                   f"{rater.weight:>7.2f}  {rater.explain()}")


commands = [db]
