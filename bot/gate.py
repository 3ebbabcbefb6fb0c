"""The A/B gate as Discord sees it: experiments in /stats, an admin's /admin promote|retire, and
every experiment's start and decision posted in the admin channel.

The gate itself is the floor's (`loraloop.experiments`); the loop (`loraloop loop`) decides in
its own process and records decisions in the store, so this module polls the store for what it
has not announced yet: nothing is lost when either process restarts, and nothing is posted twice
(an announcement is marked in the same store that holds it). Store calls run on the store's
thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import discord

from loraloop import experiments
from loraloop.experiments import ADMIN, PROMOTE, RETIRE, GateSettings, experiment_verdict
from loraloop.raters import RaterSettings

if TYPE_CHECKING:
    from bot.app import LoraloopBot
    from loraloop.store import Announcement

log = logging.getLogger(__name__)

# Seconds between two looks for decisions to announce: the loop itself decides every poll_seconds.
ANNOUNCE_EVERY_S = 15.0


class Gate:
    """The bot's side of the experiments; one per bot."""

    def __init__(self, bot: LoraloopBot) -> None:
        self.bot = bot
        self.settings = GateSettings.from_config(bot.config.loop)
        self.raters = RaterSettings.from_config(bot.config.curation)

    async def lines(self) -> list[str]:
        """One line per running experiment: arms, votes, like rates and the gate's verdict."""
        out = []
        for experiment in await self.bot.store.experiments(status="running"):
            verdict = await self.bot.store.call(experiment_verdict, experiment, self.settings, self.raters)
            out.append(experiments.describe(experiment, verdict))
        return out

    async def decide(self, style: str, decision: str, user_id: int) -> str:
        """An admin's override: promote or retire NAME's running candidate now; what to tell them."""
        experiment = await self.bot.store.running_experiment(style)
        if experiment is None:
            return f"No experiment is running for {style}; `/stats` lists the running ones."
        verdict = await self.bot.store.call(experiment_verdict, experiment, self.settings, self.raters)
        decided = await self.bot.store.decide_experiment(
            experiment.id, decision=decision, reason=ADMIN, decided_by=f"admin:{user_id}", figures=verdict.to_dict())
        if not decided:
            return f"{style} v{experiment.candidate_version} was decided a moment ago; see the admin channel."
        log.info("admin %s: %s %s v%d", user_id, decision, style, experiment.candidate_version)
        self.bot.spawn(self.announce_pending())
        if decision == PROMOTE:
            return f"Promoted {style} v{experiment.candidate_version}: `/imagine style:{style}` gets it from now on."
        return (f"Retired {style} v{experiment.candidate_version}: `/imagine style:{style}` keeps "
                f"v{experiment.control_version}.")

    async def run_announcer(self) -> None:
        """Announce what the store holds and has not announced, every ANNOUNCE_EVERY_S, until cancelled."""
        await self.bot.wait_until_ready()
        while not self.bot.is_closed():
            try:
                await self.announce_pending()
            except Exception:  # a failed post is retried next time; the bot carries on
                log.exception("announcing experiment decisions failed")
            await asyncio.sleep(ANNOUNCE_EVERY_S)

    async def announce_pending(self) -> int:
        """Post every pending start and decision in the admin channel; returns how many."""
        channel_id = self.bot.config.loop.admin_channel_id
        done = 0
        for item in await self.bot.store.pending_announcements():
            text = announcement_text(item)
            if channel_id:
                try:
                    await self.bot.get_partial_messageable(channel_id).send(
                        text, allowed_mentions=discord.AllowedMentions.none())
                except discord.HTTPException as exc:  # not marked: the next round tries again
                    log.warning("could not announce in channel %s (%s): %s", channel_id, exc, text)
                    break
            log.info("announced: %s", text)
            await self.bot.store.mark_announced(item)
            done += 1
        return done


def announcement_text(item: Announcement) -> str:
    e = item.experiment
    if item.kind == "started" or item.decision is None:
        return (f"🧪 **{e.adapter} v{e.candidate_version}** is on trial against v{e.control_version}: "
                f"{e.share:.0%} of `/imagine style:{e.adapter}` requests get it until the gate decides.")
    d = item.decision
    figures = d.figures
    control, candidate = figures.get("control", {}), figures.get("candidate", {})

    def rate(arm: dict) -> str:
        value = arm.get("like_rate")
        return f"{'-' if value is None else f'{value:.0%}'} of {arm.get('votes', 0)} votes"

    who = "an admin" if d.decided_by.startswith("admin:") else "the gate"
    odds = f"P(better) {figures.get('p_better', 0.5):.2f}"
    details = f"v{e.candidate_version} {rate(candidate)} vs v{e.control_version} {rate(control)}, {odds}"
    if d.decision == PROMOTE:
        return (f"✅ **{e.adapter} v{e.candidate_version}** promoted by {who} ({d.reason.replace('_', ' ')}: "
                f"{details}): `/imagine style:{e.adapter}` now gets it.")
    if d.decision == RETIRE:
        return (f"🗑️ **{e.adapter} v{e.candidate_version}** retired by {who} ({d.reason.replace('_', ' ')}: "
                f"{details}): `/imagine style:{e.adapter}` keeps v{e.control_version}.")
    return f"{e.adapter} v{e.candidate_version}: {d.decision}"
