"""The console's pages: thin handlers that parse a request, call the owner, render a template.

    running = await start_console(config, secrets, service_url)   # prints nothing; running.login_url
    ...
    await running.stop()

Who may do what (console/auth.py): anyone who reaches the console sees the playground and
may log in with a name (the web identity `web:<name>`) to generate and rate; the admin pages
need the admin token. Every POST carries the session's CSRF token. Images are served from the
store by id, never by path; no page shows the service token or a server path.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import logging
import random
import secrets as token_maker
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web

from console import auth
from console.auth import RateLimiter, Session, Sessions
from console.follow import Followers
from console.jobs import KINDS, AdminJobs, JobError
from generation.client import ServiceClient, ServiceError
from generation.contract import ASPECTS, SCHEDULERS, AdapterInfo, AdapterRef, InvalidRequest, JobRequest, size_for
from loraloop import experiments
from loraloop.bans import BANS_FILE, Bans
from loraloop.config import Config, Secrets, is_loopback
from loraloop.raters import RaterSettings
from loraloop.store import AsyncStore, ListedImage, NotFoundError

log = logging.getLogger(__name__)

FLAG_KIND = "nsfw"  # what the bot's 🚩 records
MAX_INIT_IMAGE_BYTES = 8 * 1024 * 1024
VOTES_SHOWN = 500  # the votes behind one like-rate point: the newest, not a page of 30,000 rows

CONSOLE_KEY: web.AppKey[Console] = web.AppKey("console")
SESSION_KEY = web.RequestKey("session", Session)
routes = web.RouteTableDef()


def exposure_refusal(host: str, token: str | None) -> str | None:
    """Why the console must not listen on `host` without an admin token, or None when it may."""
    if token or is_loopback(host):
        return None
    return (f"Refusing to serve the console on {host or 'every interface'} without LORALOOP_CONSOLE_TOKEN: "
            "anyone who can reach it could log in as admin. Set LORALOOP_CONSOLE_TOKEN or use 127.0.0.1")


class Console:
    """Everything the pages share: the store, the service client, sessions, limits, jobs."""

    def __init__(self, config: Config, secrets: Secrets, service_url: str) -> None:
        self.config = config
        self.settings = config.console
        self.admin_token = secrets.console_token or token_maker.token_urlsafe(24)
        self.sessions = Sessions(self.admin_token)
        self.submissions = RateLimiter(self.settings.submissions_per_minute)
        self.votes = RateLimiter(self.settings.votes_per_minute)
        self.logins = RateLimiter(10)  # admin-token guesses per client address
        self.client = ServiceClient(service_url, token=secrets.service_token)
        self.jobs = AdminJobs(config, service_url, secrets.service_token)
        self.bans = Bans(config.data_dir / BANS_FILE)
        self.like_emoji = next(e for e, v in config.bot.rating_emojis.items() if v == 1)
        self.dislike_emoji = next(e for e, v in config.bot.rating_emojis.items() if v == -1)
        self.flag_emoji = config.bot.flag_emoji
        self._store: AsyncStore | None = None
        self._followers: Followers | None = None

    @property
    def store(self) -> AsyncStore:
        assert self._store is not None, "the console's store opens in its startup hook"
        return self._store

    @property
    def followers(self) -> Followers:
        assert self._followers is not None
        return self._followers

    async def start(self) -> None:
        self._store = await AsyncStore.open_from_config(self.config)
        self._followers = Followers(self.client, self._store)

    async def stop(self) -> None:
        if self._followers is not None:
            await self._followers.stop()
        self.jobs.close()
        await self.client.close()
        if self._store is not None:
            await self._store.close()

    async def adapters(self) -> list[AdapterInfo]:
        try:
            return await self.client.adapters()
        except ServiceError:
            log.warning("console: the service did not list its adapters", exc_info=True)
            return []


def _console(request: web.Request) -> Console:
    return request.app[CONSOLE_KEY]


def _session(request: web.Request) -> Session:
    return request[SESSION_KEY]


def _is_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _local_path(target: str | None, default: str = "/") -> str:
    """A redirect target from a form, kept on this site (no scheme, no host, no //evil.example)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


# --- middleware: session, CSRF, admin, headers ---------------------------------------------

ADMIN_PREFIX = "/admin"
# Content-Security-Policy: only this site's own scripts and styles; previews arrive as data: URLs.
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


@web.middleware
async def sessions_and_guards(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    console = _console(request)
    session = console.sessions.get(request.cookies.get(auth.COOKIE))
    fresh = session is None
    if session is None:
        session = console.sessions.new()
    request[SESSION_KEY] = session
    try:
        if request.method == "POST":
            submitted = request.headers.get(auth.CSRF_HEADER)
            if submitted is None and request.content_type in ("application/x-www-form-urlencoded",
                                                              "multipart/form-data"):
                submitted = (await request.post()).get(auth.CSRF_FIELD)  # type: ignore[assignment]
            if fresh or not auth.csrf_ok(session, submitted):
                raise web.HTTPForbidden(text="This form has expired or did not come from this console: "
                                             "reload the page and try again.")
        if request.path.startswith(ADMIN_PREFIX) and not session.admin:
            if request.method == "GET" and not _is_json(request):
                raise web.HTTPFound("/login?" + urlencode({"next": request.path_qs}))
            raise web.HTTPUnauthorized(text="Admins only: log in with the admin token.")
        response = await handler(request)
    except web.HTTPException as exc:
        _finish(request, exc, session, fresh)
        raise
    _finish(request, response, session, fresh)
    return response


def _finish(request: web.Request, response: web.StreamResponse, session: Session, fresh: bool) -> None:
    """The cookie when the session is new or changed (login), and the security headers."""
    if response.prepared:
        return  # a stream (server-sent events) has sent its headers already
    if request.get(SESSION_KEY) is not session or fresh:
        auth.set_cookie(response, request[SESSION_KEY], secure=request.secure)
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")


def page(template: str) -> Callable[..., Any]:
    """A handler rendering `template` with what it returns plus the session and console basics."""
    def wrap(handler: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> Callable[..., Any]:
        async def render(request: web.Request) -> web.StreamResponse:
            context = await handler(request)
            session = _session(request)
            context.update(session=session, csrf=session.csrf, path=request.path)
            return aiohttp_jinja2.render_template(template, request, context)

        render.__name__ = handler.__name__
        render.__doc__ = handler.__doc__
        return render

    return wrap


def _require_person(request: web.Request) -> Session:
    session = _session(request)
    if session.user_id is None:
        if request.method == "GET":
            raise web.HTTPFound("/login?" + urlencode({"next": request.path_qs}))
        raise web.HTTPUnauthorized(text="Log in with a name first.")
    return session


# --- login ------------------------------------------------------------------------------------

@routes.get("/login")
@page("login.html")
async def login_page(request: web.Request) -> dict[str, Any]:
    """The login form; `?token=ADMIN_TOKEN` (the URL printed at start) logs in as admin at once."""
    console = _console(request)
    token = request.query.get("token")
    target = _local_path(request.query.get("next"), "/admin")
    if token is not None:
        if not console.logins.allow(request.remote or "?") or not console.sessions.is_admin_token(token):
            raise web.HTTPForbidden(text="That login link is not valid (any more): use the one printed at start.")
        raise await _log_in(request, name=_session(request).name or "admin", admin=True, target=target)
    return {"next": _local_path(request.query.get("next")), "error": None}


async def _log_in(request: web.Request, *, name: str, admin: bool, target: str) -> web.HTTPSeeOther:
    """Give the session an identity (and admin rights): a fresh session id, and the redirect to raise."""
    console = _console(request)
    session = console.sessions.renew(_session(request))
    session.name = name
    session.user_id = await console.store.web_user(name)
    session.admin = session.admin or admin
    request[SESSION_KEY] = session
    log.info("console: %s logged in%s", session.identity, " as admin" if session.admin else "")
    # The token leaves the address bar (and the history) at once, as Jupyter's does.
    return web.HTTPSeeOther(target)


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    form = await request.post()
    target = _local_path(str(form.get("next", "")))
    token = str(form.get("token", ""))
    if token:
        if not console.logins.allow(request.remote or "?") or not console.sessions.is_admin_token(token):
            return _render_login(request, target, "That is not the admin token.", status=403)
        raise await _log_in(request, name=_session(request).name or "admin", admin=True,
                            target=_local_path(target, "/admin"))
    name = str(form.get("name", "")).strip().lower()
    if not auth.NAME_RE.fullmatch(name):
        return _render_login(request, target, "Pick a name of letters, digits, '.', '_' or '-' (at most 32).")
    raise await _log_in(request, name=name, admin=False, target=target)


def _render_login(request: web.Request, target: str, error: str, status: int = 400) -> web.Response:
    session = _session(request)
    response = aiohttp_jinja2.render_template(
        "login.html", request, {"next": target, "error": error, "session": session, "csrf": session.csrf,
                                "path": request.path}, status=status)
    return response


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    console.sessions.end(_session(request))
    request[SESSION_KEY] = console.sessions.new()
    raise web.HTTPSeeOther("/")


@routes.get("/me")
@page("me.html")
async def me(request: web.Request) -> dict[str, Any]:
    session = _require_person(request)
    assert session.user_id is not None
    console = _console(request)
    return {"opted_out": await console.store.is_opted_out(session.user_id),
            "images": await console.store.listed_images(requester_id=session.user_id, limit=24)}


@routes.post("/me/{choice:optout|optin}")
async def opt(request: web.Request) -> web.StreamResponse:
    session = _require_person(request)
    assert session.user_id is not None
    store = _console(request).store
    if request.match_info["choice"] == "optout":
        await store.opt_out(session.user_id)
    else:
        await store.opt_in(session.user_id)
    raise web.HTTPSeeOther("/me")


# --- playground -------------------------------------------------------------------------------

@routes.get("/")
@page("playground.html")
async def playground(request: web.Request) -> dict[str, Any]:
    console = _console(request)
    session = _session(request)
    mine = (await console.store.listed_images(requester_id=session.user_id, limit=12)
            if session.user_id is not None else [])
    return {"adapters": await console.adapters(), "aspects": list(ASPECTS), "schedulers": SCHEDULERS,
            "service": console.config.service, "images": mine, "error": None, "form": {}}


def _optional_number(form: Any, key: str, kind: type) -> Any:
    text = str(form.get(key) or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise InvalidRequest(f"{key.replace('_', ' ')} must be a number.") from None


async def _request_from_form(console: Console, form: Any, identity: str) -> tuple[JobRequest, str | None, int | None]:
    """The JobRequest for a playground form, the style it serves blind (an experiment's arm) and the experiment."""
    adapters = []
    for slot in ("style", "style2"):
        name = str(form.get(slot) or "").strip()
        if name:
            weight = _optional_number(form, f"{slot}_weight", float)
            adapters.append({"name": name, "weight": 1.0 if weight is None else weight})
    aspect = str(form.get("aspect") or "1:1")
    if aspect not in ASPECTS:
        raise InvalidRequest("Pick one of the listed aspects.")
    width = height = None
    if aspect != "1:1":
        base = console.settings.base_size or (await console.client.health()).native_size or 512
        width, height = size_for(aspect, base)
    init_image = None
    upload = form.get("init_image")
    if isinstance(upload, web.FileField):
        data = upload.file.read(MAX_INIT_IMAGE_BYTES + 1)
        if len(data) > MAX_INIT_IMAGE_BYTES:
            raise InvalidRequest("The init image is too large (8 MB at most).")
        if data:
            init_image = base64.b64encode(data).decode("ascii")
    request = JobRequest.from_dict({
        "prompt": str(form.get("prompt") or ""), "negative_prompt": str(form.get("negative") or ""),
        "adapters": adapters, "steps": _optional_number(form, "steps", int),
        "guidance": _optional_number(form, "guidance", float), "seed": _optional_number(form, "seed", int),
        "width": width, "height": height, "count": _optional_number(form, "count", int) or 1,
        "scheduler": str(form.get("scheduler") or "") or None, "init_image": init_image,
        "strength": _optional_number(form, "strength", float) if init_image else None, "requester": identity,
    })
    # A style named without a version is served as Discord serves it: its default version, or an
    # A/B experiment's arm drawn for this request (loraloop.experiments).
    arm = experiment_id = None
    if request.adapters and "@" not in request.adapters[0].name:
        first = request.adapters[0]
        serving = await console.store.call(experiments.serving, first.name)
        version, arm = experiments.choose_arm(serving, random.random())
        if version is not None:
            pinned = AdapterRef(f"{first.name}@{version}", first.weight)
            request = dataclasses.replace(request, adapters=(pinned, *request.adapters[1:]))
            experiment_id = serving.experiment_id if arm else None
    return request, arm, experiment_id


@routes.post("/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    session = _require_person(request)
    assert session.user_id is not None and session.identity is not None
    form = await request.post()

    def refuse(message: str, status: int) -> web.Response:
        return _render_playground_error(request, form, message, status)

    if console.bans.is_banned(session.user_id):
        return refuse("You are banned from generating here; ask an admin.", 403)
    if not console.submissions.allow(session.identity):
        return refuse(f"That is {console.settings.submissions_per_minute} requests this minute; try again in "
                      f"{console.submissions.retry_after(session.identity)} s.", 429)
    try:
        job_request, arm, experiment_id = await _request_from_form(console, form, session.identity)
        accepted = await console.client.submit(job_request)
    except InvalidRequest as exc:
        return refuse(exc.message, 400)
    except ServiceError as exc:
        return refuse(exc.message, 429 if exc.http_status == 429 else 503)
    parameters = {k: v for k, v in job_request.to_dict().items()
                  if k not in ("prompt", "negative_prompt", "adapters", "init_image", "requester")}
    generation_id = await console.store.record_generation(
        job_id=accepted.id, prompt=job_request.prompt, negative_prompt=job_request.negative_prompt,
        requester_id=session.user_id, parameters=parameters, adapters=[a.to_dict() for a in job_request.adapters],
        experiment_id=experiment_id, arm=arm)
    console.followers.start(accepted.id, generation_id, blind=arm is not None)
    log.info("job %s: submitted from the console by %s", accepted.id, session.identity)
    raise web.HTTPSeeOther(f"/jobs/{accepted.id}")


def _render_playground_error(request: web.Request, form: Any, message: str, status: int) -> web.Response:
    console = _console(request)
    session = _session(request)
    context = {"adapters": [], "aspects": list(ASPECTS), "schedulers": SCHEDULERS, "service": console.config.service,
               "images": [], "error": message, "form": {k: v for k, v in form.items() if isinstance(v, str)},
               "session": session, "csrf": session.csrf, "path": "/"}
    return aiohttp_jinja2.render_template("playground.html", request, context, status=status)


async def _generation_for(request: web.Request) -> tuple[Any, list[ListedImage]]:
    console = _console(request)
    generation = await console.store.generation_for_job(request.match_info["job_id"])
    if generation is None:
        raise web.HTTPNotFound(text="No such job here.")
    images = [await console.store.listed_image(i.id)
              for i in await console.store.images_for_generation(generation.id)]
    return generation, images


def _followable(generation: Any) -> bool:
    """A job this console follows: unfinished, and asked for here (the bot follows its own)."""
    web_requested = generation.requester_id is not None and generation.requester_id < 0
    return web_requested and generation.status in ("queued", "running")


@routes.get("/jobs/{job_id}")
@page("job.html")
async def job_page(request: web.Request) -> dict[str, Any]:
    generation, images = await _generation_for(request)
    votes = await _my_votes(request, images)
    return {"generation": generation, "images": images, "votes": votes, "live": _followable(generation)}


@routes.get("/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events for the job's page: queue position, step, preview, then the stored images."""
    console = _console(request)
    job_id = request.match_info["job_id"]
    if job_id not in console.followers.jobs:
        generation, images = await _generation_for(request)
        if not _followable(generation):
            final = {"state": generation.status, "final": True, "error": generation.error,
                     "images": [{"id": i.id} for i in images]}
            return await _stream(request, _single(final))
        # Asked for before this console (re)started: follow it again; a job the service forgot fails here.
        console.followers.start(job_id, generation.id, blind=generation.arm is not None)
    events = console.followers.listen(job_id)
    return await _stream(request, events)


async def _single(event: dict[str, Any]) -> Any:
    yield event


async def _stream(request: web.Request, events: Any) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        async for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        log.debug("console: an event stream's page went away")
    return response


# --- images and votes -------------------------------------------------------------------------

@routes.get("/images/{image_id:\\d+}.png")
async def image_file(request: web.Request) -> web.StreamResponse:
    store = _console(request).store
    try:
        image = await store.listed_image(int(request.match_info["image_id"]))
        stored = await store.image(image.id)
    except NotFoundError:
        raise web.HTTPNotFound(text="No such image.") from None
    if image.deleted and not _session(request).admin:
        raise web.HTTPNotFound(text="This image was deleted.")
    path = store.data_dir / stored.path
    return web.FileResponse(path, headers={"Content-Type": "image/png", "Cache-Control": "private, max-age=3600"})


async def _my_votes(request: web.Request, images: list[ListedImage]) -> dict[int, int]:
    session = _session(request)
    if session.user_id is None:
        return {}
    store = _console(request).store
    mine = {}
    for image in images:
        for vote in await store.votes_for(image.id):
            if vote.user_id == session.user_id:
                mine[image.id] = vote.value
    return mine


@routes.post("/images/{image_id:\\d+}/rate")
async def rate(request: web.Request) -> web.StreamResponse:
    """👍 / 👎 / 🚩 (or `clear`) on an image, stored as the bot stores a reaction."""
    console = _console(request)
    session = _require_person(request)
    assert session.user_id is not None and session.identity is not None
    form = await request.post()
    choice = str(form.get("choice", ""))
    image_id = int(request.match_info["image_id"])
    if choice not in ("like", "dislike", "flag", "clear", "skip"):
        raise web.HTTPBadRequest(text="choice must be like, dislike, flag, clear or skip")
    if choice == "skip":
        session.skipped.add(image_id)
    elif not console.votes.allow(session.identity):
        raise web.HTTPTooManyRequests(text="That is a lot of votes this minute; take a breath and go on.")
    store = console.store
    try:
        if choice in ("like", "dislike"):
            value, emoji = (1, console.like_emoji) if choice == "like" else (-1, console.dislike_emoji)
            await store.set_vote(image_id, session.user_id, value, emoji, name=session.identity)
        elif choice == "flag":
            await store.flag(image_id, session.user_id, FLAG_KIND)
        elif choice == "clear":
            for emoji in (console.like_emoji, console.dislike_emoji):
                await store.remove_vote(image_id, session.user_id, emoji)
    except NotFoundError:
        raise web.HTTPNotFound(text="No such image.") from None
    if _is_json(request):
        image = await store.listed_image(image_id)
        return web.json_response({"image": image_id, "choice": choice, "likes": image.likes,
                                  "dislikes": image.dislikes, "flags": list(image.flags)})
    raise web.HTTPSeeOther(_local_path(str(form.get("next", "")), "/rate"))


@routes.get("/rate")
@page("rate.html")
async def rate_batch(request: web.Request) -> dict[str, Any]:
    """Rate a batch: unrated images one after another (keys: ←/d dislike, →/l like, f flag, s skip)."""
    session = _require_person(request)
    assert session.user_id is not None
    store = _console(request).store
    found = await store.unrated_images(session.user_id, limit=1, skip=session.skipped)
    return {"image": found[0] if found else None, "skipped": len(session.skipped)}


# --- admin: moderation, gallery ---------------------------------------------------------------

def _page_number(request: web.Request) -> int:
    try:
        return max(1, int(request.query.get("page", "1")))
    except ValueError:
        return 1


@routes.get("/admin/moderation")
@page("moderation.html")
async def moderation(request: web.Request) -> dict[str, Any]:
    console = _console(request)
    number = _page_number(request)
    size = console.settings.page_size
    images = await console.store.listed_images(flagged=True, limit=size, offset=(number - 1) * size)
    names = await console.store.user_names([i.requester_id for i in images if i.requester_id is not None])
    return {"images": images, "names": names, "page": number, "size": size,
            "banned": {i.requester_id for i in images
                       if i.requester_id is not None and console.bans.is_banned(i.requester_id)}}


@routes.post("/admin/images/{image_id:\\d+}/delete")
async def delete_image(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    form = await request.post()
    await _console(request).store.mark_image_deleted(int(request.match_info["image_id"]), session.user_id)
    log.info("console: image %s deleted by %s", request.match_info["image_id"], session.identity)
    raise web.HTTPSeeOther(_local_path(str(form.get("next", "")), "/admin/moderation"))


@routes.post("/admin/users/{user_id:-?\\d+}/{action:ban|unban}")
async def ban_user(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    form = await request.post()
    user_id = int(request.match_info["user_id"])
    if request.match_info["action"] == "ban":
        console.bans.ban(user_id)
    else:
        console.bans.unban(user_id)
    log.info("console: user %s %sned by %s", user_id, request.match_info["action"], _session(request).identity)
    raise web.HTTPSeeOther(_local_path(str(form.get("next", "")), "/admin/moderation"))


def _date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
    except ValueError:
        raise web.HTTPBadRequest(text="Dates are YYYY-MM-DD.") from None


@routes.get("/admin/gallery")
@page("gallery.html")
async def gallery(request: web.Request) -> dict[str, Any]:
    console = _console(request)
    query = request.query
    adapter = query.get("adapter") or None
    version = None
    if adapter and "@" in adapter:
        adapter, _, pinned = adapter.partition("@")
        version = int(pinned) if pinned.isdigit() else None
    try:
        min_score = int(query["min_score"]) if query.get("min_score") else None
    except ValueError:
        raise web.HTTPBadRequest(text="The score is a whole number.") from None
    until = _date(query.get("until"))
    number = _page_number(request)
    size = console.settings.page_size
    images = await console.store.listed_images(
        adapter=adapter, adapter_version=version, since=_date(query.get("since")),
        until=until + dt.timedelta(days=1) if until else None, min_score=min_score,
        include_deleted=bool(query.get("deleted")), limit=size, offset=(number - 1) * size)
    return {"images": images, "query": dict(query), "page": number, "size": size,
            "versions": await console.store.adapters(), "next_query": urlencode({**query, "page": number + 1})}


# --- admin: adapters, runs, experiments, jobs -------------------------------------------------

@routes.get("/admin")
@page("admin.html")
async def admin(request: web.Request) -> dict[str, Any]:
    console = _console(request)
    return {"counts": await console.store.counts(), "jobs": sorted(console.jobs.jobs.values(), key=lambda j: -j.id),
            "datasets": console.jobs.datasets(), "runs": console.jobs.runs(),
            "adapters": await console.adapters(), "error": request.query.get("error")}


@routes.post("/admin/jobs/{kind}")
async def start_job(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    kind = request.match_info["kind"]
    if kind not in KINDS:
        raise web.HTTPNotFound(text="No such job.")
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    try:
        job = console.jobs.submit(kind, form)
    except JobError as exc:
        raise web.HTTPSeeOther("/admin?" + urlencode({"error": str(exc)})) from None
    raise web.HTTPSeeOther(f"/admin/jobs/{job.id}")


def _admin_job(request: web.Request) -> Any:
    try:
        return _console(request).jobs.jobs[int(request.match_info["job_id"])]
    except (KeyError, ValueError):
        raise web.HTTPNotFound(text="No such job (jobs are forgotten when the console restarts).") from None


@routes.get("/admin/jobs/{job_id:\\d+}")
@page("admin_job.html")
async def admin_job(request: web.Request) -> dict[str, Any]:
    return {"job": _admin_job(request)}


@routes.get("/admin/jobs/{job_id:\\d+}/events")
async def admin_job_events(request: web.Request) -> web.StreamResponse:
    job = _admin_job(request)
    return await _stream(request, _console(request).jobs.listen(job.id))


def _file_in(folder: Path, name: str) -> Path:
    """`folder/name` for a name from a URL, refusing anything that would leave the folder."""
    path = (folder / name).resolve()
    if path.parent != folder.resolve() or not path.is_file():
        raise web.HTTPNotFound(text="No such file.")
    return path


@routes.get("/admin/compare/{file}")
async def compare_grid(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(_file_in(_console(request).jobs.compare_dir, request.match_info["file"]))


@routes.get("/admin/adapters")
@page("adapters.html")
async def adapters_page(request: web.Request) -> dict[str, Any]:
    from console.charts import label, wilson_interval

    console = _console(request)
    stats = await console.store.adapter_stats()
    rows = [{"stats": s, "label": label(s), "interval": wilson_interval(s.likes, s.votes)} for s in stats]
    return {"rows": rows, "versions": await console.store.adapters()}


@routes.get("/admin/adapters/like-rate.svg")
async def like_rate_svg(request: web.Request) -> web.Response:
    from console.charts import like_rate_chart

    stats = await _console(request).store.adapter_stats()
    svg = await asyncio.to_thread(like_rate_chart, stats)
    return web.Response(body=svg, content_type="image/svg+xml")


@routes.get("/admin/adapters/votes")
@page("votes.html")
async def adapter_votes(request: web.Request) -> dict[str, Any]:
    """The votes behind one point of the chart (?adapter=NAME&version=N; no adapter: the base model)."""
    adapter = request.query.get("adapter") or None
    version_text = request.query.get("version", "")
    version = int(version_text) if version_text.lstrip("-").isdigit() else None
    votes = await _console(request).store.adapter_votes(adapter, version, limit=VOTES_SHOWN)
    return {"adapter": adapter, "version": version, "votes": votes, "limit": VOTES_SHOWN}


@routes.get("/admin/runs")
@page("runs.html")
async def runs_page(request: web.Request) -> dict[str, Any]:
    from training.runs import list_runs

    console = _console(request)
    runs = await asyncio.to_thread(list_runs, console.jobs.runs_dir)
    versions = {(a.training_run_id): a for a in await console.store.adapters() if a.training_run_id is not None}
    return {"runs": runs, "versions": versions}


@routes.get("/admin/runs/{run}/loss.svg")
async def run_loss_svg(request: web.Request) -> web.Response:
    from training.images import figure_bytes, loss_figure
    from training.runs import read_run

    folder = _console(request).jobs.runs_dir
    run = await asyncio.to_thread(read_run, _file_in(folder, request.match_info["run"] + "/report.json").parent)
    if run is None:
        raise web.HTTPNotFound(text="No such run.")
    svg = await asyncio.to_thread(lambda: figure_bytes(loss_figure(run.train_points, run.validation_points), "svg"))
    return web.Response(body=svg, content_type="image/svg+xml")


@routes.get("/admin/runs/{run}/samples/{file}")
async def run_sample(request: web.Request) -> web.StreamResponse:
    folder = _console(request).jobs.runs_dir / request.match_info["run"]
    if folder.resolve().parent != _console(request).jobs.runs_dir.resolve():
        raise web.HTTPNotFound(text="No such run.")
    return web.FileResponse(_file_in(folder / "samples", request.match_info["file"]))


@routes.get("/admin/experiments")
@page("experiments.html")
async def experiments_page(request: web.Request) -> dict[str, Any]:
    console = _console(request)
    gate = experiments.GateSettings.from_config(console.config.loop)
    raters = RaterSettings.from_config(console.config.curation)
    rows = []
    decisions = {d.experiment_id: d for d in await console.store.experiment_decisions()}
    for experiment in await console.store.experiments():
        verdict = await console.store.call(experiments.experiment_verdict, experiment, gate, raters)
        rows.append({"experiment": experiment, "verdict": verdict, "line": experiments.describe(experiment, verdict),
                     "decision": decisions.get(experiment.id)})
    return {"rows": rows}


@routes.post("/admin/experiments/{experiment_id:\\d+}/{decision:promote|retire}")
async def decide(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    session = _session(request)
    experiment_id = int(request.match_info["experiment_id"])
    found = [e for e in await console.store.experiments() if e.id == experiment_id]
    if not found:
        raise web.HTTPNotFound(text="No such experiment.")
    gate = experiments.GateSettings.from_config(console.config.loop)
    raters = RaterSettings.from_config(console.config.curation)
    verdict = await console.store.call(experiments.experiment_verdict, found[0], gate, raters)
    await console.store.decide_experiment(experiment_id, decision=request.match_info["decision"],
                                          reason="admin", decided_by=f"admin:{session.identity}",
                                          figures=verdict.to_dict())
    raise web.HTTPSeeOther("/admin/experiments")


# --- the application --------------------------------------------------------------------------

def create_console_app(config: Config, secrets: Secrets, service_url: str) -> web.Application:
    console = Console(config, secrets, service_url)
    app = web.Application(middlewares=[sessions_and_guards], client_max_size=MAX_INIT_IMAGE_BYTES + 1024 * 1024)
    app[CONSOLE_KEY] = console
    package = resources.files("console")
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(package / "templates")),
                         autoescape=jinja2.select_autoescape(default=True))
    app[aiohttp_jinja2.static_root_key] = "/static"
    app.router.add_static("/static", str(package / "static"))
    app.add_routes(routes)

    async def start(app: web.Application) -> None:
        await console.start()

    async def stop(app: web.Application) -> None:
        await console.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


@dataclass
class RunningConsole:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def console(self) -> Console:
        return self.app[CONSOLE_KEY]

    @property
    def login_url(self) -> str:
        """The URL that logs the browser in as admin: print it once, at start."""
        return f"{self.url}/login?" + urlencode({"token": self.console.admin_token})

    async def stop(self) -> None:
        """Stop serving (idempotent): the console's event streams end, its follow tasks are cancelled."""
        if self.runner.server is not None:
            await self.runner.cleanup()


async def start_console(config: Config, secrets: Secrets, service_url: str, host: str | None = None,
                        port: int | None = None) -> RunningConsole:
    """Serve the console on host:port ([console] by default; port 0: an ephemeral one)."""
    host = config.console.host if host is None else host
    port = config.console.port if port is None else port
    refusal = exposure_refusal(host, secrets.console_token)
    if refusal:
        raise PermissionError(refusal)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    app = create_console_app(config, secrets, service_url)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    await web.SockSite(runner, sock).start()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return RunningConsole(url=f"http://{shown}:{bound_port}", app=app, runner=runner)
