"""The feedback store: schema and migrations, the bot's calls, stats, and the training records."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlite_utils import Database

from loraloop.config import Config
from loraloop.store import (
    MIGRATION_NAMES,
    AsyncStore,
    DatabaseBusyError,
    NewerDatabaseError,
    NotFoundError,
    Store,
    StoreError,
    migrations,
)

PNG = b"\x89PNG\r\n\x1a\n fake but distinct bytes"


class Clock:
    """A settable UTC clock, so tests can make last week's images."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    with Store(tmp_path / "db" / "loraloop.db", tmp_path / "data", clock=clock) as store:
        yield store


def make_image(store: Store, job_id: str = "job-1", *, requester_id: int = 1, index: int = 0,
               adapters=(), png: bytes | None = None, prompt: str = "a red fox") -> int:
    generation_id = store.record_generation(
        job_id=job_id, requester_id=requester_id, prompt=prompt, adapters=adapters
    )
    return store.add_image(generation_id, index=index, seed=index, width=64, height=64,
                           png=png or PNG + job_id.encode() + bytes([index]))


# --- schema ---------------------------------------------------------------------------------


def test_a_new_database_uses_wal_foreign_keys_and_a_busy_timeout(store):
    conn = store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    assert store.schema_version() == MIGRATION_NAMES


def test_an_older_database_is_upgraded_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    db = Database(path)
    migrations.apply(db, stop_before="0002_query_indexes")
    db.execute(
        "INSERT INTO generations (job_id, prompt, created_at) VALUES ('old-job', 'a cat', '2026')"
    )
    db.close()

    with Store(path, tmp_path / "data") as store:
        assert store.schema_version() == MIGRATION_NAMES
        assert store.generation_for_job("old-job").prompt == "a cat"
        indexes = {row[0] for row in store.db.conn.execute("SELECT name FROM sqlite_master")}
        assert "images_created_at" in indexes


def test_a_database_from_a_newer_version_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "new.db"
    Store(path, tmp_path / "data").close()
    db = Database(path)
    db["_sqlite_migrations"].insert(
        {"migration_set": "loraloop", "name": "0099_from_the_future", "applied_at": "2030"}
    )
    db.close()

    with pytest.raises(NewerDatabaseError, match=r"newer loraloop.*0099_from_the_future.*Upgrade"):
        Store(path, tmp_path / "data")


def test_a_file_that_is_not_a_database_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "loraloop.db"
    path.write_bytes(b"these are holiday photos, not SQLite" * 200)
    with pytest.raises(StoreError, match=r"not a loraloop database or is damaged.*backup"):
        Store(path, tmp_path / "data")


def test_the_store_follows_the_config(tmp_path):
    config = Config().replace("store", database=str(tmp_path / "elsewhere.db"), busy_timeout_s=2.5)
    with Store.from_config(config) as store:
        assert store.db_path == tmp_path / "elsewhere.db"
        assert store.db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500


# --- generations and images -----------------------------------------------------------------


def test_recording_the_same_job_twice_returns_the_first_generation(store):
    first = store.record_generation(job_id="j", requester_id=5, prompt="a fox",
                                    parameters={"steps": 20, "guidance": 7.5},
                                    adapters=[{"name": "pixel@3", "weight": 0.8}])
    again = store.record_generation(job_id="j", requester_id=5, prompt="a fox")
    assert again == first
    generation = store.generation(first)
    assert generation.parameters == {"steps": 20, "guidance": 7.5}
    assert generation.adapters == [{"name": "pixel@3", "weight": 0.8}]
    store.add_image(first, index=0, seed=1, width=8, height=8, png=PNG)
    assert [(s.adapter, s.version) for s in store.adapter_stats()] == [("pixel", 3)]


def test_a_finished_generation_keeps_its_status_error_timings_and_resolved_adapters(store, clock):
    generation_id = store.record_generation(job_id="j", prompt="a fox",
                                            adapters=[{"name": "pixel"}])
    store.add_image(generation_id, index=0, seed=1, width=8, height=8, png=PNG)
    clock.now += dt.timedelta(seconds=3)
    store.update_generation(generation_id, status="failed", error="out of memory",
                            queue_ms=120, duration_ms=2900,
                            adapters=[{"name": "pixel", "version": 4, "weight": 1.0}])
    generation = store.generation(generation_id)
    assert (generation.status, generation.error) == ("failed", "out of memory")
    assert (generation.queue_ms, generation.duration_ms) == (120, 2900)
    assert generation.finished_at == "2026-11-20T12:00:03.000+00:00"
    assert [(s.adapter, s.version) for s in store.adapter_stats()] == [("pixel", 4)]


def test_updating_a_generation_that_does_not_exist_is_an_error(store):
    with pytest.raises(NotFoundError):
        store.update_generation(999, status="done")
    with pytest.raises(ValueError, match="status"):
        store.record_generation(job_id="j", prompt="x", status="exploded")


def test_images_are_stored_once_by_content_under_a_path_relative_to_the_data_dir(store):
    generation_id = store.record_generation(job_id="j", prompt="a fox")
    first = store.add_image(generation_id, index=0, seed=1, width=64, height=64, png=PNG)
    twin = store.add_image(generation_id, index=1, seed=1, width=64, height=64, png=PNG)
    image = store.image(first)
    sha = hashlib.sha256(PNG).hexdigest()
    assert image.sha256 == sha
    assert image.path == f"images/{sha[:2]}/{sha}.png"
    assert store.image_path(image).read_bytes() == PNG
    assert store.image(twin).path == image.path
    assert len(list((store.data_dir / "images").rglob("*.png"))) == 1
    # Discord or the bot retrying: the same generation and index is the same image.
    assert store.add_image(generation_id, index=0, seed=1, width=64, height=64, png=PNG) == first


def test_the_data_directory_can_move(tmp_path):
    with Store(tmp_path / "loraloop.db", tmp_path / "data") as store:
        image_id = make_image(store)
    shutil.move(tmp_path / "data", tmp_path / "moved")
    with Store(tmp_path / "loraloop.db", tmp_path / "moved") as store:
        assert store.image_path(store.image(image_id)).read_bytes().startswith(PNG)


def test_an_image_for_a_missing_generation_is_refused(store):
    with pytest.raises(NotFoundError):
        store.add_image(42, index=0, seed=0, width=8, height=8, png=PNG)


def test_a_reaction_finds_its_image_through_the_message_id(store):
    image_id = make_image(store)
    store.set_image_message(image_id, 777)
    assert store.image_for_message(777).id == image_id
    assert store.image_for_message(778) is None
    other = make_image(store, "job-2")
    with pytest.raises(StoreError, match="one image per message"):
        store.set_image_message(other, 777)


def test_the_newest_posted_images_come_with_their_channel_for_catching_up(store):
    generation_id = store.record_generation(job_id="j", prompt="a fox", channel_id=900)
    posted = [store.add_image(generation_id, index=i, seed=i, width=8, height=8,
                              png=PNG + bytes([i])) for i in range(3)]
    store.add_image(generation_id, index=3, seed=3, width=8, height=8, png=PNG + b"unposted")
    for message_id, image_id in enumerate(posted, start=500):
        store.set_image_message(image_id, message_id)
    newest = store.posted_images(limit=2)
    assert [(image.id, channel) for image, channel in newest] == [(posted[2], 900), (posted[1], 900)]
    assert [i.index for i in store.images_for_generation(generation_id)] == [0, 1, 2, 3]


# --- votes, flags, opt-out -----------------------------------------------------------------


def test_one_vote_per_user_per_image_and_the_latest_wins(store):
    image_id = make_image(store)
    assert store.set_vote(image_id, 10, +1, "👍") is True
    assert store.set_vote(image_id, 10, -1, "👎") is True
    assert [(v.user_id, v.value, v.emoji) for v in store.votes_for(image_id)] == [(10, -1, "👎")]


def test_a_repeated_reaction_event_changes_nothing(store, clock):
    image_id = make_image(store)
    store.set_vote(image_id, 10, +1, "👍")
    clock.now += dt.timedelta(minutes=1)
    assert store.set_vote(image_id, 10, +1, "👍") is False
    assert store.votes_for(image_id)[0].updated_at == "2026-11-20T12:00:00.000+00:00"


def test_removing_a_reaction_withdraws_the_vote(store):
    image_id = make_image(store)
    store.set_vote(image_id, 10, +1, "👍")
    assert store.remove_vote(image_id, 10, "👍") is True
    assert store.votes_for(image_id) == []
    assert store.remove_vote(image_id, 10, "👍") is False


def test_removing_an_older_reaction_keeps_the_newer_vote(store):
    image_id = make_image(store)
    store.set_vote(image_id, 10, +1, "👍")
    store.set_vote(image_id, 10, -1, "👎")
    assert store.remove_vote(image_id, 10, "👍") is False
    assert [v.value for v in store.votes_for(image_id)] == [-1]


def test_a_vote_must_be_up_or_down_on_an_existing_image(store):
    image_id = make_image(store)
    with pytest.raises(ValueError, match="a vote is"):
        store.set_vote(image_id, 10, 2, "🔥")
    with pytest.raises(NotFoundError):
        store.set_vote(image_id + 100, 10, 1, "👍")


def test_flags_are_kept_apart_from_votes_and_can_be_withdrawn(store):
    image_id = make_image(store)
    assert store.flag(image_id, 10, "nsfw") is True
    assert store.flag(image_id, 10, "nsfw") is False
    store.flag(image_id, 11, "artifact")
    assert store.flags_for(image_id) == [(10, "nsfw"), (11, "artifact")]
    assert store.votes_for(image_id) == []
    assert store.unflag(image_id, 10, "nsfw") is True
    assert store.flags_for(image_id) == [(11, "artifact")]
    with pytest.raises(ValueError, match="nsfw, artifact"):
        store.flag(image_id, 10, "ugly")


def test_opting_out_and_back_in(store):
    assert store.is_opted_out(10) is False
    store.opt_out(10)
    store.opt_out(10)
    assert store.is_opted_out(10) is True
    store.opt_in(10)
    assert store.is_opted_out(10) is False


# --- stats ----------------------------------------------------------------------------------


def test_stats_per_adapter_version_count_images_votes_and_likes(store):
    v1 = make_image(store, "a", adapters=[{"name": "pixel", "version": 1}])
    v2 = make_image(store, "b", adapters=[{"name": "pixel", "version": 2}])
    v2b = make_image(store, "c", adapters=[{"name": "pixel", "version": 2}])
    base = make_image(store, "d")
    for user, value in [(10, 1), (11, -1)]:
        store.set_vote(v1, user, value, "x")
    for user in (10, 11, 12):
        store.set_vote(v2, user, 1, "x")
    store.set_vote(v2b, 10, -1, "x")
    store.set_vote(base, 10, 1, "x")

    stats = {(s.adapter, s.version): s for s in store.adapter_stats()}
    assert set(stats) == {(None, None), ("pixel", 1), ("pixel", 2)}
    assert (stats["pixel", 2].images, stats["pixel", 2].votes, stats["pixel", 2].likes) == (2, 4, 3)
    assert stats["pixel", 2].like_rate == 0.75
    assert stats["pixel", 1].like_rate == 0.5
    assert stats[None, None].images == 1
    assert [s.version for s in store.adapter_stats("pixel")] == [1, 2]


def test_top_images_of_the_week_leave_out_old_and_nsfw_images(store, clock):
    old = make_image(store, "old")
    clock.now += dt.timedelta(days=8)
    good = make_image(store, "good")
    best = make_image(store, "best")
    nsfw = make_image(store, "nsfw")
    unloved = make_image(store, "unloved")
    for image_id, likes in [(old, 5), (good, 1), (best, 3), (nsfw, 9)]:
        for user in range(likes):
            store.set_vote(image_id, 100 + user, 1, "👍")
    store.set_vote(unloved, 100, -1, "👎")
    store.flag(nsfw, 100, "nsfw")

    top = store.top_images(limit=5)
    assert [t.image_id for t in top] == [best, good]
    assert (top[0].likes, top[0].score, top[0].prompt) == (3, 3, "a red fox")


# --- training records -----------------------------------------------------------------------


def test_training_runs_and_adapter_versions_are_recorded(store):
    run_id = store.record_training_run(config={"rank": 8}, dataset_path="/d/set",
                                       dataset_hash="abc123")
    store.update_training_run(run_id, status="done", metrics={"loss": 0.1})
    run = store.training_run(run_id)
    assert (run.status, run.metrics, run.config, run.dataset_hash) == (
        "done", {"loss": 0.1}, {"rank": 8}, "abc123")
    assert run.finished_at is not None

    adapter_id = store.record_adapter(name="pixel", version=1, file_sha256="f00",
                                      training_run_id=run_id)
    assert store.record_adapter(name="pixel", version=1, file_sha256="f00") == adapter_id
    with pytest.raises(StoreError, match="new version"):
        store.record_adapter(name="pixel", version=1, file_sha256="bad")
    store.record_adapter(name="ink", version=1, file_sha256="0ff")
    assert [(a.name, a.version, a.training_run_id) for a in store.adapters()] == [
        ("ink", 1, None), ("pixel", 1, run_id)]
    assert [a.name for a in store.adapters("pixel")] == ["pixel"]


# --- locking --------------------------------------------------------------------------------


def hold_write_lock(path: Path, seconds: float, locked: threading.Event) -> threading.Thread:
    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO users (user_id, opted_out, updated_at) VALUES (1, 0, 'now')")
        locked.set()
        threading.Event().wait(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


def test_a_locked_database_makes_a_write_wait_and_then_succeed(store):
    image_id = make_image(store)
    locked = threading.Event()
    holder = hold_write_lock(store.db_path, 0.5, locked)
    locked.wait(5)
    assert store.set_vote(image_id, 10, 1, "👍") is True
    holder.join()
    assert [v.user_id for v in store.votes_for(image_id)] == [10]


def test_a_lock_held_past_the_timeout_is_a_clear_error(tmp_path):
    with Store(tmp_path / "x.db", tmp_path / "data", busy_timeout_s=0.2) as store:
        image_id = make_image(store)
        locked = threading.Event()
        holder = hold_write_lock(store.db_path, 1.5, locked)
        locked.wait(5)
        with pytest.raises(DatabaseBusyError, match=r"stayed locked.*try again"):
            store.set_vote(image_id, 10, 1, "👍")
        holder.join()
        # Nothing half-done is left behind: the next write goes through.
        assert store.set_vote(image_id, 10, 1, "👍") is True


# --- asyncio --------------------------------------------------------------------------------


async def test_the_async_store_runs_every_call_on_its_own_thread(tmp_path):
    store = await AsyncStore.open(tmp_path / "x.db", tmp_path / "data")
    try:
        generation_id = await store.record_generation(job_id="j", requester_id=1, prompt="fox")
        image_id = await store.add_image(generation_id, index=0, seed=1, width=8, height=8, png=PNG)
        await store.set_image_message(image_id, 55)
        assert (await store.image_for_message(55)).id == image_id
        # Concurrent callers: every vote lands, and none ran on the event loop's thread.
        await asyncio.gather(*(store.set_vote(image_id, user, 1, "👍") for user in range(200)))
        assert len(await store.votes_for(image_id)) == 200
        loop_thread = threading.get_ident()
        store_thread = await store._call(threading.get_ident)
        assert store_thread != loop_thread
    finally:
        await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.set_vote(image_id, 1, 1, "👍")


async def test_a_newer_database_is_refused_by_the_async_store_too(tmp_path):
    path = tmp_path / "new.db"
    Store(path, tmp_path / "data").close()
    db = Database(path)
    db["_sqlite_migrations"].insert(
        {"migration_set": "loraloop", "name": "0099_future", "applied_at": "2030"})
    db.close()
    with pytest.raises(NewerDatabaseError):
        await AsyncStore.open(path, tmp_path / "data")


def test_a_vote_can_carry_the_voters_name_and_the_latest_name_is_kept(store):
    image_id = make_image(store)
    store.set_vote(image_id, 10, 1, "👍", name="Bob")
    store.set_vote(image_id, 11, 1, "👍")
    store.opt_out(12)
    assert store.user_names() == {10: "Bob"}
    store.set_vote(make_image(store, "job-2"), 10, -1, "👎", name="Robert")
    assert store.user_names([10, 11]) == {10: "Robert"}
    assert store.is_opted_out(10) is False  # a name alone never opts anyone out


def test_rated_votes_are_the_votes_curation_tallies(store):
    mine = make_image(store, "job-1", requester_id=1)
    other = make_image(store, "job-2", requester_id=2, adapters=[{"name": "pixel", "version": 1}])
    store.set_vote(mine, 1, 1, "👍")  # a self-vote
    store.set_vote(mine, 10, -1, "👎")
    store.set_vote(other, 10, 1, "👍")
    store.set_vote(other, 11, 1, "👍")
    store.opt_out(11)
    assert store.rated_votes() == [(mine, 10, -1), (other, 10, 1)]
    assert store.rated_votes(include_self_votes=True) == [(mine, 1, 1), (mine, 10, -1), (other, 10, 1)]
    assert store.rated_votes(adapter="pixel") == [(other, 10, 1)]
    tallies = {i.id: (i.likes, i.dislikes) for i in store.rated_images()}
    assert tallies == {mine: (0, 1), other: (1, 0)}
