"""The fair queue between the HTTP handlers and the worker thread.

Round-robin across requesters: each requester has its own line, and the worker takes one job
from each line in turn, so one person queueing ten jobs does not make everyone else wait behind
all ten. A requester may hold at most `max_per_requester` jobs (queued or running) and the whole
queue at most `max_queue`; past either the job is refused (the server answers 429).

`take_batch` is what makes micro-batching work: after taking the next job in fair order it
gathers queued jobs that can share the same pipeline call (same `batch_key`) up to `max_batch`
images. It waits (up to `batch_wait`) only while submissions are still on their way in
(`announce`d by the server but not yet queued): a lone job starts at once, and a burst of
concurrent requests still lands in one batch.

`put_back` returns the jobs of a batch whose worker was lost (the Ray backend) to the front of
their requesters' turns.

Handlers call `put`/`remove` on the event loop, the worker calls `take_batch` on its thread:
every method takes the one lock, and none of them blocks for long while holding it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from generation.contract import ErrorCode


class Queueable(Protocol):
    """What the queue reads of a job; read-only, as the queue never changes a job."""

    @property
    def requester(self) -> str: ...  # whose line the job waits in

    @property
    def count(self) -> int: ...  # images: the job's share of a batch's max_images

    @property
    def batch_key(self) -> Hashable: ...  # jobs with equal keys can share one pipeline call


JobT = TypeVar("JobT", bound=Queueable)


class QueueRefused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FairQueue(Generic[JobT]):
    """Queued jobs of type `JobT`, one line per requester; `take_batch` hands back the same objects."""

    def __init__(self, max_queue: int, max_per_requester: int) -> None:
        self.max_queue = max_queue
        self.max_per_requester = max_per_requester
        self._lines: OrderedDict[str, deque[JobT]] = OrderedDict()  # next requester first
        self._active: dict[str, int] = {}  # requester -> queued + running jobs
        self._paused = False
        self._closed = False
        self._incoming = 0  # submissions being validated, about to be put
        self._changed = threading.Condition()

    # -- the event loop's side ---------------------------------------------------------------

    def check_room(self, requester: str) -> None:
        """Raise QueueRefused now if a job of `requester` would be refused: the server asks before
        it spends any work on a request (decoding an init image), and `put` asks again."""
        with self._changed:
            self._check_room(requester)

    def put(self, job: JobT) -> int:
        """Queue a job; returns how many jobs are ahead of it."""
        with self._changed:
            self._check_room(job.requester)
            self._lines.setdefault(job.requester, deque()).append(job)
            self._active[job.requester] = self._active.get(job.requester, 0) + 1
            self._changed.notify_all()
            return self._order().index(job)

    def announce(self) -> None:
        """A submission arrived and will be `put` (or refused) shortly: worth waiting for."""
        with self._changed:
            self._incoming += 1

    def settle(self) -> None:
        """An announced submission was put or refused."""
        with self._changed:
            self._incoming -= 1
            self._changed.notify_all()

    def remove(self, job: JobT) -> bool:
        """Take a queued job out (cancel). False when it is no longer queued."""
        with self._changed:
            line = self._lines.get(job.requester)
            if line is None or job not in line:
                return False
            line.remove(job)
            if not line:
                del self._lines[job.requester]
            self._release(job)
            return True

    def order(self) -> list[JobT]:
        """Queued jobs in the order the worker will start them."""
        with self._changed:
            return self._order()

    def depth(self) -> int:
        with self._changed:
            return self._depth()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Keep accepting jobs but start none (running ones finish)."""
        with self._changed:
            self._paused = True

    def resume(self) -> None:
        with self._changed:
            self._paused = False
            self._changed.notify_all()

    def close(self) -> None:
        """Wake the worker so it can exit."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- the worker's side -------------------------------------------------------------------

    def take_batch(self, max_images: int, batch_wait: float) -> list[JobT] | None:
        """Block until a batch can start; None once the queue is closed."""
        with self._changed:
            while not self._closed and (self._paused or not self._lines):
                self._changed.wait()
            if self._closed:
                return None
            first = self._pop_next()
            batch = [first]
            images = first.count
            deadline = time.monotonic() + batch_wait
            while images < max_images:
                for job in self._order():
                    if job.batch_key == first.batch_key and images + job.count <= max_images:
                        self._take(job)
                        batch.append(job)
                        images += job.count
                remaining = deadline - time.monotonic()
                if images >= max_images or remaining <= 0 or self._closed or not self._incoming:
                    break
                self._changed.wait(remaining)
            return batch

    def put_back(self, jobs: list[JobT]) -> None:
        """Queue taken jobs again, each first in its requester's line and those requesters first in the
        rotation, in the order given (a lost worker's batch). They still count as active, so no limit
        is checked: they were admitted once."""
        with self._changed:
            for job in reversed(jobs):
                line = self._lines.pop(job.requester, deque())
                line.appendleft(job)
                self._lines[job.requester] = line
                self._lines.move_to_end(job.requester, last=False)
            self._changed.notify_all()

    def done(self, job: JobT) -> None:
        """A taken job finished (any outcome): its requester may queue another."""
        with self._changed:
            self._release(job)

    # -- helpers (lock held) ---------------------------------------------------------------

    def _check_room(self, requester: str) -> None:
        if self._depth() >= self.max_queue:
            raise QueueRefused(
                ErrorCode.QUEUE_FULL,
                f"The queue is full ({self.max_queue} jobs waiting). Try again in a minute.",
            )
        if self._active.get(requester, 0) >= self.max_per_requester:
            raise QueueRefused(
                ErrorCode.REQUESTER_LIMIT,
                f"You already have {self.max_per_requester} jobs queued or running; "
                "wait for one to finish.",
            )

    def _depth(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _order(self) -> list[JobT]:
        lines = [list(line) for line in self._lines.values()]
        order: list[JobT] = []
        for turn in range(max((len(line) for line in lines), default=0)):
            order.extend(line[turn] for line in lines if turn < len(line))
        return order

    def _pop_next(self) -> JobT:
        requester, line = next(iter(self._lines.items()))
        job = line.popleft()
        del self._lines[requester]
        if line:
            self._lines[requester] = line  # back of the rotation
        return job

    def _take(self, job: JobT) -> None:
        """Take a job out of turn to share a batch. Its requester has had its turn, so it goes
        to the back of the rotation like one popped in turn: otherwise a burst of compatible
        jobs lets the first few requesters' second jobs start before later requesters' first."""
        line = self._lines.pop(job.requester)
        line.remove(job)
        if line:
            self._lines[job.requester] = line

    def _release(self, job: JobT) -> None:
        left = self._active.get(job.requester, 0) - 1
        if left > 0:
            self._active[job.requester] = left
        else:
            self._active.pop(job.requester, None)
