"""Who may generate what, where and how often: the bot's refusals, decided before any work starts.

`Limits.check()` answers one request with `None` (go ahead) or a `Refusal` whose message is one
short sentence saying why and what to do; the command shows it ephemerally. The checks are
in-memory and cheap so they run before the interaction is deferred.

Bans outlive restarts: they live in `DATA_DIR/bans.json` through `loraloop.bans.Bans`, which the
web console shares, so a ban made in either place holds in both.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraloop.bans import Bans
from loraloop.config import BotConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, in a sentence meant for the person who made it."""

    reason: str
    message: str


@dataclass
class _UserState:
    queued: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    last_request: float = float("-inf")


class Limits:
    """Per-user caps and cooldown, blocked terms, the channel allowlist and bans."""

    def __init__(self, config: BotConfig, bans_path: Path | None = None,
                 clock=time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._users: dict[int, _UserState] = {}
        self.bans = Bans(bans_path)
        # Whole words or phrases, case-insensitive: "gore" blocks "Gore!" but not "gorey".
        self._blocked = [
            (term, re.compile(rf"(?<!\w){re.escape(term)}(?!\w)", re.IGNORECASE))
            for term in config.blocked_terms if term.strip()
        ]

    # ---- bans (loraloop/bans.py: the file the web console shares) --------------------------

    def ban(self, user_id: int) -> bool:
        """Ban a user; False if they already were."""
        return self.bans.ban(user_id)

    def unban(self, user_id: int) -> bool:
        return self.bans.unban(user_id)

    def is_banned(self, user_id: int) -> bool:
        return self.bans.is_banned(user_id)

    # ---- checks ------------------------------------------------------------------------------

    def check_place(self, channel_id: int | None, in_dm: bool) -> Refusal | None:
        if in_dm:
            if not self.config.allow_dms:
                return Refusal("dm", "I don't make images in DMs here; use /imagine in the server.")
            return None
        if self.config.channels and channel_id not in self.config.channels:
            where = ", ".join(f"<#{c}>" for c in self.config.channels)
            return Refusal("channel", f"I only make images in {where}; try /imagine there.")
        return None

    def blocked_term(self, *texts: str) -> str | None:
        for term, pattern in self._blocked:
            if any(pattern.search(text) for text in texts if text):
                return term
        return None

    def check(self, user_id: int, prompt: str, negative: str = "") -> Refusal | None:
        """Ban, prompt length, blocked terms, per-user caps, then the cooldown."""
        if self.is_banned(user_id):
            return Refusal("banned", "You can't make images on this server; ask a moderator if you think that's wrong.")
        if len(prompt) > self.config.max_prompt_chars:
            return Refusal("prompt_too_long", f"That prompt is {len(prompt)} characters; keep it under "
                                              f"{self.config.max_prompt_chars}.")
        term = self.blocked_term(prompt, negative)
        if term is not None:
            return Refusal("blocked_term", f"Your prompt contains a blocked term ({term!r}); please rephrase it.")
        state = self._users.get(user_id)
        if state is not None:
            active = len(state.queued) + len(state.running)
            if active >= self.config.max_active_per_user:
                return Refusal("active_cap", f"You already have {active} jobs in progress; wait for one to "
                                             "finish (or cancel one) and try again.")
            if len(state.queued) >= self.config.max_queued_per_user:
                return Refusal("queued_cap", f"You already have {len(state.queued)} jobs waiting; wait for "
                                             "them to start and try again.")
            wait = state.last_request + self.config.cooldown_seconds - self._clock()
            if wait > 0:
                return Refusal("cooldown", f"Slow down a little: try again in {wait:.0f} s." if wait >= 1
                               else "Slow down a little: try again in a second.")
        return None

    # ---- job bookkeeping ---------------------------------------------------------------------

    def started(self, user_id: int, job_key: str) -> None:
        """A request passed the checks: count it as queued and start the cooldown."""
        state = self._users.setdefault(user_id, _UserState())
        state.queued.add(job_key)
        state.last_request = self._clock()

    def running(self, user_id: int, job_key: str) -> None:
        state = self._users.setdefault(user_id, _UserState())
        state.queued.discard(job_key)
        state.running.add(job_key)

    def finished(self, user_id: int, job_key: str) -> None:
        state = self._users.get(user_id)
        if state is None:
            return
        state.queued.discard(job_key)
        state.running.discard(job_key)

    def active(self, user_id: int) -> int:
        state = self._users.get(user_id)
        return 0 if state is None else len(state.queued) + len(state.running)
