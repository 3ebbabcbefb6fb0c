"""The web console over HTTP: who may do what (sessions, the admin token, CSRF, rate limits), what its
pages never show, and the store queries behind its views.

A real generation service on the tiny model and a real console, both on 127.0.0.1, with a real
SQLite file; a plain aiohttp client stands in for the browser (tests/test_console_browser.py
drives a real one).
"""

from __future__ import annotations

import datetime as dt
import json
import re

import aiohttp
import pytest

from console.app import start_console
from console.auth import RateLimiter
from loraloop.bans import Bans
from loraloop.config import Config, Secrets
from loraloop.store import Store

ADMIN_TOKEN = "admin-secret-for-tests"
SERVICE_TOKEN = "service-secret-for-tests"


@pytest.fixture
async def running(make_service, tiny_model_dir, data_dir):
    """The service (with a token) and a console in front of it; yields (console, config)."""
    service = await make_service(token=SERVICE_TOKEN)
    config = Config().replace("service", model=str(tiny_model_dir), default_steps=2).replace(
        "console", submissions_per_minute=1)
    console = await start_console(config, Secrets(None, SERVICE_TOKEN, console_token=ADMIN_TOKEN), service.url,
                                  port=0)
    yield console, config
    await console.stop()


@pytest.fixture
async def browser():
    # An IP-address host needs the unsafe jar to keep cookies; a browser keeps them anyway.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


async def log_in(browser, url: str, name: str) -> str:
    """Log in with a name; returns the new session's CSRF token."""
    first = await browser.get(f"{url}/login")
    response = await browser.post(f"{url}/login", data={"csrf": csrf_of(await first.text()), "name": name})
    assert response.status == 200 and str(response.url) == f"{url}/"
    return csrf_of(await response.text())


async def test_admin_pages_send_a_visitor_to_the_login_and_refuse_their_posts(running, browser):
    console, _ = running
    page = await browser.get(f"{console.url}/admin/moderation", allow_redirects=False)
    assert page.status == 302 and page.headers["Location"].startswith("/login?next=")
    api = await browser.get(f"{console.url}/admin/gallery", headers={"Accept": "application/json"})
    assert api.status == 401
    csrf = await log_in(browser, console.url, "mallory")
    post = await browser.post(f"{console.url}/admin/jobs/curate", data={"csrf": csrf, "dataset": "x"})
    assert post.status == 401


async def test_a_post_without_the_sessions_csrf_token_is_refused(running, browser):
    console, _ = running
    first = await browser.get(f"{console.url}/login")
    csrf = csrf_of(await first.text())
    for sent in ({}, {"csrf": "not-the-token"}):
        refused = await browser.post(f"{console.url}/login", data={**sent, "name": "alice"}, allow_redirects=False)
        assert refused.status == 403
    accepted = await browser.post(f"{console.url}/login", data={"csrf": csrf, "name": "alice"}, allow_redirects=False)
    assert accepted.status == 303
    # A cookie-less request (another site's form) has no session, so no token can match.
    async with aiohttp.ClientSession() as stranger:
        forged = await stranger.post(f"{console.url}/logout", data={"csrf": csrf})
        assert forged.status == 403


async def test_the_login_url_makes_an_admin_and_a_wrong_token_does_not(running, browser):
    console, _ = running
    wrong = await browser.get(f"{console.url}/login?token=guess")
    assert wrong.status == 403
    admin = await browser.get(console.login_url)
    assert admin.status == 200 and str(admin.url) == f"{console.url}/admin"
    assert ADMIN_TOKEN not in await admin.text()


async def test_no_page_shows_the_service_token_the_admin_token_or_a_server_path(running, browser, data_dir):
    console, _ = running
    await browser.get(console.login_url)
    for path in ("/", "/admin", "/admin/moderation", "/admin/gallery", "/admin/adapters", "/admin/runs",
                 "/admin/experiments", "/rate", "/me", "/login"):
        response = await browser.get(f"{console.url}{path}")
        text = await response.text()
        assert response.status == 200, path
        for secret in (SERVICE_TOKEN, ADMIN_TOKEN, str(data_dir)):
            assert secret not in text, f"{path} shows {secret}"


async def test_a_person_may_submit_only_so_many_requests_a_minute(running, browser):
    console, _ = running
    csrf = await log_in(browser, console.url, "alice")
    form = {"csrf": csrf, "prompt": "a red fox", "count": "1"}
    first = await browser.post(f"{console.url}/generate", data=form, allow_redirects=False)
    assert first.status == 303 and first.headers["Location"].startswith("/jobs/")
    second = await browser.post(f"{console.url}/generate", data=form, allow_redirects=False)
    assert second.status == 429
    assert "requests this minute" in await second.text()


async def test_a_banned_person_cannot_generate(running, browser, data_dir):
    console, config = running
    csrf = await log_in(browser, console.url, "carol")
    with Store.from_config(config) as store:
        Bans(data_dir / "bans.json").ban(store.web_user("carol"))
    refused = await browser.post(f"{console.url}/generate", data={"csrf": csrf, "prompt": "a fox"})
    assert refused.status == 403 and "banned" in await refused.text()


async def test_the_console_refuses_a_public_address_without_an_admin_token(tiny_model_dir, data_dir):
    with pytest.raises(PermissionError, match="LORALOOP_CONSOLE_TOKEN"):
        await start_console(Config(), Secrets(None, None), "http://127.0.0.1:1", host="0.0.0.0", port=0)


def test_the_rate_limit_is_a_sliding_window_per_identity():
    now = [0.0]
    limiter = RateLimiter(2, window=60, clock=lambda: now[0])
    assert limiter.allow("web:a") and limiter.allow("web:a") and not limiter.allow("web:a")
    assert limiter.allow("web:b")
    now[0] = 60.0
    assert limiter.allow("web:a")


def test_a_ban_made_in_one_place_holds_in_the_other(tmp_path):
    bots, consoles = Bans(tmp_path / "bans.json"), Bans(tmp_path / "bans.json")
    assert consoles.ban(-3)
    assert bots.is_banned(-3)
    assert bots.unban(-3)
    assert not consoles.is_banned(-3)


# --- the store queries behind the views ----------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "db.sqlite", tmp_path / "data") as store:
        yield store


def image(store: Store, prompt: str, requester: int | None, adapter: tuple[str, int] | None = None) -> int:
    generation = store.record_generation(job_id=f"job-{prompt}", prompt=prompt, requester_id=requester,
                                         adapters=[{"name": adapter[0], "version": adapter[1]}] if adapter else [])
    return store.add_image(generation, index=0, seed=1, width=64, height=64, png=prompt.encode())


def test_web_identities_get_negative_ids_that_stay_theirs(store):
    alice, bob = store.web_user("alice"), store.web_user("bob")
    assert alice < 0 and bob < 0 and alice != bob
    assert store.web_user("alice") == alice
    assert store.user_names([alice]) == {alice: "web:alice"}


def test_rate_a_batch_shows_only_images_the_person_has_not_made_rated_flagged_or_seen_deleted(store):
    alice, bob = store.web_user("alice"), store.web_user("bob")
    own, voted, flagged, deleted, skipped, fresh = (
        image(store, name, alice if name == "own" else bob)
        for name in ("own", "voted", "flagged", "deleted", "skipped", "fresh"))
    store.set_vote(voted, alice, 1, "👍")
    store.flag(flagged, alice, "nsfw")
    store.mark_image_deleted(deleted, bob)
    assert [i.id for i in store.unrated_images(alice, limit=10, skip=[skipped])] == [fresh]
    assert own not in [i.id for i in store.unrated_images(alice, limit=10)]


def test_the_gallery_filters_by_adapter_version_score_and_date_and_the_queue_holds_flagged_images(store):
    voter = store.web_user("bob")
    base, v1, v2 = image(store, "base", 1), image(store, "v1", 1, ("fox", 1)), image(store, "v2", 1, ("fox", 2))
    store.set_vote(v1, voter, 1, "👍")
    store.set_vote(v2, voter, -1, "👎")
    store.flag(base, voter, "nsfw")
    assert [i.id for i in store.listed_images(adapter="fox")] == [v2, v1]
    assert [i.id for i in store.listed_images(adapter="fox", adapter_version=1)] == [v1]
    assert [i.id for i in store.listed_images(min_score=1)] == [v1]
    assert store.listed_images(since=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)) == []
    queue = store.listed_images(flagged=True)
    assert [(i.id, i.flags) for i in queue] == [(base, ("nsfw",))]
    store.mark_image_deleted(base, None)
    assert store.listed_images(flagged=True) == []
    assert store.listed_image(v1).adapters == (("fox", 1),) and store.listed_image(v1).likes == 1


def test_the_queue_holds_what_the_safety_check_flagged_and_rate_a_batch_never_shows_it(store):
    rater = store.web_user("carol")
    generation = store.record_generation(job_id="job-checked", prompt="checked", requester_id=None, adapters=[])
    passed = store.add_image(generation, index=0, seed=1, width=64, height=64, png=b"ok", nsfw=False)
    spoilered = store.add_image(generation, index=1, seed=2, width=64, height=64, png=b"sp", nsfw=True)
    blocked = store.add_image(generation, index=2, seed=3, width=64, height=64, png=b"bl", nsfw=True, blocked=True)
    queue = store.listed_images(flagged=True)
    assert [(i.id, i.nsfw, i.blocked) for i in queue] == [(blocked, True, True), (spoilered, True, False)]
    assert [i.id for i in store.unrated_images(rater, limit=10)] == [passed]


def test_the_votes_behind_a_like_rate_are_those_adapter_stats_counts(store):
    bob, carol = store.web_user("bob"), store.web_user("carol")
    base, v1 = image(store, "base", 1), image(store, "v1", 1, ("fox", 1))
    store.set_vote(v1, bob, 1, "👍", name="web:bob")
    store.set_vote(v1, carol, -1, "👎", name="web:carol")
    store.set_vote(base, bob, 1, "👍")
    stats = {(s.adapter, s.version): s for s in store.adapter_stats()}
    behind = store.adapter_votes("fox", 1)
    assert len(behind) == stats[("fox", 1)].votes == 2
    assert sorted((v.name, v.value) for v in behind) == [("web:bob", 1), ("web:carol", -1)]
    assert [v.image_id for v in store.adapter_votes(None, None)] == [base] and stats[(None, None)].votes == 1


async def test_a_job_asked_for_before_the_console_restarted_still_reaches_the_store(running, browser, make_service):
    console, config = running
    csrf = await log_in(browser, console.url, "alice")
    service_url = console.console.client.base_url
    async with aiohttp.ClientSession() as raw:
        await raw.post(f"{service_url}/v1/queue/pause", headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})
    submitted = await browser.post(f"{console.url}/generate", data={"csrf": csrf, "prompt": "a fox"},
                                   allow_redirects=False)
    job_path = submitted.headers["Location"]
    await console.stop()
    again = await start_console(config, Secrets(None, SERVICE_TOKEN, console_token=ADMIN_TOKEN), service_url, port=0)
    try:
        async with aiohttp.ClientSession() as raw:
            await raw.post(f"{service_url}/v1/queue/resume", headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})
            events = await raw.get(f"{again.url}{job_path}/events")
            last = [line for line in (await events.text()).splitlines() if line.startswith("data:")][-1]
        assert '"final": true' in last and '"state": "done"' in last
        with Store.from_config(config) as store:
            generation = store.generation_for_job(job_path.rsplit("/", 1)[1])
            assert generation.status == "done" and len(store.images_for_generation(generation.id)) == 1
    finally:
        await again.stop()


async def test_a_jobs_page_hears_its_queue_position_each_step_its_previews_and_then_its_stored_images(
        make_service, tiny_model_dir, browser):
    service = await make_service(preview_every=1, default_steps=3)
    config = Config().replace("service", model=str(tiny_model_dir))
    console = await start_console(config, Secrets(None, None), service.url, port=0)
    try:
        csrf = await log_in(browser, console.url, "alice")
        async with aiohttp.ClientSession() as raw:
            await raw.post(f"{service.url}/v1/queue/pause")
            submitted = await browser.post(f"{console.url}/generate", data={"csrf": csrf, "prompt": "a fox"},
                                           allow_redirects=False)
            events = []
            async with raw.get(f"{console.url}{submitted.headers['Location']}/events") as stream:
                async for line in stream.content:
                    if line.startswith(b"data:"):
                        events.append(json.loads(line[5:]))
                        if len(events) == 1:
                            await raw.post(f"{service.url}/v1/queue/resume")
        assert events[0]["state"] == "queued" and events[0]["position"] == 0
        steps = [e["step"] for e in events if e["state"] == "running" and e["total_steps"]]
        assert steps == sorted(steps) and steps[-1] == 3
        assert any(e.get("preview") for e in events)
        assert events[-1]["final"] and [i["width"] for i in events[-1]["images"]] == [64]
    finally:
        await console.stop()


async def test_an_admin_job_that_cannot_run_says_why_on_its_page_without_server_paths(running, browser, data_dir):
    console, _ = running
    admin = await browser.get(console.login_url)
    csrf = csrf_of(await admin.text())
    refused = await browser.post(f"{console.url}/admin/jobs/train", data={"csrf": csrf, "dataset": "none",
                                                                         "name": "fox"})
    assert "pick a curated dataset" in await refused.text()
    started = await browser.post(f"{console.url}/admin/jobs/curate", data={"csrf": csrf, "dataset": "liked"},
                                 allow_redirects=False)
    events = await browser.get(f"{console.url}{started.headers['Location']}/events")
    final = json.loads([line for line in (await events.text()).splitlines() if line.startswith("data:")][-1][5:])
    assert final["state"] == "failed" and final["message"]
    assert str(data_dir) not in final["message"]
