"""Bans: who may not generate, kept in `DATA_DIR/bans.json` and shared by the bot and the web console.

On the floor (stdlib only). The file is written atomically (a ban lifted by a crash would be a
bug a moderator notices) and re-read whenever it changed on disk, so a ban made in the console
stops the person in Discord too, and the other way round, without a restart. A user id is a
Discord id (positive) or a web console identity's id (negative, `Store.web_user`).

    bans = Bans(config.data_dir / BANS_FILE)
    bans.ban(1234); bans.is_banned(1234)  # True
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

BANS_FILE = "bans.json"


class Bans:
    """The banned user ids; `path` None keeps them in memory only (tests, a bot without a data dir)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._banned: set[int] = set()
        self._refresh()

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._banned, self._seen = set(), None
            return
        if self._seen == (stat.st_mtime_ns, stat.st_size):
            return
        try:
            self._banned = {int(uid) for uid in json.loads(self.path.read_text())["banned"]}
        except (ValueError, KeyError, TypeError) as exc:
            # Refusing to go on is safer than silently unbanning everyone.
            raise RuntimeError(f"{self.path}: cannot read bans ({exc}); fix or delete the file") from exc
        self._seen = (stat.st_mtime_ns, stat.st_size)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"banned": sorted(self._banned)}))
        os.replace(tmp, self.path)
        stat = self.path.stat()
        self._seen = (stat.st_mtime_ns, stat.st_size)

    def ban(self, user_id: int) -> bool:
        """Ban a user; False if they already were."""
        with self._lock:
            self._refresh()
            if user_id in self._banned:
                return False
            self._banned.add(user_id)
            self._save()
        log.info("banned user %s", user_id)
        return True

    def unban(self, user_id: int) -> bool:
        with self._lock:
            self._refresh()
            if user_id not in self._banned:
                return False
            self._banned.discard(user_id)
            self._save()
        log.info("unbanned user %s", user_id)
        return True

    def is_banned(self, user_id: int) -> bool:
        with self._lock:
            self._refresh()
            return user_id in self._banned
