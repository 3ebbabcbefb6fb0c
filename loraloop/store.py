"""The feedback store: the one module that owns loraloop's SQLite schema and every query on it.

The bot writes to it (requests, images, votes, flags, opt-outs); training reads from it
(curation) and writes back what it made (training runs, adapter versions). It imports only the
standard library and sqlite-utils, so every package can use it without torch or discord.py.

    store = Store(config.database_path, config.data_dir)         # migrates when built
    gen = store.record_generation(job_id="j1", requester_id=42, prompt="a red fox",
                                  parameters={"steps": 20}, adapters=[{"name": "pixel", "version": 3}])
    img = store.add_image(gen, index=0, seed=7, width=512, height=512, png=png_bytes)
    store.set_image_message(img, message_id=1234)
    store.set_vote(store.image_for_message(1234).id, user_id=99, value=+1, emoji="👍")

From asyncio (the bot) use `AsyncStore`: the same methods as coroutines, run on one executor
thread that owns the connection, so no SQLite call ever blocks the event loop:

    store = await AsyncStore.open(db_path, data_dir)
    await store.set_vote(image_id, user_id, +1, "👍")
    await store.close()

The API (every write is one transaction; those Discord can repeat are idempotent):
- generations: `record_generation` (idempotent per job id) -> id, `update_generation`
  (status, error, queue_ms, duration_ms), `generation`, `generation_for_job`.
- images: `add_image` (PNG bytes stored under DATA_DIR/images by sha256; idempotent per
  generation and index) -> id, `set_image_message`, `image_for_message`, `image`, `image_path`,
  `images_for_generation`, `posted_images` (newest images shown in Discord, for catching up).
- ratings: `set_vote` (one vote per user per image, latest wins), `remove_vote` (withdraws the
  vote only if it was cast with that emoji), `votes_for`.
- flags (kept apart from taste): `flag(image_id, user_id, "nsfw" | "artifact")`, `unflag`,
  `flags_for`.
- users: `opt_out`, `opt_in`, `is_opted_out` (opted-out users' images and votes never reach a
  dataset), `web_user` (the web console's `web:<name>` identities, negative ids beside Discord's).
- the web console: `listed_images` (gallery and moderation queue, filtered), `listed_image`,
  `unrated_images` (rate-a-batch), `adapter_votes` (the votes behind a like rate), `training_runs`.
- stats: `adapter_stats` (per adapter version: images, votes, like rate), `top_images`
  (best net score since a time, a week by default), `counts`.
- training: `record_training_run`, `update_training_run`, `training_run`, `record_adapter`,
  `adapters`.
- curation: `rated_images` (images with their vote tallies after excluding self-votes and
  opted-out voters), `rated_votes` (the same votes one by one, for the rater model),
  `set_image_phash` (a cache for near-duplicate detection).
- raters: `set_vote(..., name=)` remembers the voter's display name, `user_names`,
  `save_rater_weights` / `rater_weights` (what the loop last estimated).
- experiments (loraloop/experiments.py): `record_adapter(..., experiment=)` publishes a
  candidate and starts its experiment at once, `running_experiment`, `default_version` (what
  `/imagine style:NAME` gets outside experiments), `record_generation(..., experiment_id=, arm=)`,
  `experiment_votes` / `experiment_images` (the arms' tallies), `decide_experiment`,
  `experiment_decisions`, `pending_announcements` / `mark_announced` (the admin channel),
  `votes_since` (is a new round due?), `adapter_names`.

Durability: WAL with synchronous=NORMAL survives the process being killed at any point (a
committed transaction is in the WAL file before the call returns); only an OS crash or power
loss can lose the last commits, which `[store] synchronous = "FULL"` prevents at some speed.
Concurrency: writes take the write lock up front (BEGIN IMMEDIATE), so a busy database makes
them wait and retry for up to `busy_timeout_s`, never fail halfway through a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlite_utils import Database, Migrations

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

FLAG_KINDS = ("nsfw", "artifact")
GENERATION_STATUSES = ("queued", "running", "done", "failed", "cancelled")
TRAINING_STATUSES = ("running", "done", "failed")
IMAGES_DIRNAME = "images"


class StoreError(Exception):
    """A problem with the store a person can act on; the message says what to do."""


class NewerDatabaseError(StoreError):
    """The database was written by a newer loraloop than this one."""


class DatabaseBusyError(StoreError):
    """Another process held the write lock for longer than the busy timeout."""


class NotFoundError(StoreError, LookupError):
    """A row the caller named (a generation, image, training run) does not exist."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _timestamp(moment: dt.datetime) -> str:
    # One fixed format, so timestamps compare correctly as strings in SQL range queries.
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (use UTC)")
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")


# --- schema ---------------------------------------------------------------------------------
# Numbered migrations, applied in order when a Store is built. Never edit or renumber one that
# has shipped: add the next number. A database holding a migration this list does not know was
# made by a newer loraloop and is refused.

migrations = Migrations("loraloop")
MIGRATION_NAMES: list[str] = []


def _migration(name: str) -> Callable[[Callable[[Database], None]], Callable[[Database], None]]:
    MIGRATION_NAMES.append(name)
    return migrations(name=name)


@_migration("0001_initial")
def _m0001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE generations (
            id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL UNIQUE,          -- the id that appears in every log line
            requester_id INTEGER,                 -- Discord user id; NULL for the CLI
            guild_id INTEGER,
            channel_id INTEGER,
            message_id INTEGER,                   -- the bot's reply, once posted
            prompt TEXT NOT NULL,
            negative_prompt TEXT NOT NULL DEFAULT '',
            parameters_json TEXT NOT NULL DEFAULT '{}',
            adapters_json TEXT NOT NULL DEFAULT '[]',
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
            error TEXT,
            created_at TEXT NOT NULL,
            finished_at TEXT,
            queue_ms INTEGER,
            duration_ms INTEGER
        );
        -- The adapters of a generation again, one row each, so stats and curation can filter on
        -- them with plain SQL; adapters_json keeps exactly what the service reported.
        CREATE TABLE generation_adapters (
            generation_id INTEGER NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            version INTEGER,
            weight REAL NOT NULL DEFAULT 1.0,
            PRIMARY KEY (generation_id, name)
        );
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            generation_id INTEGER NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
            image_index INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,                   -- relative to the data directory
            message_id INTEGER UNIQUE,            -- the Discord message people react to
            phash TEXT,                           -- perceptual hash, cached by curation
            created_at TEXT NOT NULL,
            UNIQUE (generation_id, image_index)
        );
        CREATE TABLE ratings (
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL,
            value INTEGER NOT NULL CHECK (value IN (-1, 1)),
            emoji TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (image_id, user_id)
        );
        CREATE TABLE flags (
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('nsfw', 'artifact')),
            created_at TEXT NOT NULL,
            PRIMARY KEY (image_id, user_id, kind)
        );
        CREATE TABLE users (
            user_id INTEGER PRIMARY KEY,
            opted_out INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE training_runs (
            id INTEGER PRIMARY KEY,
            config_json TEXT NOT NULL,
            dataset_path TEXT NOT NULL,
            dataset_hash TEXT NOT NULL,
            metrics_json TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
            error TEXT,
            created_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE TABLE adapters (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            file_sha256 TEXT NOT NULL,
            training_run_id INTEGER REFERENCES training_runs(id),
            created_at TEXT NOT NULL,
            UNIQUE (name, version)
        );
        """
    )


@_migration("0002_query_indexes")
def _m0002_query_indexes(db: Database) -> None:
    # For curation's date-range scans, /stats per adapter, and tallying votes per image.
    db.executescript(
        """
        CREATE INDEX images_created_at ON images(created_at);
        CREATE INDEX images_sha256 ON images(sha256);
        CREATE INDEX generation_adapters_name_version ON generation_adapters(name, version);
        CREATE INDEX generations_requester ON generations(requester_id);
        """
    )


@_migration("0003_image_deletion")
def _m0003_image_deletion(db: Database) -> None:
    # An image whose Discord message was deleted (🗑) by its requester or an admin: its votes stay
    # for the history in /stats, but it leaves every future dataset and the week's top images.
    db.executescript(
        """
        ALTER TABLE images ADD COLUMN deleted_at TEXT;
        ALTER TABLE images ADD COLUMN deleted_by INTEGER;
        """
    )


@_migration("0004_rater_names")
def _m0004_rater_names(db: Database) -> None:
    # The name a rater last voted under, so `loraloop db raters` and reports can show people,
    # not only numeric ids. NULL until the bot sees them vote (or for CLI-only users).
    db.executescript("ALTER TABLE users ADD COLUMN name TEXT;")


@_migration("0005_experiments")
def _m0005_experiments(db: Database) -> None:
    # A/B experiments of a candidate adapter version against the version people get today
    # (loraloop/experiments.py), every decision with the figures behind it, the arm each
    # generation was served, and the rater weights the loop last estimated (for the bot's /stats).
    db.executescript(
        """
        CREATE TABLE experiments (
            id INTEGER PRIMARY KEY,
            adapter TEXT NOT NULL,
            control_version INTEGER NOT NULL,
            candidate_version INTEGER NOT NULL,
            share REAL NOT NULL CHECK (share > 0 AND share < 1),  -- of /imagine style:NAME requests
            status TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'promoted', 'retired')),
            settings_json TEXT NOT NULL DEFAULT '{}',              -- the gate settings it runs under
            started_at TEXT NOT NULL,
            decided_at TEXT,
            announced_at TEXT,                                     -- its start, in the admin channel
            UNIQUE (adapter, candidate_version)
        );
        -- At most one running experiment per adapter.
        CREATE UNIQUE INDEX experiments_running ON experiments(adapter) WHERE status = 'running';
        CREATE TABLE experiment_decisions (
            id INTEGER PRIMARY KEY,
            experiment_id INTEGER NOT NULL UNIQUE REFERENCES experiments(id),
            decision TEXT NOT NULL CHECK (decision IN ('promote', 'retire')),
            reason TEXT NOT NULL,
            decided_by TEXT NOT NULL,                              -- "gate" or "admin:<discord user id>"
            figures_json TEXT NOT NULL,                            -- both arms and P(better): the verdict
            created_at TEXT NOT NULL,
            announced_at TEXT
        );
        CREATE TABLE rater_weights (
            user_id INTEGER PRIMARY KEY,
            weight REAL NOT NULL,
            votes INTEGER NOT NULL,
            agreement REAL,
            computed_at TEXT NOT NULL
        );
        ALTER TABLE generations ADD COLUMN experiment_id INTEGER REFERENCES experiments(id);
        ALTER TABLE generations ADD COLUMN arm TEXT CHECK (arm IN ('control', 'candidate'));
        CREATE INDEX generations_experiment ON generations(experiment_id, arm);
        """
    )


@_migration("0006_upscale_parent")
def _m0006_upscale_parent(db: Database) -> None:
    # A generation made from one image of another (🔍 upscale): which image it enlarged.
    db.executescript(
        """
        ALTER TABLE generations ADD COLUMN parent_image_id INTEGER REFERENCES images(id);
        CREATE INDEX generations_parent ON generations(parent_image_id);
        """
    )


@_migration("0007_safety_verdicts")
def _m0007_safety_verdicts(db: Database) -> None:
    # The service's safety check per image (NULL: not checked, 0 passed, 1 flagged), and when the
    # bot's policy kept a flagged image out of its channel: such an image has no message, and it
    # and every flagged image stay out of datasets (curation sees the verdict as an 'nsfw' flag).
    db.executescript(
        """
        ALTER TABLE images ADD COLUMN nsfw INTEGER CHECK (nsfw IN (0, 1));
        ALTER TABLE images ADD COLUMN blocked_at TEXT;
        """
    )


@_migration("0008_profiles")
def _m0008_profiles(db: Database) -> None:
    # Personal styles (loraloop/profiles.py): one row per person who asked for one (or whom the
    # loop trained one for), its state, the adapter version serving now and the votes behind it.
    db.executescript(
        """
        CREATE TABLE profiles (
            user_id INTEGER PRIMARY KEY,
            status TEXT NOT NULL CHECK (status IN ('requested', 'training', 'ready', 'failed', 'deleted')),
            version INTEGER,                      -- of adapter personal-<user_id>; NULL until trained
            votes INTEGER,                        -- the person's votes that version learned from
            error TEXT,                           -- why the last training failed
            requested_at TEXT,
            trained_at TEXT,
            updated_at TEXT NOT NULL
        );
        """
    )


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    id: int
    job_id: str
    requester_id: int | None
    guild_id: int | None
    channel_id: int | None
    message_id: int | None
    prompt: str
    negative_prompt: str
    parameters: dict[str, Any]
    adapters: list[dict[str, Any]]
    status: str
    error: str | None
    created_at: str
    finished_at: str | None
    queue_ms: int | None
    duration_ms: int | None
    # The A/B experiment this request was served in, and its arm ("control" or "candidate").
    experiment_id: int | None = None
    arm: str | None = None
    # The image this generation enlarged (🔍 upscale); None for a generation from a prompt.
    parent_image_id: int | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Generation:
        values = {f.name: row[f.name] for f in dataclasses.fields(cls)
                  if f.name in row.keys()}  # noqa: SIM118  `in` on a sqlite3.Row looks at values
        values["parameters"] = json.loads(row["parameters_json"])
        values["adapters"] = json.loads(row["adapters_json"])
        return cls(**values)


@dataclass(frozen=True)
class Image:
    id: int
    generation_id: int
    index: int
    seed: int
    width: int
    height: int
    sha256: str
    path: str  # relative to the data directory
    message_id: int | None
    created_at: str
    nsfw: bool | None = None  # the service's safety verdict; None: not checked
    blocked: bool = False  # flagged and kept out of its channel by the bot's policy

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Image:
        return cls(
            id=row["id"], generation_id=row["generation_id"], index=row["image_index"],
            seed=row["seed"], width=row["width"], height=row["height"], sha256=row["sha256"],
            path=row["path"], message_id=row["message_id"], created_at=row["created_at"],
            nsfw=None if row["nsfw"] is None else bool(row["nsfw"]), blocked=row["blocked_at"] is not None,
        )


@dataclass(frozen=True)
class Vote:
    image_id: int
    user_id: int
    value: int
    emoji: str
    updated_at: str


@dataclass(frozen=True)
class AdapterStats:
    """One adapter version's reception. `adapter` None is the base model (no adapter)."""

    adapter: str | None
    version: int | None
    images: int
    votes: int
    likes: int
    dislikes: int

    @property
    def like_rate(self) -> float | None:
        return self.likes / self.votes if self.votes else None


@dataclass(frozen=True)
class TopImage:
    image_id: int
    generation_id: int
    prompt: str
    requester_id: int | None
    guild_id: int | None
    channel_id: int | None
    message_id: int | None
    likes: int
    dislikes: int

    @property
    def score(self) -> int:
        return self.likes - self.dislikes


@dataclass(frozen=True)
class RatedImage:
    """An image as curation sees it: votes tallied after the exclusions asked for."""

    id: int
    generation_id: int
    sha256: str
    path: str
    width: int
    height: int
    prompt: str
    negative_prompt: str
    requester_id: int | None
    created_at: str
    likes: int
    dislikes: int
    flags: tuple[str, ...]
    requester_opted_out: bool
    phash: str | None
    deleted: bool = False

    @property
    def raters(self) -> int:
        return self.likes + self.dislikes

    @property
    def score(self) -> int:
        return self.likes - self.dislikes


@dataclass(frozen=True)
class ListedImage:
    """An image as the web console lists it (gallery, moderation queue, rate-a-batch)."""

    id: int
    generation_id: int
    job_id: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    created_at: str
    requester_id: int | None
    likes: int
    dislikes: int
    flags: tuple[str, ...]
    deleted: bool
    adapters: tuple[tuple[str, int | None], ...]  # (name, version) the image was made with
    blind: bool  # served in an A/B experiment: show the style without its version
    nsfw: bool | None = None  # the service's safety verdict; None: not checked
    blocked: bool = False  # the bot's NSFW policy kept it out of its channel

    @property
    def score(self) -> int:
        return self.likes - self.dislikes


@dataclass(frozen=True)
class AdapterVote:
    """One vote behind a point of an adapter version's like rate."""

    image_id: int
    user_id: int
    name: str | None
    value: int
    updated_at: str


@dataclass(frozen=True)
class Profile:
    """A person's personal style (table `profiles`)."""

    user_id: int
    status: str  # requested, training, ready, failed, deleted
    version: int | None
    votes: int | None
    error: str | None
    requested_at: str | None
    trained_at: str | None


@dataclass(frozen=True)
class TrainingRun:
    id: int
    config: dict[str, Any]
    dataset_path: str
    dataset_hash: str
    metrics: dict[str, Any]
    status: str
    error: str | None
    created_at: str
    finished_at: str | None


@dataclass(frozen=True)
class AdapterVersion:
    id: int
    name: str
    version: int
    file_sha256: str
    training_run_id: int | None
    created_at: str


EXPERIMENT_STATUSES = ("running", "promoted", "retired")


@dataclass(frozen=True)
class Experiment:
    """A candidate version of an adapter on trial against the version people get today."""

    id: int
    adapter: str
    control_version: int
    candidate_version: int
    share: float
    status: str
    settings: dict[str, Any]
    started_at: str
    decided_at: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Experiment:
        return cls(id=row["id"], adapter=row["adapter"], control_version=row["control_version"],
                   candidate_version=row["candidate_version"], share=row["share"], status=row["status"],
                   settings=json.loads(row["settings_json"]), started_at=row["started_at"],
                   decided_at=row["decided_at"])


@dataclass(frozen=True)
class ExperimentDecision:
    id: int
    experiment_id: int
    decision: str  # "promote" or "retire"
    reason: str
    decided_by: str
    figures: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class Announcement:
    """Something the bot has not yet posted in the admin channel: an experiment's start or its decision."""

    kind: str  # "started" or "decided"
    experiment: Experiment
    decision: ExperimentDecision | None = None


def _as_dict(value: Any) -> dict[str, Any]:
    # Callers may pass the contract's dataclasses (which have to_dict) or plain dicts; the store
    # does not import the contract so it stays free of the generation package.
    if hasattr(value, "to_dict"):
        return dict(value.to_dict())
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"expected a dict or an object with to_dict(), got {type(value).__name__}")


def _is_busy(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _inserted_id(cursor: sqlite3.Cursor) -> int:
    # sqlite3 types lastrowid as optional because it is None before a cursor's first INSERT;
    # every caller has just inserted one row.
    row_id = cursor.lastrowid
    if row_id is None:
        raise RuntimeError("an INSERT left no row id")
    return row_id


def _options_from_config(config: Any) -> dict[str, Any]:
    return {"busy_timeout_s": config.store.busy_timeout_s, "synchronous": config.store.synchronous}


class Store:
    """The SQLite store, for one thread. Building it opens the database and migrates it."""

    def __init__(
        self,
        db_path: str | os.PathLike,
        data_dir: str | os.PathLike,
        *,
        busy_timeout_s: float = 10.0,
        synchronous: str = "NORMAL",
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        self.db_path = Path(db_path)
        self.data_dir = Path(data_dir)
        self.busy_timeout_s = busy_timeout_s
        self._clock = clock
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level stays at the default that sqlite-utils requires; writes open their own
        # BEGIN IMMEDIATE transactions (see _write).
        conn = sqlite3.connect(str(self.db_path), timeout=busy_timeout_s)
        self.db = Database(conn, execute_plugins=False)
        try:
            self._retrying(lambda: self._configure(synchronous))
            self._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            if "not a database" not in str(exc) and "malformed" not in str(exc):
                raise
            raise StoreError(
                f"{self.db_path} is not a loraloop database or is damaged ({exc}); point "
                "[store] database at another file, or restore it from a backup."
            ) from None
        except BaseException:
            conn.close()
            raise

    @classmethod
    def from_config(cls, config: Any) -> Store:
        """The store a loraloop `Config` names (duck-typed, so this module needs no import)."""
        return cls(config.database_path, config.data_dir, **_options_from_config(config))

    # --- plumbing --------------------------------------------------------------------------

    def _configure(self, synchronous: str) -> None:
        conn = self.db.conn
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        self.db.enable_wal()
        conn.execute(f"PRAGMA synchronous = {synchronous}")

    def _migrate(self) -> None:
        known = set(MIGRATION_NAMES)
        with self._write():
            applied = [m.name for m in migrations.applied(self.db)]
            unknown = [name for name in applied if name not in known]
            if unknown:
                raise NewerDatabaseError(
                    f"{self.db_path} was written by a newer loraloop (it has schema migration "
                    f"{unknown[-1]}, which this version does not know). Upgrade loraloop, or "
                    "point [store] database at another file."
                )
            pending = [m.name for m in migrations.pending(self.db)]
            migrations.apply(self.db)
        if pending:
            log.info("database %s migrated: %s", self.db_path, ", ".join(pending))

    def schema_version(self) -> list[str]:
        """The migrations applied to this database, oldest first."""
        return [m.name for m in migrations.applied(self.db)]

    def _retrying(self, fn: Callable[[], T]) -> T:
        # SQLite's busy handler already waits up to busy_timeout for a lock; some lock errors
        # come back at once anyway (a WAL checkpoint or recovery in another process), so retry
        # the statement (BEGIN IMMEDIATE, COMMIT, a read) with a growing pause until the same
        # deadline. Once BEGIN IMMEDIATE holds the write lock, nothing inside can be busy.
        deadline = time.monotonic() + self.busy_timeout_s
        pause = 0.005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as error:
                if not _is_busy(error):
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseBusyError(
                        f"{self.db_path} stayed locked by another process for more than "
                        f"{self.busy_timeout_s:g} s; close whatever holds it open for writing "
                        "(a long transaction in sqlite3 or Datasette) and try again."
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock at the start so it cannot deadlock."""
        conn = self.db.conn
        self._retrying(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                self._retrying(lambda: conn.execute("COMMIT"))
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        def run() -> list[sqlite3.Row]:
            cursor = self.db.conn.cursor()
            cursor.row_factory = sqlite3.Row
            return cursor.execute(sql, params).fetchall()

        return self._retrying(run)

    def _now(self) -> str:
        return _timestamp(self._clock())

    def now(self) -> str:
        """The store's clock as it writes timestamps (comparable with every *_at column)."""
        return self._now()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- generations -----------------------------------------------------------------------

    def record_generation(
        self,
        *,
        job_id: str,
        prompt: str,
        requester_id: int | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        negative_prompt: str = "",
        parameters: Mapping[str, Any] | None = None,
        adapters: Iterable[Any] = (),
        status: str = "queued",
        experiment_id: int | None = None,
        arm: str | None = None,
        parent_image_id: int | None = None,
    ) -> int:
        """Record a generation request; the same job id again returns the first row's id.

        `adapters`: dicts (or contract objects) with "name", optional "version", "weight",
        "sha256"; a name pinned as "pixel@3" with no version is split into name and version.
        `experiment_id`, `arm`: the A/B experiment this request was served in, and its arm
        ("control" or "candidate"). `parent_image_id`: the image an upscale enlarged.
        """
        if status not in GENERATION_STATUSES:
            raise ValueError(f"status must be one of {', '.join(GENERATION_STATUSES)}")
        adapter_list = [_as_dict(a) for a in adapters]
        adapter_rows = []
        for adapter in adapter_list:
            name, _, pinned = str(adapter["name"]).partition("@")
            version = adapter.get("version")
            if version is None and pinned.isdigit():
                version = int(pinned)
            adapter_rows.append((name, version, float(adapter.get("weight", 1.0))))
        with self._write() as conn:
            existing = conn.execute(
                "SELECT id FROM generations WHERE job_id = ?", (job_id,)
            ).fetchone()
            if existing:
                return existing[0]
            cursor = conn.execute(
                """INSERT INTO generations (job_id, requester_id, guild_id, channel_id, prompt,
                       negative_prompt, parameters_json, adapters_json, status, created_at,
                       experiment_id, arm, parent_image_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (job_id, requester_id, guild_id, channel_id, prompt, negative_prompt,
                 json.dumps(dict(parameters or {}), sort_keys=True), json.dumps(adapter_list),
                 status, self._now(), experiment_id, arm, parent_image_id),
            )
            generation_id = _inserted_id(cursor)
            conn.executemany(
                "INSERT OR REPLACE INTO generation_adapters (generation_id, name, version, weight)"
                " VALUES (?, ?, ?, ?)",
                [(generation_id, *row) for row in adapter_rows],
            )
            return generation_id

    def update_generation(
        self,
        generation_id: int,
        *,
        status: str | None = None,
        error: str | None = None,
        queue_ms: int | None = None,
        duration_ms: int | None = None,
        message_id: int | None = None,
        adapters: Iterable[Any] | None = None,
    ) -> None:
        """Change what is known about a generation; arguments left as None keep their value.

        `adapters` replaces the recorded adapters with those the service actually applied
        (versions resolved), so stats count the version that made the image.
        """
        if status is not None and status not in GENERATION_STATUSES:
            raise ValueError(f"status must be one of {', '.join(GENERATION_STATUSES)}")
        changes: dict[str, Any] = {
            "status": status, "error": error, "queue_ms": queue_ms,
            "duration_ms": duration_ms, "message_id": message_id,
        }
        changes = {k: v for k, v in changes.items() if v is not None}
        if status in ("done", "failed", "cancelled"):
            changes["finished_at"] = self._now()
        adapter_list = None if adapters is None else [_as_dict(a) for a in adapters]
        if adapter_list is not None:
            changes["adapters_json"] = json.dumps(adapter_list)
        with self._write() as conn:
            # "id = id" keeps the statement valid when only the adapters change, and still
            # tells us through rowcount whether the generation exists.
            assignments = "".join(f"{column} = ?, " for column in changes) + "id = id"
            cursor = conn.execute(
                f"UPDATE generations SET {assignments} WHERE id = ?",
                (*changes.values(), generation_id),
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no generation with id {generation_id}")
            if adapter_list is not None:
                conn.execute(
                    "DELETE FROM generation_adapters WHERE generation_id = ?", (generation_id,)
                )
                conn.executemany(
                    "INSERT OR REPLACE INTO generation_adapters"
                    " (generation_id, name, version, weight) VALUES (?, ?, ?, ?)",
                    [
                        (generation_id, str(a["name"]).partition("@")[0], a.get("version"),
                         float(a.get("weight", 1.0)))
                        for a in adapter_list
                    ],
                )

    def generation(self, generation_id: int) -> Generation:
        rows = self._rows("SELECT * FROM generations WHERE id = ?", (generation_id,))
        if not rows:
            raise NotFoundError(f"no generation with id {generation_id}")
        return Generation.from_row(rows[0])

    def generation_for_job(self, job_id: str) -> Generation | None:
        rows = self._rows("SELECT * FROM generations WHERE job_id = ?", (job_id,))
        return Generation.from_row(rows[0]) if rows else None

    def unfinished_generations(self, limit: int = 200) -> list[Generation]:
        """Generations still queued or running, oldest first: what a restarted bot picks up."""
        rows = self._rows(
            "SELECT * FROM generations WHERE status IN ('queued', 'running') ORDER BY id LIMIT ?",
            (limit,),
        )
        return [Generation.from_row(row) for row in rows]

    # --- images ----------------------------------------------------------------------------

    def _store_file(self, sha256: str, data: bytes) -> str:
        relative = f"{IMAGES_DIRNAME}/{sha256[:2]}/{sha256}.png"
        target = self.data_dir / relative
        if target.exists() and target.stat().st_size == len(data):
            return relative
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside it and rename, so a crash never leaves a half-written file at the
        # content address; fsync so the row we commit next never points at a lost file.
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return relative

    def add_image(
        self, generation_id: int, *, index: int, seed: int, width: int, height: int, png: bytes,
        nsfw: bool | None = None, blocked: bool = False,
    ) -> int:
        """Store an image's bytes by sha256 and record it; the same generation and index again
        returns the first row's id. `nsfw`: the safety check's verdict (None: not checked);
        `blocked`: the bot's policy kept it out of its channel."""
        sha256 = hashlib.sha256(png).hexdigest()
        relative = self._store_file(sha256, png)
        with self._write() as conn:
            existing = conn.execute(
                "SELECT id FROM images WHERE generation_id = ? AND image_index = ?",
                (generation_id, index),
            ).fetchone()
            if existing:
                return existing[0]
            try:
                cursor = conn.execute(
                    """INSERT INTO images (generation_id, image_index, seed, width, height,
                           sha256, path, created_at, nsfw, blocked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (generation_id, index, seed, width, height, sha256, relative, self._now(),
                     None if nsfw is None else int(nsfw), self._now() if blocked else None),
                )
            except sqlite3.IntegrityError:
                raise NotFoundError(f"no generation with id {generation_id}") from None
            return _inserted_id(cursor)

    def set_image_message(self, image_id: int, message_id: int) -> None:
        """Remember the Discord message that shows this image, so reactions find it."""
        with self._write() as conn:
            try:
                cursor = conn.execute(
                    "UPDATE images SET message_id = ? WHERE id = ?", (message_id, image_id)
                )
            except sqlite3.IntegrityError:
                raise StoreError(
                    f"message {message_id} already shows another image; post one image per message"
                ) from None
            if cursor.rowcount == 0:
                raise NotFoundError(f"no image with id {image_id}")

    def mark_image_deleted(self, image_id: int, user_id: int | None) -> bool:
        """Record that the image's message was deleted; False if it already was (idempotent)."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE images SET deleted_at = ?, deleted_by = ? WHERE id = ? AND deleted_at IS NULL",
                (self._now(), user_id, image_id),
            )
            return cursor.rowcount > 0

    def image(self, image_id: int) -> Image:
        rows = self._rows("SELECT * FROM images WHERE id = ?", (image_id,))
        if not rows:
            raise NotFoundError(f"no image with id {image_id}")
        return Image.from_row(rows[0])

    def image_for_message(self, message_id: int) -> Image | None:
        rows = self._rows("SELECT * FROM images WHERE message_id = ?", (message_id,))
        return Image.from_row(rows[0]) if rows else None

    def images_for_generation(self, generation_id: int) -> list[Image]:
        rows = self._rows(
            "SELECT * FROM images WHERE generation_id = ? ORDER BY image_index", (generation_id,)
        )
        return [Image.from_row(row) for row in rows]

    def posted_images(self, limit: int = 200) -> list[tuple[Image, int | None]]:
        """The newest images shown in Discord, each with its generation's channel id: what the
        bot re-reads at start to pick up reactions made while it was offline."""
        rows = self._rows(
            "SELECT i.*, g.channel_id AS channel_id FROM images i"
            " JOIN generations g ON g.id = i.generation_id"
            " WHERE i.message_id IS NOT NULL ORDER BY i.id DESC LIMIT ?",
            (limit,),
        )
        return [(Image.from_row(row), row["channel_id"]) for row in rows]

    def image_path(self, image: Image | RatedImage) -> Path:
        return self.data_dir / image.path

    def set_image_phash(self, pairs: Iterable[tuple[int, str]]) -> None:
        """Cache perceptual hashes, as (image id, hex hash) pairs, computed by curation."""
        with self._write() as conn:
            conn.executemany(
                "UPDATE images SET phash = ? WHERE id = ?", [(h, i) for i, h in pairs]
            )

    # --- ratings and flags -----------------------------------------------------------------

    def set_vote(self, image_id: int, user_id: int, value: int, emoji: str, *, name: str | None = None) -> bool:
        """One vote per user per image, latest wins. True if this changed the stored vote.

        `name`: the voter's display name as Discord showed it, remembered for reports."""
        if value not in (1, -1):
            raise ValueError("a vote is +1 or -1")
        now = self._now()
        with self._write() as conn:
            if name:
                conn.execute(
                    """INSERT INTO users (user_id, opted_out, name, updated_at) VALUES (?, 0, ?, ?)
                       ON CONFLICT (user_id) DO UPDATE SET name = excluded.name, updated_at = excluded.updated_at
                           WHERE name IS NOT excluded.name""",
                    (user_id, name, now),
                )
            try:
                cursor = conn.execute(
                    """INSERT INTO ratings (image_id, user_id, value, emoji, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?)
                       ON CONFLICT (image_id, user_id) DO UPDATE
                           SET value = excluded.value, emoji = excluded.emoji,
                               updated_at = excluded.updated_at
                           WHERE value != excluded.value OR emoji != excluded.emoji""",
                    (image_id, user_id, value, emoji, now, now),
                )
            except sqlite3.IntegrityError:
                raise NotFoundError(f"no image with id {image_id}") from None
            return cursor.rowcount > 0

    def remove_vote(self, image_id: int, user_id: int, emoji: str) -> bool:
        """Withdraw a vote when its reaction is removed. A vote cast since with another emoji
        stays (removing an old reaction must not undo a newer one). True if a vote went."""
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM ratings WHERE image_id = ? AND user_id = ? AND emoji = ?",
                (image_id, user_id, emoji),
            )
            return cursor.rowcount > 0

    def votes_for(self, image_id: int) -> list[Vote]:
        rows = self._rows(
            "SELECT image_id, user_id, value, emoji, updated_at FROM ratings WHERE image_id = ?"
            " ORDER BY user_id",
            (image_id,),
        )
        return [Vote(**dict(row)) for row in rows]

    def flag(self, image_id: int, user_id: int, kind: str) -> bool:
        """Mark an image as "nsfw" or "artifact" (kept apart from votes). True if new."""
        if kind not in FLAG_KINDS:
            raise ValueError(f"a flag is one of {', '.join(FLAG_KINDS)}")
        with self._write() as conn:
            try:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO flags (image_id, user_id, kind, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (image_id, user_id, kind, self._now()),
                )
            except sqlite3.IntegrityError:
                raise NotFoundError(f"no image with id {image_id}") from None
            return cursor.rowcount > 0

    def unflag(self, image_id: int, user_id: int, kind: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM flags WHERE image_id = ? AND user_id = ? AND kind = ?",
                (image_id, user_id, kind),
            )
            return cursor.rowcount > 0

    def flags_for(self, image_id: int) -> list[tuple[int, str]]:
        rows = self._rows(
            "SELECT user_id, kind FROM flags WHERE image_id = ? ORDER BY user_id, kind", (image_id,)
        )
        return [(row["user_id"], row["kind"]) for row in rows]

    # --- users -----------------------------------------------------------------------------

    # --- personal styles -------------------------------------------------------------------

    def profile(self, user_id: int) -> Profile | None:
        rows = self._rows("SELECT * FROM profiles WHERE user_id = ?", (user_id,))
        return _profile(rows[0]) if rows else None

    def profiles(self, status: str | None = None) -> list[Profile]:
        rows = self._rows("SELECT * FROM profiles WHERE :status IS NULL OR status = :status ORDER BY user_id",
                          {"status": status})
        return [_profile(row) for row in rows]

    def request_profile(self, user_id: int) -> bool:
        """Ask the loop to train (or retrain) USER's personal style; False if it is training now."""
        now = self._now()
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO profiles (user_id, status, requested_at, updated_at) VALUES (?, 'requested', ?, ?)
                   ON CONFLICT (user_id) DO UPDATE SET status = 'requested', requested_at = excluded.requested_at,
                       error = NULL, updated_at = excluded.updated_at
                   WHERE profiles.status != 'training'""",
                (user_id, now, now),
            )
            return cursor.rowcount > 0

    def set_profile(self, user_id: int, status: str, *, version: int | None = None, votes: int | None = None,
                    error: str | None = None) -> None:
        """The loop's record of a training: "training", "ready" (with its version and votes) or "failed"."""
        if status not in ("training", "ready", "failed"):
            raise ValueError("status must be training, ready or failed")
        now = self._now()
        with self._write() as conn:
            conn.execute(
                """INSERT INTO profiles (user_id, status, updated_at) VALUES (?, ?, ?)
                   ON CONFLICT (user_id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at""",
                (user_id, status, now),
            )
            if status == "ready":
                conn.execute("UPDATE profiles SET version = ?, votes = ?, trained_at = ?, error = NULL"
                             " WHERE user_id = ?", (version, votes, now, user_id))
            elif status == "failed":
                conn.execute("UPDATE profiles SET error = ? WHERE user_id = ?", (error, user_id))

    def delete_profile(self, user_id: int) -> bool:
        """Retire USER's personal style: nobody may use it from now on, and the loop removes its
        files at its next pass. False if there was none."""
        with self._write() as conn:
            return self._delete_profile(conn, user_id)

    def _delete_profile(self, conn: sqlite3.Connection, user_id: int) -> bool:
        cursor = conn.execute(
            "UPDATE profiles SET status = 'deleted', version = NULL, updated_at = ?"
            " WHERE user_id = ? AND status != 'deleted'", (self._now(), user_id))
        return cursor.rowcount > 0

    def user_votes(self, user_id: int) -> int:
        """The votes USER has cast on images still in the store (their own images too)."""
        rows = self._rows("SELECT COUNT(*) AS n FROM ratings r JOIN images i ON i.id = r.image_id"
                          " WHERE r.user_id = ? AND i.deleted_at IS NULL", (user_id,))
        return int(rows[0]["n"])

    def voters_with(self, min_votes: int) -> list[int]:
        """Users (not opted out) with at least MIN_VOTES votes: whom the loop may train a personal style for."""
        rows = self._rows(
            """SELECT r.user_id FROM ratings r JOIN images i ON i.id = r.image_id
               WHERE i.deleted_at IS NULL
                 AND r.user_id NOT IN (SELECT user_id FROM users WHERE opted_out)
               GROUP BY r.user_id HAVING COUNT(*) >= ? ORDER BY r.user_id""", (min_votes,))
        return [row["user_id"] for row in rows]

    def own_like_rate(self, user_id: int, adapter: str | None) -> tuple[int, float | None]:
        """(votes, like rate) of USER's own votes on images made with ADAPTER (None: with no
        personal style at all), so /profile can show whether it pleases its owner."""
        rows = self._rows(
            """SELECT COUNT(*) AS votes, COALESCE(SUM(r.value = 1), 0) AS likes
               FROM ratings r JOIN images i ON i.id = r.image_id
               WHERE r.user_id = :user
                 AND (CASE WHEN :adapter IS NULL
                      THEN NOT EXISTS (SELECT 1 FROM generation_adapters ga WHERE ga.generation_id = i.generation_id
                                       AND ga.name LIKE 'personal-%')
                      ELSE EXISTS (SELECT 1 FROM generation_adapters ga WHERE ga.generation_id = i.generation_id
                                   AND ga.name = :adapter) END)""",
            {"user": user_id, "adapter": adapter},
        )
        votes, likes = rows[0]["votes"], rows[0]["likes"]
        return votes, (likes / votes if votes else None)

    def _set_opted_out(self, user_id: int, opted_out: bool) -> None:
        with self._write() as conn:
            conn.execute(
                """INSERT INTO users (user_id, opted_out, updated_at) VALUES (?, ?, ?)
                   ON CONFLICT (user_id) DO UPDATE
                       SET opted_out = excluded.opted_out, updated_at = excluded.updated_at""",
                (user_id, int(opted_out), self._now()),
            )
            if opted_out:  # a personal style is learned from their votes: it goes with them
                self._delete_profile(conn, user_id)

    def opt_out(self, user_id: int) -> None:
        """Keep this user's prompts, images and votes out of every future dataset."""
        self._set_opted_out(user_id, True)

    def opt_in(self, user_id: int) -> None:
        self._set_opted_out(user_id, False)

    def is_opted_out(self, user_id: int) -> bool:
        rows = self._rows("SELECT opted_out FROM users WHERE user_id = ?", (user_id,))
        return bool(rows and rows[0]["opted_out"])

    def web_user(self, name: str) -> int:
        """The user id of the web console's identity `web:<name>`, made on first use.

        Discord's user ids are positive snowflakes; web identities get negative ids, so both
        live in the same `users`, `ratings` and `flags` rows and every query treats them alike."""
        label = f"{WEB_PREFIX}{name}"
        with self._write() as conn:
            row = conn.execute("SELECT user_id FROM users WHERE name = ? AND user_id < 0", (label,)).fetchone()
            if row:
                return int(row[0])
            lowest = conn.execute("SELECT MIN(user_id) FROM users WHERE user_id < 0").fetchone()[0]
            user_id = (lowest or 0) - 1
            conn.execute("INSERT INTO users (user_id, opted_out, name, updated_at) VALUES (?, 0, ?, ?)",
                         (user_id, label, self._now()))
            return user_id

    # --- stats -----------------------------------------------------------------------------

    def adapter_stats(self, name: str | None = None) -> list[AdapterStats]:
        """Images, votes and likes per adapter version (and the base model, adapter None)."""
        rows = self._rows(
            """
            WITH tallies AS (
                SELECT i.id AS image_id, i.generation_id,
                       COUNT(r.value) AS votes, COALESCE(SUM(r.value = 1), 0) AS likes
                FROM images i LEFT JOIN ratings r ON r.image_id = i.id
                GROUP BY i.id
            ),
            versions AS (
                SELECT t.*, ga.name AS adapter, ga.version AS version
                FROM tallies t LEFT JOIN generation_adapters ga ON ga.generation_id = t.generation_id
            )
            SELECT adapter, version, COUNT(*) AS images, SUM(votes) AS votes, SUM(likes) AS likes
            FROM versions
            WHERE (:name IS NULL OR adapter = :name)
            GROUP BY adapter, version
            ORDER BY adapter IS NOT NULL, adapter, version
            """,
            {"name": name},
        )
        return [
            AdapterStats(
                adapter=row["adapter"], version=row["version"], images=row["images"],
                votes=row["votes"], likes=row["likes"], dislikes=row["votes"] - row["likes"],
            )
            for row in rows
        ]

    def top_images(
        self, *, since: dt.datetime | None = None, limit: int = 5, guild_id: int | None = None
    ) -> list[TopImage]:
        """The best liked images made since `since` (default: the last 7 days), NSFW-flagged
        ones left out so /stats can show them."""
        since = since or self._clock() - dt.timedelta(days=7)
        rows = self._rows(
            """
            SELECT i.id AS image_id, i.generation_id, g.prompt, g.requester_id, g.guild_id,
                   g.channel_id, i.message_id,
                   SUM(r.value = 1) AS likes, SUM(r.value = -1) AS dislikes
            FROM images i
            JOIN generations g ON g.id = i.generation_id
            JOIN ratings r ON r.image_id = i.id
            WHERE i.created_at >= :since
              AND (:guild_id IS NULL OR g.guild_id = :guild_id)
              AND i.deleted_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM flags f WHERE f.image_id = i.id AND f.kind = 'nsfw')
              AND i.nsfw IS NOT 1
            GROUP BY i.id
            HAVING likes > 0
            ORDER BY likes - dislikes DESC, likes DESC, i.id
            LIMIT :limit
            """,
            {"since": _timestamp(since), "guild_id": guild_id, "limit": limit},
        )
        return [TopImage(**dict(row)) for row in rows]

    def listed_images(
        self,
        *,
        adapter: str | None = None,
        adapter_version: int | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        min_score: int | None = None,
        flagged: bool = False,
        include_deleted: bool = False,
        requester_id: int | None = None,
        limit: int = 48,
        offset: int = 0,
    ) -> list[ListedImage]:
        """Images newest first with their raw tallies (every vote, as /stats counts them): the
        console's gallery, or with `flagged` its moderation queue (images with a flag or that the
        safety check flagged, blocked or not)."""
        rows = self._rows(
            _LISTED_IMAGES + """
            WHERE (:since IS NULL OR i.created_at >= :since)
              AND (:until IS NULL OR i.created_at < :until)
              AND (:adapter IS NULL OR EXISTS (
                    SELECT 1 FROM generation_adapters ga WHERE ga.generation_id = i.generation_id
                    AND ga.name = :adapter AND (:version IS NULL OR ga.version = :version)))
              AND (:include_deleted OR i.deleted_at IS NULL)
              AND (NOT :flagged OR i.nsfw = 1 OR EXISTS (SELECT 1 FROM flags f WHERE f.image_id = i.id))
              AND (:requester IS NULL OR g.requester_id = :requester)
              AND (:min_score IS NULL OR (SELECT COALESCE(SUM(r.value), 0) FROM ratings r
                                          WHERE r.image_id = i.id) >= :min_score)
            ORDER BY i.id DESC LIMIT :limit OFFSET :offset
            """,
            {"since": None if since is None else _timestamp(since),
             "until": None if until is None else _timestamp(until), "adapter": adapter,
             "version": adapter_version, "include_deleted": int(include_deleted), "flagged": int(flagged),
             "requester": requester_id, "min_score": min_score, "limit": limit, "offset": offset},
        )
        return [_listed_image(row) for row in rows]

    def listed_image(self, image_id: int) -> ListedImage:
        rows = self._rows(_LISTED_IMAGES + " WHERE i.id = ?", (image_id,))
        if not rows:
            raise NotFoundError(f"no image with id {image_id}")
        return _listed_image(rows[0])

    def unrated_images(self, user_id: int, *, limit: int = 1, skip: Iterable[int] = ()) -> list[ListedImage]:
        """Images this user has neither voted on nor flagged nor asked for, not deleted and not
        flagged unsafe by anyone: what rate-a-batch shows next (newest first; `skip`: ids passed
        over in this session)."""
        skipped = json.dumps(sorted(set(skip)))
        rows = self._rows(
            _LISTED_IMAGES + """
            WHERE i.deleted_at IS NULL AND g.requester_id IS NOT :user
              AND NOT EXISTS (SELECT 1 FROM ratings r WHERE r.image_id = i.id AND r.user_id = :user)
              AND NOT EXISTS (SELECT 1 FROM flags f WHERE f.image_id = i.id
                              AND (f.user_id = :user OR f.kind = 'nsfw'))
              AND i.nsfw IS NOT 1
              AND i.id NOT IN (SELECT value FROM json_each(:skip))
            ORDER BY i.id DESC LIMIT :limit
            """,
            {"user": user_id, "skip": skipped, "limit": limit},
        )
        return [_listed_image(row) for row in rows]

    def adapter_votes(self, adapter: str | None, version: int | None, limit: int = 500) -> list[AdapterVote]:
        """The newest `limit` votes behind one row of `adapter_stats` (adapter None: the base model)."""
        columns = "r.image_id, r.user_id, u.name, r.value, r.updated_at"
        if adapter is None:
            sql = f"""SELECT {columns} FROM ratings r JOIN images i ON i.id = r.image_id
                      LEFT JOIN users u ON u.user_id = r.user_id
                      WHERE NOT EXISTS (SELECT 1 FROM generation_adapters ga WHERE ga.generation_id = i.generation_id)
                      ORDER BY r.updated_at DESC, r.image_id LIMIT ?"""
            rows = self._rows(sql, (limit,))
        else:
            sql = f"""SELECT {columns} FROM generation_adapters ga
                      JOIN images i ON i.generation_id = ga.generation_id
                      JOIN ratings r ON r.image_id = i.id
                      LEFT JOIN users u ON u.user_id = r.user_id
                      WHERE ga.name = ? AND {"ga.version = ?" if version is not None else "ga.version IS NULL"}
                      ORDER BY r.updated_at DESC, r.image_id LIMIT ?"""
            rows = self._rows(sql, (adapter, version, limit) if version is not None else (adapter, limit))
        return [AdapterVote(**dict(row)) for row in rows]

    def training_runs(self, limit: int = 100) -> list[TrainingRun]:
        """Recorded training runs (what `adapters publish` recorded), newest first."""
        rows = self._rows("SELECT id FROM training_runs ORDER BY id DESC LIMIT ?", (limit,))
        return [self.training_run(row["id"]) for row in rows]

    def safety_counts(self, guild_id: int | None = None) -> dict[str, int]:
        """Images the safety check saw, flagged, and that the bot's policy kept out of their channel."""
        rows = self._rows(
            """SELECT COUNT(i.nsfw) AS checked, COALESCE(SUM(i.nsfw = 1), 0) AS flagged,
                      COUNT(i.blocked_at) AS blocked
               FROM images i JOIN generations g ON g.id = i.generation_id
               WHERE :guild_id IS NULL OR g.guild_id = :guild_id""",
            {"guild_id": guild_id},
        )
        return {key: rows[0][key] for key in ("checked", "flagged", "blocked")}

    def counts(self) -> dict[str, int]:
        """Rows per table, for `loraloop db stats`."""
        tables = ("generations", "images", "ratings", "flags", "users", "training_runs", "adapters",
                  "experiments")
        return {
            table: self._rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] for table in tables
        }

    # --- training --------------------------------------------------------------------------

    def record_training_run(
        self,
        *,
        config: Mapping[str, Any],
        dataset_path: str,
        dataset_hash: str,
        status: str = "running",
        metrics: Mapping[str, Any] | None = None,
    ) -> int:
        if status not in TRAINING_STATUSES:
            raise ValueError(f"status must be one of {', '.join(TRAINING_STATUSES)}")
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO training_runs (config_json, dataset_path, dataset_hash,
                       metrics_json, status, created_at) VALUES (?, ?, ?, ?, ?, ?)""",
                (json.dumps(dict(config), sort_keys=True), dataset_path, dataset_hash,
                 json.dumps(dict(metrics or {}), sort_keys=True), status, self._now()),
            )
            return _inserted_id(cursor)

    def update_training_run(
        self,
        run_id: int,
        *,
        status: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        if status is not None and status not in TRAINING_STATUSES:
            raise ValueError(f"status must be one of {', '.join(TRAINING_STATUSES)}")
        changes: dict[str, Any] = {"status": status, "error": error}
        if metrics is not None:
            changes["metrics_json"] = json.dumps(dict(metrics), sort_keys=True)
        if status in ("done", "failed"):
            changes["finished_at"] = self._now()
        changes = {k: v for k, v in changes.items() if v is not None}
        with self._write() as conn:
            assignments = "".join(f"{column} = ?, " for column in changes) + "id = id"
            cursor = conn.execute(
                f"UPDATE training_runs SET {assignments} WHERE id = ?", (*changes.values(), run_id)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no training run with id {run_id}")

    def training_run(self, run_id: int) -> TrainingRun:
        rows = self._rows("SELECT * FROM training_runs WHERE id = ?", (run_id,))
        if not rows:
            raise NotFoundError(f"no training run with id {run_id}")
        row = rows[0]
        return TrainingRun(
            id=row["id"], config=json.loads(row["config_json"]), dataset_path=row["dataset_path"],
            dataset_hash=row["dataset_hash"], metrics=json.loads(row["metrics_json"]),
            status=row["status"], error=row["error"], created_at=row["created_at"],
            finished_at=row["finished_at"],
        )

    def record_adapter(
        self, *, name: str, version: int, file_sha256: str, training_run_id: int | None = None,
        experiment: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a published adapter version. Publishing the same file again returns its id;
        a different file under a version already taken is refused.

        `experiment` ({"control_version", "share", "settings"}) publishes it as a candidate: in
        the same transaction an experiment starts, so the version is never served as the
        default before the gate has decided (not even after a crash right after publishing).
        """
        with self._write() as conn:
            existing = conn.execute(
                "SELECT id, file_sha256 FROM adapters WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()
            if existing:
                if existing[1] != file_sha256:
                    raise StoreError(
                        f"adapter {name} v{version} is already recorded with another file; "
                        "publish it as a new version"
                    )
                return existing[0]
            try:
                cursor = conn.execute(
                    """INSERT INTO adapters (name, version, file_sha256, training_run_id,
                           created_at) VALUES (?, ?, ?, ?, ?)""",
                    (name, version, file_sha256, training_run_id, self._now()),
                )
            except sqlite3.IntegrityError:
                raise NotFoundError(f"no training run with id {training_run_id}") from None
            if experiment is not None:
                self._start_experiment(conn, name, version, experiment)
            return _inserted_id(cursor)

    def adapters(self, name: str | None = None) -> list[AdapterVersion]:
        rows = self._rows(
            "SELECT * FROM adapters WHERE (:name IS NULL OR name = :name) ORDER BY name, version",
            {"name": name},
        )
        return [AdapterVersion(**dict(row)) for row in rows]

    # --- experiments -----------------------------------------------------------------------

    def _start_experiment(self, conn: sqlite3.Connection, name: str, version: int,
                          plan: Mapping[str, Any]) -> None:
        try:
            conn.execute(
                """INSERT INTO experiments (adapter, control_version, candidate_version, share,
                       settings_json, started_at) VALUES (?, ?, ?, ?, ?, ?)""",
                (name, int(plan["control_version"]), version, float(plan["share"]),
                 json.dumps(dict(plan.get("settings", {})), sort_keys=True), self._now()),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"{name} already has an experiment running (or one for v{version}); "
                             f"decide it first (/admin promote|retire {name})") from None

    def experiments(self, *, adapter: str | None = None, status: str | None = None) -> list[Experiment]:
        """Experiments, newest first."""
        rows = self._rows(
            "SELECT * FROM experiments WHERE (:adapter IS NULL OR adapter = :adapter)"
            " AND (:status IS NULL OR status = :status) ORDER BY id DESC",
            {"adapter": adapter, "status": status},
        )
        return [Experiment.from_row(row) for row in rows]

    def running_experiment(self, adapter: str) -> Experiment | None:
        found = self.experiments(adapter=adapter, status="running")
        return found[0] if found else None

    def default_version(self, adapter: str) -> int | None:
        """The version `/imagine style:NAME` gets outside experiments: the newest recorded one
        that is neither a running experiment's candidate nor a retired one."""
        rows = self._rows(
            """SELECT MAX(a.version) AS version FROM adapters a
               WHERE a.name = ? AND NOT EXISTS (
                   SELECT 1 FROM experiments e WHERE e.adapter = a.name
                   AND e.candidate_version = a.version AND e.status IN ('running', 'retired'))""",
            (adapter,),
        )
        return rows[0]["version"]

    def experiment_votes(self, experiment_id: int, *, include_self_votes: bool = False
                         ) -> list[tuple[str, int, int, int]]:
        """(arm, user_id, likes, dislikes) per arm and rater, for the gate (`arm_tallies`): the
        votes curation would count (no opted-out voters, no self-votes unless asked)."""
        rows = self._rows(
            """SELECT g.arm, r.user_id, SUM(r.value = 1) AS likes, SUM(r.value = -1) AS dislikes
               FROM generations g JOIN images i ON i.generation_id = g.id
               JOIN ratings r ON r.image_id = i.id
               WHERE g.experiment_id = :experiment AND g.arm IS NOT NULL
                 AND (:self_votes OR r.user_id IS NOT g.requester_id)
                 AND r.user_id NOT IN (SELECT user_id FROM users WHERE opted_out)
               GROUP BY g.arm, r.user_id ORDER BY g.arm, r.user_id""",
            {"experiment": experiment_id, "self_votes": int(include_self_votes)},
        )
        return [(row["arm"], row["user_id"], row["likes"], row["dislikes"]) for row in rows]

    def experiment_images(self, experiment_id: int) -> dict[str, int]:
        """Images made in each arm of an experiment."""
        rows = self._rows(
            """SELECT g.arm, COUNT(i.id) AS n FROM generations g JOIN images i ON i.generation_id = g.id
               WHERE g.experiment_id = ? AND g.arm IS NOT NULL GROUP BY g.arm""",
            (experiment_id,),
        )
        return {row["arm"]: row["n"] for row in rows}

    def decide_experiment(self, experiment_id: int, *, decision: str, reason: str, decided_by: str,
                          figures: Mapping[str, Any]) -> bool:
        """Promote or retire a running experiment and record why, in one transaction. False (and
        nothing written) if it was already decided, so the gate and an admin cannot both decide."""
        if decision not in ("promote", "retire"):
            raise ValueError("a decision is 'promote' or 'retire'")
        now = self._now()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE experiments SET status = ?, decided_at = ? WHERE id = ? AND status = 'running'",
                ("promoted" if decision == "promote" else "retired", now, experiment_id),
            )
            if cursor.rowcount == 0:
                return False
            conn.execute(
                """INSERT INTO experiment_decisions (experiment_id, decision, reason, decided_by,
                       figures_json, created_at) VALUES (?, ?, ?, ?, ?, ?)""",
                (experiment_id, decision, reason, decided_by, json.dumps(dict(figures), sort_keys=True), now),
            )
            return True

    def experiment_decisions(self, adapter: str | None = None) -> list[ExperimentDecision]:
        rows = self._rows(
            """SELECT d.* FROM experiment_decisions d JOIN experiments e ON e.id = d.experiment_id
               WHERE (:adapter IS NULL OR e.adapter = :adapter) ORDER BY d.id""",
            {"adapter": adapter},
        )
        return [ExperimentDecision(id=row["id"], experiment_id=row["experiment_id"], decision=row["decision"],
                                   reason=row["reason"], decided_by=row["decided_by"],
                                   figures=json.loads(row["figures_json"]), created_at=row["created_at"])
                for row in rows]

    def pending_announcements(self) -> list[Announcement]:
        """Experiment starts and decisions not yet posted in the admin channel, oldest first."""
        started = self._rows("SELECT * FROM experiments WHERE announced_at IS NULL ORDER BY id")
        decided = self._rows("SELECT experiment_id FROM experiment_decisions WHERE announced_at IS NULL ORDER BY id")
        by_id = {e.id: e for e in self.experiments()}
        decisions = {d.experiment_id: d for d in self.experiment_decisions()}
        out = [Announcement("started", Experiment.from_row(row)) for row in started]
        out += [Announcement("decided", by_id[row["experiment_id"]], decisions[row["experiment_id"]])
                for row in decided]
        return out

    def mark_announced(self, announcement: Announcement) -> None:
        with self._write() as conn:
            if announcement.kind == "started":
                conn.execute("UPDATE experiments SET announced_at = ? WHERE id = ?",
                             (self._now(), announcement.experiment.id))
            else:
                conn.execute("UPDATE experiment_decisions SET announced_at = ? WHERE experiment_id = ?",
                             (self._now(), announcement.experiment.id))

    def save_rater_weights(self, raters: Iterable[tuple[int, float, int, float | None]]) -> None:
        """Replace the stored rater weights with (user_id, weight, votes, agreement) rows: what
        the loop last estimated, for the bot's /stats and `loraloop db stats`."""
        now = self._now()
        with self._write() as conn:
            conn.execute("DELETE FROM rater_weights")
            conn.executemany(
                "INSERT INTO rater_weights (user_id, weight, votes, agreement, computed_at) VALUES (?, ?, ?, ?, ?)",
                [(u, w, n, a, now) for u, w, n, a in raters],
            )

    def rater_weights(self) -> dict[int, float]:
        return {row["user_id"]: row["weight"] for row in self._rows("SELECT user_id, weight FROM rater_weights")}

    def votes_since(self, adapter: str, since: str) -> dict[int, int]:
        """Votes cast or changed since `since` (a stored timestamp) on images of `adapter`, per
        rater: what tells the loop a new round is due. Opted-out voters do not count."""
        rows = self._rows(
            """SELECT r.user_id, COUNT(*) AS n FROM ratings r JOIN images i ON i.id = r.image_id
               JOIN generation_adapters ga ON ga.generation_id = i.generation_id
               JOIN generations g ON g.id = i.generation_id
               WHERE ga.name = ? AND r.updated_at > ? AND r.user_id IS NOT g.requester_id
                 AND r.user_id NOT IN (SELECT user_id FROM users WHERE opted_out)
               GROUP BY r.user_id""",
            (adapter, since),
        )
        return {row["user_id"]: row["n"] for row in rows}

    def adapter_names(self) -> list[str]:
        """Every adapter with a recorded version."""
        return [row["name"] for row in self._rows("SELECT DISTINCT name FROM adapters ORDER BY name")]

    # --- curation --------------------------------------------------------------------------

    def rated_images(
        self,
        *,
        adapter: str | None = None,
        adapter_version: int | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        include_self_votes: bool = False,
        voter: int | None = None,
    ) -> list[RatedImage]:
        """Every image in the selection with its likes and dislikes, oldest first.

        Votes by opted-out users never count; the requester's own vote counts only with
        `include_self_votes`. Images with no votes are included (curation reports them).
        `voter`: only the images this user voted on, and only their votes (a personal style's data).
        """
        rows = self._rows(
            _SELECTED_VOTES + """,
            tallies AS (
                SELECT image_id, SUM(value = 1) AS likes, SUM(value = -1) AS dislikes
                FROM counted GROUP BY image_id
            ),
            flagged AS (
                -- People's flags, and the safety check's verdict as an 'nsfw' flag of its own.
                SELECT image_id, group_concat(DISTINCT kind) AS kinds FROM (
                    SELECT f.image_id, f.kind FROM flags f JOIN selected s ON s.id = f.image_id
                    UNION ALL SELECT s.id, 'nsfw' FROM selected s WHERE s.nsfw = 1
                ) GROUP BY image_id
            )
            SELECT s.id, s.generation_id, s.sha256, s.path, s.width, s.height, s.prompt,
                   s.negative_prompt, s.requester_id, s.created_at, s.phash,
                   COALESCE(t.likes, 0) AS likes, COALESCE(t.dislikes, 0) AS dislikes,
                   fl.kinds AS flag_kinds, COALESCE(u.opted_out, 0) AS requester_opted_out,
                   s.deleted_at
            FROM selected s
            LEFT JOIN tallies t ON t.image_id = s.id
            LEFT JOIN flagged fl ON fl.image_id = s.id
            LEFT JOIN users u ON u.user_id = s.requester_id
            ORDER BY s.created_at, s.id
            """,
            _selection(adapter, adapter_version, since, until, include_self_votes, voter),
        )
        return [
            RatedImage(
                id=row["id"], generation_id=row["generation_id"], sha256=row["sha256"],
                path=row["path"], width=row["width"], height=row["height"], prompt=row["prompt"],
                negative_prompt=row["negative_prompt"], requester_id=row["requester_id"],
                created_at=row["created_at"], likes=row["likes"], dislikes=row["dislikes"],
                flags=tuple(sorted(row["flag_kinds"].split(","))) if row["flag_kinds"] else (),
                requester_opted_out=bool(row["requester_opted_out"]), phash=row["phash"],
                deleted=row["deleted_at"] is not None,
            )
            for row in rows
        ]


    def rated_votes(
        self,
        *,
        adapter: str | None = None,
        adapter_version: int | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        include_self_votes: bool = False,
        voter: int | None = None,
    ) -> list[tuple[int, int, int]]:
        """The votes `rated_images` tallies for the same selection, one (image_id, user_id,
        value) each: what the rater model (`loraloop.raters.estimate`) reads."""
        sql = _SELECTED_VOTES + " SELECT image_id, user_id, value FROM counted ORDER BY image_id, user_id"
        params = _selection(adapter, adapter_version, since, until, include_self_votes, voter)
        # Plain tuples, not sqlite3.Row: a large server has hundreds of thousands of votes.
        rows = self._retrying(lambda: self.db.conn.execute(sql, params).fetchall())
        return [(row[0], row[1], row[2]) for row in rows]

    def user_names(self, user_ids: Iterable[int] | None = None) -> dict[int, str]:
        """The name each user last voted under, for those the bot has seen (all, or `user_ids`)."""
        rows = self._rows("SELECT user_id, name FROM users WHERE name IS NOT NULL")
        wanted = None if user_ids is None else set(user_ids)
        return {row["user_id"]: row["name"] for row in rows if wanted is None or row["user_id"] in wanted}


WEB_PREFIX = "web:"

# One image with its tallies, flags and adapters, as the console lists them; callers add WHERE.
_LISTED_IMAGES = """
    SELECT i.id, i.generation_id, g.job_id, g.prompt, g.negative_prompt, i.seed, i.width, i.height,
           i.created_at, g.requester_id, i.deleted_at, g.arm, i.nsfw, i.blocked_at,
           (SELECT COUNT(*) FROM ratings r WHERE r.image_id = i.id AND r.value = 1) AS likes,
           (SELECT COUNT(*) FROM ratings r WHERE r.image_id = i.id AND r.value = -1) AS dislikes,
           (SELECT group_concat(DISTINCT f.kind) FROM flags f WHERE f.image_id = i.id) AS flag_kinds,
           (SELECT json_group_array(json_array(ga.name, ga.version)) FROM generation_adapters ga
            WHERE ga.generation_id = i.generation_id) AS adapters_json
    FROM images i JOIN generations g ON g.id = i.generation_id"""
# Tallies are per-row subqueries on the ratings primary key (image_id first), so a page of 48
# counts the votes of 48 images, not of every image (bench/console.py).


def _listed_image(row: sqlite3.Row) -> ListedImage:
    return ListedImage(
        id=row["id"], generation_id=row["generation_id"], job_id=row["job_id"], prompt=row["prompt"],
        negative_prompt=row["negative_prompt"], seed=row["seed"], width=row["width"], height=row["height"],
        created_at=row["created_at"], requester_id=row["requester_id"], likes=row["likes"],
        dislikes=row["dislikes"],
        flags=tuple(sorted(row["flag_kinds"].split(","))) if row["flag_kinds"] else (),
        deleted=row["deleted_at"] is not None,
        adapters=tuple((name, version) for name, version in json.loads(row["adapters_json"] or "[]")),
        blind=row["arm"] is not None,
        nsfw=None if row["nsfw"] is None else bool(row["nsfw"]), blocked=row["blocked_at"] is not None,
    )


# The images of a curation selection and the votes on them that count: never an opted-out
# user's, and the requester's own only with :self_votes. `rated_images` and `rated_votes` share it
# so the tallies and the rater model always see the same votes.
_SELECTED_VOTES = """
    WITH selected AS (
        SELECT i.*, g.prompt, g.negative_prompt, g.requester_id
        FROM images i JOIN generations g ON g.id = i.generation_id
        WHERE (:since IS NULL OR i.created_at >= :since)
          AND (:until IS NULL OR i.created_at < :until)
          AND (:adapter IS NULL OR EXISTS (
                SELECT 1 FROM generation_adapters ga
                WHERE ga.generation_id = i.generation_id AND ga.name = :adapter
                  AND (:version IS NULL OR ga.version = :version)))
          AND (:voter IS NULL OR EXISTS (
                SELECT 1 FROM ratings rv WHERE rv.image_id = i.id AND rv.user_id = :voter))
    ),
    counted AS (
        SELECT r.image_id, r.user_id, r.value
        FROM ratings r JOIN selected s ON s.id = r.image_id
        WHERE (:self_votes OR r.user_id IS NOT s.requester_id)
          AND (:voter IS NULL OR r.user_id = :voter)
          AND r.user_id NOT IN (SELECT user_id FROM users WHERE opted_out)
    )"""


def _profile(row: sqlite3.Row) -> Profile:
    return Profile(user_id=row["user_id"], status=row["status"], version=row["version"], votes=row["votes"],
                   error=row["error"], requested_at=row["requested_at"], trained_at=row["trained_at"])


def _selection(adapter: str | None, adapter_version: int | None, since: dt.datetime | None,
               until: dt.datetime | None, include_self_votes: bool, voter: int | None = None) -> dict[str, Any]:
    return {
        "voter": voter,
        "since": None if since is None else _timestamp(since),
        "until": None if until is None else _timestamp(until),
        "adapter": adapter, "version": adapter_version,
        "self_votes": int(include_self_votes),
    }


def _on_store_thread(
    method: Callable[Concatenate[Store, P], T],
) -> Callable[Concatenate[AsyncStore, P], Coroutine[Any, Any, T]]:
    """`Store.method` as an AsyncStore method: a coroutine taking exactly Store's parameters
    (so the type checker holds every caller to Store's signature), run on the store's thread."""

    @functools.wraps(method)
    async def on_store_thread(self: AsyncStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._call(method, self._store, *args, **kwargs)

    return on_store_thread


class AsyncStore:
    """The Store for asyncio code: every method is a coroutine run on ONE executor thread.

    That thread builds, owns and closes the connection (SQLite connections belong to the
    thread that made them), and running every call there in order keeps writes serialized
    without blocking the event loop. Build it with `await AsyncStore.open(...)`.
    """

    def __init__(self, store: Store, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(cls, db_path: str | os.PathLike, data_dir: str | os.PathLike,
                   **options: Any) -> AsyncStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraloop-store")
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(
                executor, functools.partial(Store, db_path, data_dir, **options)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(store, executor)

    @classmethod
    async def open_from_config(cls, config: Any) -> AsyncStore:
        return await cls.open(config.database_path, config.data_dir, **_options_from_config(config))

    @property
    def db_path(self) -> Path:
        return self._store.db_path

    @property
    def data_dir(self) -> Path:
        return self._store.data_dir

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the store's thread, after every call made before it."""
        if self._closed:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def call(self, fn: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(store, ...)` on the store's thread: several queries and the Python between
        them (an experiment's verdict, say) as one call, without blocking the event loop."""
        return await self._call(fn, self._store, *args, **kwargs)

    async def close(self) -> None:
        if self._closed:
            return
        await self._call(self._store.close)
        self._closed = True
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Store's methods as coroutines with Store's own parameters (see _on_store_thread).

    # --- generations -----------------------------------------------------------------------

    record_generation = _on_store_thread(Store.record_generation)
    update_generation = _on_store_thread(Store.update_generation)
    generation = _on_store_thread(Store.generation)
    generation_for_job = _on_store_thread(Store.generation_for_job)
    unfinished_generations = _on_store_thread(Store.unfinished_generations)

    # --- images ----------------------------------------------------------------------------

    add_image = _on_store_thread(Store.add_image)
    set_image_message = _on_store_thread(Store.set_image_message)
    mark_image_deleted = _on_store_thread(Store.mark_image_deleted)
    image = _on_store_thread(Store.image)
    image_for_message = _on_store_thread(Store.image_for_message)
    images_for_generation = _on_store_thread(Store.images_for_generation)
    posted_images = _on_store_thread(Store.posted_images)

    # --- ratings and flags -----------------------------------------------------------------

    flags_for = _on_store_thread(Store.flags_for)
    set_vote = _on_store_thread(Store.set_vote)
    remove_vote = _on_store_thread(Store.remove_vote)
    votes_for = _on_store_thread(Store.votes_for)
    rated_votes = _on_store_thread(Store.rated_votes)
    user_names = _on_store_thread(Store.user_names)
    flag = _on_store_thread(Store.flag)
    unflag = _on_store_thread(Store.unflag)

    # --- users -----------------------------------------------------------------------------

    opt_out = _on_store_thread(Store.opt_out)
    opt_in = _on_store_thread(Store.opt_in)
    is_opted_out = _on_store_thread(Store.is_opted_out)
    web_user = _on_store_thread(Store.web_user)

    # --- stats -----------------------------------------------------------------------------

    adapter_stats = _on_store_thread(Store.adapter_stats)
    top_images = _on_store_thread(Store.top_images)
    counts = _on_store_thread(Store.counts)

    # --- the web console's lists -----------------------------------------------------------

    listed_images = _on_store_thread(Store.listed_images)
    listed_image = _on_store_thread(Store.listed_image)
    unrated_images = _on_store_thread(Store.unrated_images)
    adapter_votes = _on_store_thread(Store.adapter_votes)
    training_runs = _on_store_thread(Store.training_runs)

    # --- training --------------------------------------------------------------------------

    record_training_run = _on_store_thread(Store.record_training_run)
    update_training_run = _on_store_thread(Store.update_training_run)
    record_adapter = _on_store_thread(Store.record_adapter)
    adapters = _on_store_thread(Store.adapters)

    # --- experiments -----------------------------------------------------------------------

    experiments = _on_store_thread(Store.experiments)
    running_experiment = _on_store_thread(Store.running_experiment)
    default_version = _on_store_thread(Store.default_version)
    experiment_votes = _on_store_thread(Store.experiment_votes)
    experiment_images = _on_store_thread(Store.experiment_images)
    decide_experiment = _on_store_thread(Store.decide_experiment)
    experiment_decisions = _on_store_thread(Store.experiment_decisions)
    pending_announcements = _on_store_thread(Store.pending_announcements)
    mark_announced = _on_store_thread(Store.mark_announced)
    rater_weights = _on_store_thread(Store.rater_weights)
    safety_counts = _on_store_thread(Store.safety_counts)
    profile = _on_store_thread(Store.profile)
    request_profile = _on_store_thread(Store.request_profile)
    delete_profile = _on_store_thread(Store.delete_profile)
    user_votes = _on_store_thread(Store.user_votes)
    own_like_rate = _on_store_thread(Store.own_like_rate)
