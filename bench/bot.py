"""Benchmark: the bot under a burst, against the fake Discord and the real service on the tiny model.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bot.py            # 50 /imagine from 10 users, ~1 minute
    .venv/bin/python bench/bot.py --users 10 --per-user 5 --steps 10

The service runs in its own process (`loraloop serve`), as in production, so its worker thread
does not compete with the bot for the GIL; the fake Discord runs on its own thread and event
loop, so only the bot's work lands on the loop being measured.
Reported (goals from issue 4):
  - time to acknowledge each interaction (fake sends INTERACTION_CREATE -> the bot's callback
    arrives), 99th percentile; goal under 300 ms
  - the worst event-loop stall seen by a 5 ms ticker during the run; goal under 100 ms
  - fairness: every user got a first image before any user got a third
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fake Discord lives with the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fake_discord import FakeDiscord  # noqa: E402

from bot.app import LoraloopBot  # noqa: E402
from generation.client import ServiceClient, ServiceError  # noqa: E402
from loraloop.config import Config  # noqa: E402
from loraloop.store import AsyncStore  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StallMonitor:
    """Sleeps `tick` seconds over and over; the worst lateness is the longest the loop was blocked."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.tick)
            self.worst = max(self.worst, loop.time() - start - self.tick)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def start_service_process(workdir: Path, model_dir: Path, max_queue: int, per_requester: int,
                                steps: int) -> tuple[subprocess.Popen, ServiceClient]:
    config_path = workdir / "config.toml"
    config_path.write_text(
        "[service]\n"
        f"max_queue = {max_queue}\nmax_per_requester = {per_requester}\n"
        f"default_steps = {steps}\npreview_every = 5\n"
    )
    port = free_port()
    env = {**os.environ, "LORALOOP_DATA_DIR": str(workdir / "service-data"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "loraloop"), "--config", str(config_path), "serve",
         "--model", str(model_dir), "--device", "cpu", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "service.log", "wb"))  # noqa: SIM115  the child owns it
    client = ServiceClient(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while True:
        try:
            await client.health()
            return process, client
        except ServiceError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit(f"the service did not start; see {workdir / 'service.log'}") from None
            await asyncio.sleep(0.2)


class FakeDiscordThread:
    """The fake Discord on its own event loop and thread, as Discord is not inside the bot's
    process: its work (JSON, multipart parsing) then does not count as the bot's loop stalls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-discord", daemon=True)
        self.thread.start()
        self.fake = FakeDiscord()

    async def call(self, coro):
        """Run a coroutine of the fake on its loop and await the result from the bot's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self) -> None:
        await self.call(self.fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def run(users: int, per_user: int, steps: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="loraloop-bench-bot-"))
    # Built in a child process: like `loraloop bot`, this process must never import torch (its
    # objects would make garbage collection pauses part of the measured stalls).
    model_dir = Path(subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from loraloop.tiny import tiny_model_path;"
         " print(tiny_model_path(Path(sys.argv[1])))", str(workdir)],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    total = users * per_user
    process, service = await start_service_process(workdir, model_dir, max_queue=total,
                                                   per_requester=per_user, steps=steps)
    remote = FakeDiscordThread()
    fake = remote.fake
    await remote.call(fake.start())
    fake.point_discord_py_here()
    store = await AsyncStore.open(workdir / "loraloop.db", workdir)
    config = Config()
    config = dataclasses.replace(config, bot=dataclasses.replace(
        config.bot, base_size=64, cooldown_seconds=0.0, max_active_per_user=per_user,
        max_queued_per_user=per_user))
    os.environ["LORALOOP_DATA_DIR"] = str(workdir)
    bot = LoraloopBot(config, service, store, guild_ready_timeout=0.05)
    bot_task = asyncio.create_task(bot.start("bench-token"))
    await asyncio.wait_for(bot.caught_up.wait(), 30)

    submitted: list[tuple[float, str]] = []  # when each job reached the service, and whose
    submit = service.submit

    async def timed_submit(request):
        accepted = await submit(request)
        submitted.append((time.monotonic(), request.requester))
        return accepted

    service.submit = timed_submit
    people = [fake.add_user(f"user{i}") for i in range(users)]
    names = {p["id"]: p["username"].removeprefix("user") for p in people}
    monitor = StallMonitor()
    monitor.start()
    started = time.monotonic()
    # Interleaved as a burst would arrive: everyone's first request, then everyone's second...
    interactions = await asyncio.gather(*(
        remote.call(fake.slash("imagine", {"prompt": f"benchmark image {n} of {person['username']}"}, user=person))
        for n in range(per_user) for person in people))
    await remote.call(fake.wait_for(lambda: all(i.acknowledged_at for i in interactions), timeout=30))

    def finished(i) -> bool:
        message = fake.original_message(i)
        return message is not None and message["content"].startswith(("✅", "⚠️", "❌"))

    await remote.call(fake.wait_for(lambda: all(finished(i) for i in interactions), timeout=900))
    elapsed = time.monotonic() - started
    await monitor.stop()

    # When each user's images arrived, in order (followups are numbered by arrival).
    owner = {mid: i.payload["member"]["user"]["id"] for i in interactions for mid in i.followup_ids}
    arrivals: dict[str, list[int]] = {}
    for message in fake.image_messages():
        arrivals.setdefault(owner[int(message["id"])], []).append(int(message["id"]))
    firsts = [ids[0] for ids in arrivals.values()]
    thirds = [ids[2] for ids in arrivals.values() if len(ids) >= 3]
    fair = len(firsts) == users and (not thirds or max(firsts) < min(thirds))
    order = [names[owner[int(m["id"])]] for m in fake.image_messages()]
    submit_order = [names[r.removeprefix("discord:")] for _t, r in submitted]
    submit_spread = submitted[-1][0] - submitted[0][0]

    acks = [i.ack_seconds * 1000 for i in interactions]
    failed = [fake.original_message(i)["content"] for i in interactions
              if not fake.original_message(i)["content"].startswith("✅")]
    await bot.close()
    await bot_task
    await store.close()
    await service.close()
    process.terminate()
    process.wait(timeout=30)
    await remote.close()
    return {
        "requests": total, "users": users, "steps": steps,
        "ack_ms_p50": round(statistics.median(acks), 1), "ack_ms_p99": round(percentile(acks, 99), 1),
        "ack_ms_max": round(max(acks), 1),
        "worst_loop_stall_ms": round(monitor.worst * 1000, 1),
        "fair_first_before_third": fair, "images": len(fake.image_messages()),
        "image_order_by_user": " ".join(order),
        "submit_order_by_user": " ".join(submit_order),
        "submit_spread_s": round(submit_spread, 2),
        "not_done": failed[:3], "wall_s": round(elapsed, 1),
        "torch_in_bot_process": "torch" in sys.modules,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--per-user", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    result = asyncio.run(run(args.users, args.per_user, args.steps))
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
