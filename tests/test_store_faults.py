"""The store under faults: a process killed with SIGKILL in a burst of votes, and locks held
by another process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraloop.store import MIGRATION_NAMES, Store

# Votes from many concurrent asyncio callers, each printed only after set_vote returned: a line
# on stdout is a vote the bot would have acknowledged.
VOTER = textwrap.dedent(
    """
    import asyncio, sys
    from loraloop.store import AsyncStore

    async def main(db_path, data_dir, image_id):
        store = await AsyncStore.open(db_path, data_dir)

        async def vote(user_id):
            await store.set_vote(image_id, user_id, 1 if user_id % 3 else -1, "x")
            sys.stdout.write(f"{user_id}\\n")
            sys.stdout.flush()

        next_user = 1000
        while True:
            await asyncio.gather(*(vote(next_user + k) for k in range(32)))
            next_user += 32

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_during_a_vote_burst_loses_no_acknowledged_vote(tmp_path):
    db_path, data_dir = tmp_path / "loraloop.db", tmp_path / "data"
    with Store(db_path, data_dir) as store:
        generation_id = store.record_generation(job_id="j", requester_id=1, prompt="a fox")
        image_id = store.add_image(generation_id, index=0, seed=0, width=8, height=8, png=b"png")

    script = tmp_path / "voter.py"
    script.write_text(VOTER)
    process = subprocess.Popen(
        [sys.executable, str(script), str(db_path), str(data_dir), str(image_id)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    acknowledged: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(acknowledged) < 600 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            acknowledged.append(int(line))
        # Killed mid-burst: more votes are in flight on the store's thread right now.
        os.kill(process.pid, signal.SIGKILL)
        rest, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    acknowledged += [int(line) for line in rest.split()]
    assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 600, errors

    with Store(db_path, data_dir) as store:
        votes = {vote.user_id: vote.value for vote in store.votes_for(image_id)}
    lost = [user for user in acknowledged if user not in votes]
    assert lost == []
    assert all(votes[user] == (1 if user % 3 else -1) for user in acknowledged)


def test_a_writer_in_another_process_makes_the_store_wait_not_fail(tmp_path):
    db_path, data_dir = tmp_path / "loraloop.db", tmp_path / "data"
    with Store(db_path, data_dir) as store:
        generation_id = store.record_generation(job_id="j", requester_id=1, prompt="a fox")
        image_id = store.add_image(generation_id, index=0, seed=0, width=8, height=8, png=b"png")

        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(
                """
                import sqlite3, sys, time
                conn = sqlite3.connect(sys.argv[1], isolation_level=None)
                conn.execute("BEGIN IMMEDIATE")
                print("locked", flush=True)
                time.sleep(0.8)
                conn.execute("COMMIT")
                """), str(db_path)],
            stdout=subprocess.PIPE, text=True,
        )
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        assert store.set_vote(image_id, 10, 1, "👍") is True
        waited = time.monotonic() - started
        holder.wait(timeout=10)
        assert waited > 0.3
        assert [v.user_id for v in store.votes_for(image_id)] == [10]


def test_processes_opening_a_new_database_at_once_migrate_it_once(tmp_path):
    db_path, data_dir = tmp_path / "loraloop.db", tmp_path / "data"
    opener = textwrap.dedent(
        """
        import sys
        from loraloop.store import Store
        with Store(sys.argv[1], sys.argv[2]) as store:
            print(",".join(store.schema_version()))
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", opener, str(db_path), str(data_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
        for _ in range(4)
    ]
    results = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0, 0], results
    assert {out.strip() for out, _ in results} == {",".join(MIGRATION_NAMES)}
    with Store(db_path, data_dir) as store:
        rows = store.db.conn.execute("SELECT COUNT(*) FROM _sqlite_migrations").fetchone()[0]
    assert rows == len(MIGRATION_NAMES)
