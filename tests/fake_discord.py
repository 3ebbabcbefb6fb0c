"""A fake Discord on loopback that the real discord.py client connects to in tests and benchmarks.

It owns one guild with a few text channels, members and an admin role, and speaks just enough
of Discord for the bot: the gateway websocket (HELLO, IDENTIFY -> READY + GUILD_CREATE,
heartbeat ACKs, RESUME, dispatching events) and the REST routes the bot calls (login, app
command sync, interaction callbacks, webhook followups and edits, channel messages,
reactions, DMs, attachment downloads).

Everything is recorded so tests can assert what a person would have seen: each interaction
with the time it was sent and the time it was acknowledged, every message with its
attachments' bytes and its edit history, every reaction.

    fake = FakeDiscord()
    await fake.start()
    fake.point_discord_py_here(monkeypatch)   # Route.BASE and the gateway URL
    ... start the bot with any token ...
    interaction = await fake.slash("imagine", {"prompt": "a fox"}, user=fake.alice)
    await fake.wait_for(lambda: interaction.acknowledged_at is not None)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

DISCORD_EPOCH_MS = 1420070400000
EPHEMERAL = 1 << 6
LOADING = 1 << 7

# Gateway opcodes (https://discord.com/developers/docs/topics/opcodes-and-status-codes).
DISPATCH, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HELLO, HEARTBEAT_ACK = (
    0, 1, 2, 6, 7, 9, 10, 11,
)

# Interaction callback types.
PONG, CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE, AUTOCOMPLETE = (
    1, 4, 5, 6, 7, 8,
)

# Option types of application commands.
OPTION_TYPES = {str: 3, int: 4, bool: 5, float: 10}
SUB_COMMAND, ATTACHMENT_OPTION, USER_OPTION = 1, 11, 6

ALL_PERMISSIONS = str((1 << 50) - 1)
MEMBER_PERMISSIONS = str(0x0000_0000_0004_0000 | 0x800 | 0x400 | 0x40)


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only when the content type is exactly this (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json"})


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())


@dataclass
class FakeInteraction:
    """One interaction the fake sent, and what the bot did with it."""

    id: int
    token: str
    kind: int  # 2 command, 3 component, 4 autocomplete
    payload: dict[str, Any]
    sent_at: float
    acknowledged_at: float | None = None
    callback_type: int | None = None
    callback_data: dict[str, Any] | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    token_expired: bool = False

    @property
    def ack_seconds(self) -> float | None:
        if self.acknowledged_at is None:
            return None
        return self.acknowledged_at - self.sent_at

    @property
    def ephemeral(self) -> bool:
        data = self.callback_data or {}
        return bool(int(data.get("flags") or 0) & EPHEMERAL)

    @property
    def choices(self) -> list[dict[str, Any]]:
        """The autocomplete choices the bot answered with."""
        return list((self.callback_data or {}).get("choices", []))


class FakeDiscord:
    """The fake server; see the module docstring."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.application_id = self.snowflake()
        self.bot_user = self._user("loraloop", bot=True)
        self.guild_id = self.snowflake()
        self.admin_role_id = self.snowflake()
        self.channel_id = self.snowflake()
        self.other_channel_id = self.snowflake()
        self.alice = self._user("alice")
        self.bob = self._user("bob")
        self.carol = self._user("carol")
        self.users: dict[int, dict[str, Any]] = {
            int(u["id"]): u for u in (self.bot_user, self.alice, self.bob, self.carol)
        }
        self.admins: set[int] = set()
        self.channels: dict[int, dict[str, Any]] = {
            cid: self._text_channel(cid, name)
            for cid, name in ((self.channel_id, "art"), (self.other_channel_id, "general"))
        }
        self.dm_channels: dict[int, int] = {}  # user id -> DM channel id
        self.messages: dict[int, dict[str, Any]] = {}
        self.message_edits: dict[int, list[dict[str, Any]]] = {}
        self.edit_times: dict[int, list[float]] = {}  # message id -> when each edit arrived
        self.deleted_messages: set[int] = set()
        self.files: dict[int, dict[str, bytes]] = {}  # attachment id -> {filename: bytes}
        self.reactions: dict[int, dict[str, list[int]]] = {}  # message -> emoji -> user ids
        self.interactions: dict[int, FakeInteraction] = {}
        self.commands: list[dict[str, Any]] = []
        self.requests: list[tuple[float, str, str]] = []
        self.identifies = 0
        self.attachment_size_limit = 10 * 1024 * 1024
        self._sockets: list[web.WebSocketResponse] = []
        self._sequence = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- ids and payloads -------------------------------------------------------------------

    def snowflake(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._ids) & 0x3FFFFF)

    def _user(self, name: str, bot: bool = False) -> dict[str, Any]:
        return {
            "id": str(self.snowflake()),
            "username": name,
            "discriminator": "0",
            "global_name": name,
            "avatar": None,
            "bot": bot,
            "flags": 0,
            "public_flags": 0,
        }

    def add_user(self, name: str) -> dict[str, Any]:
        user = self._user(name)
        self.users[int(user["id"])] = user
        return user

    def _text_channel(self, cid: int, name: str) -> dict[str, Any]:
        return {
            "id": str(cid),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }

    def _member(self, user: dict[str, Any]) -> dict[str, Any]:
        uid = int(user["id"])
        return {
            "user": user,
            "roles": [str(self.admin_role_id)] if uid in self.admins else [],
            "joined_at": _now_iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "permissions": ALL_PERMISSIONS if uid in self.admins else MEMBER_PERMISSIONS,
        }

    def _guild(self) -> dict[str, Any]:
        everyone = {"id": str(self.guild_id), "name": "@everyone", "permissions": MEMBER_PERMISSIONS,
                    "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False,
                    "flags": 0}
        admin = dict(everyone, id=str(self.admin_role_id), name="image-admin", position=1,
                     permissions=ALL_PERMISSIONS)
        return {
            "id": str(self.guild_id),
            "name": "loraloop test server",
            "owner_id": self.alice["id"],
            "roles": [everyone, admin],
            "emojis": [],
            "stickers": [],
            "features": [],
            "channels": list(self.channels.values()),
            "threads": [],
            "members": [self._member(self.bot_user)],
            "member_count": len(self.users),
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "large": False,
            "unavailable": False,
            "joined_at": _now_iso(),
            "premium_tier": 0,
            "preferred_locale": "en-US",
        }

    def _message(self, channel_id: int, content: str, author: dict[str, Any], **extra: Any) -> dict[str, Any]:
        mid = self.snowflake()
        message = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if channel_id in self.channels:
            message["guild_id"] = str(self.guild_id)
        message.update(extra)
        self.messages[mid] = message
        self.message_edits[mid] = []
        return message

    def upload(self, filename: str, data: bytes, content_type: str = "image/png") -> dict[str, Any]:
        """An attachment a user uploads with a slash command; its url serves the bytes."""
        aid = self.snowflake()
        self.files[aid] = {filename: data}
        return {
            "id": str(aid),
            "filename": filename,
            "size": len(data),
            "url": f"{self.url}/attachments/{aid}/{filename}",
            "proxy_url": f"{self.url}/attachments/{aid}/{filename}",
            "content_type": content_type,
        }

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{aid}/{filename}", self._attachment)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def point_discord_py_here(self, monkeypatch: Any = None) -> None:
        """Aim discord.py's REST base and gateway at this fake (class attributes, so patch them)."""
        import yarl
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        settings = [
            (Route, "BASE", f"{self.url}/api/v10"),
            (DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(f"{self.url.replace('http', 'ws')}/gateway")),
        ]
        for owner, name, value in settings:
            if monkeypatch is not None:
                monkeypatch.setattr(owner, name, value)
            else:
                setattr(owner, name, value)

    async def disconnect_bot(self) -> None:
        """Drop every gateway connection, as when the bot process goes away."""
        for ws in list(self._sockets):
            await ws.close()

    # ---- waiting ----------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked whenever the fake records something)."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.25))

    # ---- the gateway ------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": HELLO, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        self._sockets.append(ws)
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op = payload.get("op")
                if op == HEARTBEAT:
                    await ws.send_json({"op": HEARTBEAT_ACK, "d": None, "s": None, "t": None})
                elif op in (IDENTIFY, RESUME):
                    # A resume is answered as a fresh session: the simplest honest behaviour.
                    self.identifies += 1
                    await self._send(ws, "READY", {
                        "v": 10,
                        "user": self.bot_user,
                        "guilds": [{"id": str(self.guild_id), "unavailable": True}],
                        "session_id": f"session-{self.identifies}",
                        "resume_gateway_url": f"{self.url.replace('http', 'ws')}/gateway",
                        "application": {"id": str(self.application_id), "flags": 0},
                    })
                    await self._send(ws, "GUILD_CREATE", self._guild())
                    await self._notify()
        finally:
            self._sockets.remove(ws)
        return ws

    async def _send(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        self._sequence += 1
        await ws.send_json({"op": DISPATCH, "t": event, "s": self._sequence, "d": data})

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send one gateway event to every connected bot (none connected: the event is lost)."""
        for ws in list(self._sockets):
            if not ws.closed:
                await self._send(ws, event, data)

    @property
    def connected(self) -> bool:
        return any(not ws.closed for ws in self._sockets)

    # ---- what users do ----------------------------------------------------------------------

    def _interaction_base(self, kind: int, user: dict[str, Any], channel_id: int | None) -> dict[str, Any]:
        iid = self.snowflake()
        token = f"itoken-{iid}"
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": kind,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "app_permissions": ALL_PERMISSIONS,
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "attachment_size_limit": self.attachment_size_limit,
        }
        if channel_id is None or channel_id in self.dm_channels.values():
            dm = channel_id or self.dm_channel_for(int(user["id"]))
            payload.update(channel_id=str(dm), user=user, context=1,
                           channel={"id": str(dm), "type": 1, "recipients": [user]})
        else:
            payload.update(channel_id=str(channel_id), guild_id=str(self.guild_id), context=0,
                           guild_locale="en-US", member=self._member(user),
                           channel=self.channels[channel_id])
        return payload

    async def _send_interaction(self, payload: dict[str, Any]) -> FakeInteraction:
        interaction = FakeInteraction(id=int(payload["id"]), token=payload["token"], kind=payload["type"],
                                      payload=payload, sent_at=time.monotonic())
        self.interactions[interaction.id] = interaction
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _options(self, options: dict[str, Any], resolved: dict[str, Any]) -> list[dict[str, Any]]:
        built = []
        for name, value in options.items():
            if isinstance(value, dict) and "filename" in value:  # an uploaded attachment
                resolved.setdefault("attachments", {})[value["id"]] = value
                built.append({"name": name, "type": ATTACHMENT_OPTION, "value": value["id"]})
            elif isinstance(value, dict) and "username" in value:  # a user
                resolved.setdefault("users", {})[value["id"]] = value
                member = self._member(value)
                member.pop("user")
                resolved.setdefault("members", {})[value["id"]] = member
                built.append({"name": name, "type": USER_OPTION, "value": value["id"]})
            else:
                built.append({"name": name, "type": OPTION_TYPES[type(value)], "value": value})
        return built

    async def slash(self, command: str, options: dict[str, Any] | None = None, *,
                    user: dict[str, Any] | None = None, channel_id: int | None = 0,
                    focused: str | None = None) -> FakeInteraction:
        """A user runs `/command` (a space separates subcommands: "admin pause").

        `channel_id` 0 means the main channel, None a DM. `focused` names the option being typed,
        which makes this an autocomplete request instead of a command.
        """
        user = user or self.alice
        channel = self.channel_id if channel_id == 0 else channel_id
        kind = 4 if focused else 2
        payload = self._interaction_base(kind, user, channel)
        resolved: dict[str, Any] = {}
        name, *subcommands = command.split()
        built = self._options(options or {}, resolved)
        if focused:
            for option in built:
                if option["name"] == focused:
                    option["focused"] = True
        for sub in reversed(subcommands):
            built = [{"name": sub, "type": SUB_COMMAND, "options": built}]
        registered = next((c for c in self.commands if c["name"] == name), None)
        data: dict[str, Any] = {"id": registered["id"] if registered else str(self.snowflake()),
                                "name": name, "type": 1, "options": built}
        if resolved:
            data["resolved"] = resolved
        payload["data"] = data
        return await self._send_interaction(payload)

    async def click(self, message_id: int, custom_id: str, *, user: dict[str, Any] | None = None
                    ) -> FakeInteraction:
        """A user clicks the button `custom_id` on a message."""
        user = user or self.alice
        message = self.messages[message_id]
        channel_id = int(message["channel_id"])
        payload = self._interaction_base(3, user, channel_id)
        payload["message"] = message
        payload["data"] = {"custom_id": custom_id, "component_type": 2}
        return await self._send_interaction(payload)

    async def react(self, message_id: int, emoji: str, user: dict[str, Any], *, gateway: bool = True) -> None:
        """A user adds a reaction; with `gateway=False` it happens while the bot is not listening."""
        users = self.reactions.setdefault(message_id, {}).setdefault(emoji, [])
        uid = int(user["id"])
        if uid in users:
            return
        users.append(uid)
        if gateway:
            await self.dispatch("MESSAGE_REACTION_ADD", self._reaction_event(message_id, emoji, user, True))

    async def unreact(self, message_id: int, emoji: str, user: dict[str, Any], *, gateway: bool = True) -> None:
        users = self.reactions.get(message_id, {}).get(emoji, [])
        uid = int(user["id"])
        if uid not in users:
            return
        users.remove(uid)
        if gateway:
            await self.dispatch("MESSAGE_REACTION_REMOVE", self._reaction_event(message_id, emoji, user, False))

    def _reaction_event(self, message_id: int, emoji: str, user: dict[str, Any], add: bool) -> dict[str, Any]:
        message = self.messages[message_id]
        data: dict[str, Any] = {
            "user_id": user["id"],
            "channel_id": message["channel_id"],
            "message_id": str(message_id),
            "emoji": {"id": None, "name": emoji},
            "burst": False,
            "type": 0,
        }
        if "guild_id" in message:
            data["guild_id"] = message["guild_id"]
            if add:
                data["member"] = self._member(user)
                data["message_author_id"] = message["author"]["id"]
        return data

    def post_as_bot(self, content: str, files: list[tuple[str, bytes]] = (), channel_id: int | None = None
                    ) -> dict[str, Any]:
        """A message the bot posted earlier (for tests that start from existing history)."""
        return self._create_message(channel_id or self.channel_id, {"content": content}, list(files))

    def post_as_user(self, user: dict[str, Any], content: str, channel_id: int | None = None) -> dict[str, Any]:
        return self._message(channel_id or self.channel_id, content, user)

    def dm_channel_for(self, user_id: int) -> int:
        if user_id not in self.dm_channels:
            self.dm_channels[user_id] = self.snowflake()
        return self.dm_channels[user_id]

    # ---- what tests read --------------------------------------------------------------------

    def channel_messages(self, channel_id: int | None = None) -> list[dict[str, Any]]:
        """Visible (not deleted, not ephemeral) messages in a channel, oldest first."""
        channel = self.channel_id if channel_id is None else channel_id
        return [m for mid, m in sorted(self.messages.items())
                if int(m["channel_id"]) == channel and mid not in self.deleted_messages
                and not int(m.get("flags") or 0) & EPHEMERAL]

    def image_messages(self, channel_id: int | None = None) -> list[dict[str, Any]]:
        """Messages posted with an image (not interaction responses, which may carry a preview)."""
        return [m for m in self.channel_messages(channel_id)
                if "interaction_metadata" not in m
                and any(a["filename"].endswith((".png", ".jpg")) for a in m["attachments"])]

    def attachment_bytes(self, attachment: dict[str, Any]) -> bytes:
        return self.files[int(attachment["id"])][attachment["filename"]]

    def bot_reactions(self, message_id: int) -> list[str]:
        bot = int(self.bot_user["id"])
        return [e for e, users in self.reactions.get(message_id, {}).items() if bot in users]

    def original_message(self, interaction: FakeInteraction) -> dict[str, Any] | None:
        if interaction.original_message_id is None:
            return None
        return self.messages[interaction.original_message_id]

    def texts_seen_by(self, interaction: FakeInteraction) -> list[str]:
        """Every text the interaction's user was shown: response, its edits, followups."""
        texts = []
        data = interaction.callback_data or {}
        if data.get("content"):
            texts.append(data["content"])
        ids = ([interaction.original_message_id] if interaction.original_message_id else [])
        ids += interaction.followup_ids
        for mid in ids:
            for version in [*self.message_edits.get(mid, []), self.messages[mid]]:
                if version.get("content"):
                    texts.append(version["content"])
                texts.extend(e.get("description") or "" for e in version.get("embeds", []))
        return texts

    # ---- REST -------------------------------------------------------------------------------

    async def _attachment(self, request: web.Request) -> web.Response:
        files = self.files.get(int(request.match_info["aid"]))
        if not files or request.match_info["filename"] not in files:
            raise web.HTTPNotFound()
        return web.Response(body=files[request.match_info["filename"]])

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        return _json({"code": code, "message": message}, status=status)

    async def _body(self, request: web.Request) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        """A JSON body, or a multipart one (payload_json + files[n]) as Discord accepts it."""
        if request.content_type.startswith("multipart/"):
            payload: dict[str, Any] = {}
            files: list[tuple[str, bytes]] = []
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files.append((part.filename or "file", await part.read()))
            return payload, files
        if request.can_read_body:
            return await request.json(), []
        return {}, []

    def _apply_content(self, message: dict[str, Any], payload: dict[str, Any],
                       files: list[tuple[str, bytes]], *, editing: bool) -> None:
        for key in ("content", "embeds", "components", "flags", "allowed_mentions"):
            if key in payload:
                message[key] = payload[key] if payload[key] is not None else (
                    "" if key == "content" else 0 if key == "flags" else [])
        if "attachments" in payload or files:
            kept = []
            if editing:
                keep_ids = {str(a["id"]) for a in payload.get("attachments", [])}
                kept = [a for a in message["attachments"] if a["id"] in keep_ids]
            new = []
            for filename, data in files:
                attachment = self.upload(filename, data)
                new.append(attachment)
            message["attachments"] = kept + new

    def _create_message(self, channel_id: int, payload: dict[str, Any], files: list[tuple[str, bytes]],
                        **extra: Any) -> dict[str, Any]:
        message = self._message(channel_id, "", self.bot_user, **extra)
        self._apply_content(message, payload, files, editing=False)
        if payload.get("message_reference"):
            message["message_reference"] = payload["message_reference"]
        return message

    def _edit_message(self, mid: int, payload: dict[str, Any], files: list[tuple[str, bytes]]) -> dict[str, Any]:
        message = self.messages[mid]
        self.message_edits[mid].append(json.loads(json.dumps(message)))
        self.edit_times.setdefault(mid, []).append(time.monotonic())
        self._apply_content(message, payload, files, editing=True)
        message["edited_timestamp"] = _now_iso()
        return message

    def _with_reactions(self, message: dict[str, Any]) -> dict[str, Any]:
        bot = int(self.bot_user["id"])
        reactions = [
            {"emoji": {"id": None, "name": emoji}, "count": len(users), "me": bot in users,
             "me_burst": False, "burst_me": False, "burst_colors": [],
             "count_details": {"burst": 0, "normal": len(users)}}
            for emoji, users in self.reactions.get(int(message["id"]), {}).items() if users
        ]
        return {**message, "reactions": reactions}

    def _interaction_for_token(self, token: str) -> FakeInteraction | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((time.monotonic(), request.method, request.path))
        try:
            return await self._route(request, request.match_info["path"].split("/"))
        finally:
            await self._notify()

    async def _route(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        method = request.method
        parts = [unquote(p) for p in parts]
        match parts:
            case ["users", "@me"] if method == "GET":
                return _json(self.bot_user)
            case ["oauth2", "applications", "@me"]:
                return _json({
                    "id": str(self.application_id), "name": "loraloop", "description": "", "icon": None,
                    "bot_public": False, "bot_require_code_grant": False, "owner": self.alice,
                    "verify_key": "0" * 64, "flags": 0, "team": None, "summary": "",
                })
            case ["gateway", "bot"]:
                return _json({
                    "url": self.url.replace("http", "ws") + "/gateway", "shards": 1,
                    "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0,
                                            "max_concurrency": 1},
                })
            case ["applications", _, "commands"] | ["applications", _, "guilds", _, "commands"]:
                if method == "PUT":
                    body, _files = await self._body(request)
                    self.commands = [{**c, "id": str(self.snowflake()), "application_id": str(self.application_id),
                                      "version": str(self.snowflake()),
                                      "default_member_permissions": c.get("default_member_permissions"),
                                      "type": c.get("type", 1)} for c in body]
                return _json(self.commands)
            case ["interactions", iid, token, "callback"] if method == "POST":
                return await self._callback(request, int(iid), token)
            case ["webhooks", _, token, "messages", which]:
                return await self._webhook_message(request, token, which)
            case ["webhooks", _, token] if method == "POST":
                return await self._followup(request, token)
            case ["channels", cid, "messages"] if method == "POST":
                if int(cid) not in self.channels and int(cid) not in self.dm_channels.values():
                    return self._error(404, 10003, "Unknown Channel")
                body, files = await self._body(request)
                return _json(self._create_message(int(cid), body, files))
            case ["channels", cid, "messages", mid] :
                return await self._channel_message(request, int(cid), int(mid))
            case ["channels", cid, "messages", mid, "reactions", emoji, who]:
                return await self._reaction(method, int(mid), emoji, who)
            case ["channels", cid, "messages", mid, "reactions", emoji] if method == "GET":
                return self._reaction_users(request, int(mid), emoji)
            case ["channels", cid] if method == "GET":
                channel = self.channels.get(int(cid))
                if channel is None:
                    owner = next((u for u, c in self.dm_channels.items() if c == int(cid)), None)
                    if owner is None:
                        return self._error(404, 10003, "Unknown Channel")
                    channel = {"id": cid, "type": 1, "recipients": [self.users[owner]]}
                return _json(channel)
            case ["users", "@me", "channels"] if method == "POST":
                body, _files = await self._body(request)
                uid = int(body["recipient_id"])
                return _json({"id": str(self.dm_channel_for(uid)), "type": 1,
                                          "recipients": [self.users[uid]], "last_message_id": None})
            case ["users", uid] if method == "GET":
                user = self.users.get(int(uid))
                return _json(user) if user else self._error(404, 10013, "Unknown User")
        return self._error(404, 0, f"fake Discord has no route {method} /{'/'.join(parts)}")

    async def _callback(self, request: web.Request, iid: int, token: str) -> web.Response:
        interaction = self.interactions.get(iid)
        if interaction is None or interaction.token != token:
            return self._error(404, 10062, "Unknown interaction")
        if interaction.acknowledged_at is not None:
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        body, files = await self._body(request)
        interaction.acknowledged_at = time.monotonic()
        interaction.callback_type = body["type"]
        interaction.callback_data = body.get("data") or {}
        data = interaction.callback_data
        payload = interaction.payload
        channel_id = int(payload["channel_id"])
        message = None
        if body["type"] in (CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE):
            flags = int(data.get("flags") or 0) | (LOADING if body["type"] == DEFERRED_CHANNEL_MESSAGE else 0)
            message = self._create_message(channel_id, {**data, "flags": flags}, files,
                                           interaction_metadata={"id": str(iid), "type": payload["type"],
                                                                 "user": self._user_of(payload)})
            interaction.original_message_id = int(message["id"])
        elif body["type"] in (UPDATE_MESSAGE,) and "message" in payload:
            message = self._edit_message(int(payload["message"]["id"]), data, files)
        response: dict[str, Any] = {"interaction": {
            "id": str(iid), "type": payload["type"],
            "response_message_id": message["id"] if message else None,
            "response_message_loading": body["type"] == DEFERRED_CHANNEL_MESSAGE,
            "response_message_ephemeral": bool(int(data.get("flags") or 0) & EPHEMERAL),
        }}
        if message is not None:
            response["resource"] = {"type": body["type"], "message": message}
        return _json(response)

    @staticmethod
    def _user_of(payload: dict[str, Any]) -> dict[str, Any]:
        return payload["member"]["user"] if "member" in payload else payload["user"]

    def _expired(self, interaction: FakeInteraction | None) -> web.Response | None:
        if interaction is None:
            return self._error(404, 10015, "Unknown Webhook")
        if interaction.token_expired:
            return self._error(401, 50027, "Invalid Webhook Token")
        return None

    async def _webhook_message(self, request: web.Request, token: str, which: str) -> web.Response:
        interaction = self._interaction_for_token(token)
        if (problem := self._expired(interaction)) is not None:
            return problem
        assert interaction is not None
        if which == "@original":
            if (interaction.original_message_id is None
                    and interaction.callback_type in (DEFERRED_UPDATE, UPDATE_MESSAGE)):
                interaction.original_message_id = int(interaction.payload["message"]["id"])
            mid = interaction.original_message_id
        else:
            mid = int(which)
        if mid is None or mid not in self.messages or mid in self.deleted_messages:
            return self._error(404, 10008, "Unknown Message")
        if request.method == "GET":
            return _json(self.messages[mid])
        if request.method == "DELETE":
            self.deleted_messages.add(mid)
            return web.Response(status=204)
        body, files = await self._body(request)
        message = self._edit_message(mid, body, files)
        message["flags"] = int(message.get("flags") or 0) & ~LOADING
        return _json(message)

    async def _followup(self, request: web.Request, token: str) -> web.Response:
        interaction = self._interaction_for_token(token)
        if (problem := self._expired(interaction)) is not None:
            return problem
        assert interaction is not None
        if interaction.acknowledged_at is None:
            return self._error(404, 10015, "Unknown Webhook")
        body, files = await self._body(request)
        message = self._create_message(int(interaction.payload["channel_id"]), body, files,
                                       webhook_id=str(self.application_id))
        interaction.followup_ids.append(int(message["id"]))
        return _json(message)

    async def _channel_message(self, request: web.Request, cid: int, mid: int) -> web.Response:
        message = self.messages.get(mid)
        if message is None or mid in self.deleted_messages or int(message["channel_id"]) != cid:
            return self._error(404, 10008, "Unknown Message")
        if request.method == "GET":
            return _json(self._with_reactions(message))
        if request.method == "DELETE":
            self.deleted_messages.add(mid)
            return web.Response(status=204)
        body, files = await self._body(request)
        return _json(self._edit_message(mid, body, files))

    async def _reaction(self, method: str, mid: int, emoji: str, who: str) -> web.Response:
        if mid not in self.messages or mid in self.deleted_messages:
            return self._error(404, 10008, "Unknown Message")
        user = self.bot_user if who == "@me" else self.users[int(who)]
        # Like Discord, the bot hears its own reactions through the gateway too.
        if method == "PUT":
            await self.react(mid, emoji, user)
        elif method == "DELETE":
            await self.unreact(mid, emoji, user)
        return web.Response(status=204)

    def _reaction_users(self, request: web.Request, mid: int, emoji: str) -> web.Response:
        limit = int(request.query.get("limit", 25))
        after = int(request.query.get("after", 0))
        ids = sorted(u for u in self.reactions.get(mid, {}).get(emoji, []) if u > after)
        return _json([self.users[u] for u in ids[:limit]])
