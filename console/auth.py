"""Who is asking: sessions (a cookie), the admin token, CSRF tokens and per-identity rate limits.

Every visitor gets a session cookie on the first page (HttpOnly, SameSite=Strict); the session
carries its CSRF token, which every POST must echo (a form field `csrf` or the `X-CSRF-Token`
header), so even the login form cannot be posted from another site. Logging in with a name
gives the session the web identity `web:<name>`; the admin token (LORALOOP_CONSOLE_TOKEN, or
one made at start and printed in the login URL, as Jupyter does) makes it an admin session.
Sessions live in memory: a restart logs everyone out, which is the safe direction.
"""

from __future__ import annotations

import collections
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

COOKIE = "loraloop_console"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
SESSION_IDLE_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000  # a flood of cookie-less requests must not grow memory without end


@dataclass
class Session:
    id: str
    csrf: str
    name: str | None = None  # the web identity is f"web:{name}"
    user_id: int | None = None  # Store.web_user(name)
    admin: bool = False
    seen: float = field(default_factory=time.monotonic)
    skipped: set[int] = field(default_factory=set)  # rate-a-batch: images passed over

    @property
    def identity(self) -> str | None:
        return f"web:{self.name}" if self.name else None


class Sessions:
    def __init__(self, admin_token: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.admin_token = admin_token
        self._clock = clock
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def get(self, session_id: str | None) -> Session | None:
        session = self._sessions.get(session_id or "")
        if session is None or self._clock() - session.seen > SESSION_IDLE_SECONDS:
            return None
        session.seen = self._clock()
        self._sessions.move_to_end(session.id)
        return session

    def new(self) -> Session:
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), seen=self._clock())
        self._sessions[session.id] = session
        return session

    def renew(self, session: Session) -> Session:
        """A fresh id and CSRF token for a session whose privileges change (login), against fixation."""
        self._sessions.pop(session.id, None)
        fresh = self.new()
        fresh.name, fresh.user_id, fresh.admin = session.name, session.user_id, session.admin
        return fresh

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def is_admin_token(self, candidate: str) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), self.admin_token.encode())


def set_cookie(response: web.StreamResponse, session: Session, secure: bool) -> None:
    response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", secure=secure, path="/")


def csrf_ok(session: Session, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(str(submitted).encode(), session.csrf.encode())


class RateLimiter:
    """At most `limit` events per identity in any `window` seconds (a sliding window)."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self._clock = limit, window, clock
        self._events: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def allow(self, identity: str) -> bool:
        """Count one event for `identity`; False (and not counted) when over the limit."""
        now = self._clock()
        events = self._events[identity]
        while events and now - events[0] >= self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def retry_after(self, identity: str) -> int:
        events = self._events.get(identity)
        if not events:
            return 0
        return max(1, round(self.window - (self._clock() - events[0])))
