"""Following a generation job for the browser: one reader of the service's event stream per job.

`Followers.start` subscribes to the service's server-sent events (`ServiceClient.events`) the
moment a job is accepted, so its images reach the store even when nobody keeps the page open;
the job's page subscribes to the follower (`listen`) and gets every status as it comes, the
last one first (a page opened late, or reloaded, starts from where the job is). When the job is
done the follower stores each PNG with `AsyncStore.add_image` (an A/B experiment's images
re-encoded without their parameters chunk, as the bot posts them) and the resolved adapters
with `update_generation`, and only then sends the final event, which names the stored images.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from generation.client import ServiceClient
from generation.contract import JobStatus
from loraloop.store import AsyncStore

log = logging.getLogger(__name__)

FINISHED_KEPT = 200  # finished jobs remembered for late pages; older ones are read from the store


@dataclass
class Followed:
    job_id: str
    generation_id: int
    blind: bool
    last: dict[str, Any] = field(default_factory=lambda: {"state": "queued", "position": 0})
    listeners: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    finished: bool = False


def without_parameters(png: bytes) -> bytes:
    """The PNG re-encoded without its text chunks, so an experiment's image does not name its version."""
    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


class Followers:
    def __init__(self, client: ServiceClient, store: AsyncStore) -> None:
        self.client = client
        self.store = store
        self.jobs: dict[str, Followed] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, job_id: str, generation_id: int, blind: bool) -> Followed:
        followed = self.jobs.setdefault(job_id, Followed(job_id, generation_id, blind))
        task = asyncio.create_task(self._follow(followed), name=f"follow {job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return followed

    async def listen(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every status of a followed job from now on, the current one first; ends when it is finished."""
        followed = self.jobs[job_id]
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        followed.listeners.add(queue)
        try:
            event = followed.last
            while True:
                yield event
                if event.get("final"):
                    return
                event = await queue.get()
        finally:
            followed.listeners.discard(queue)

    def _send(self, followed: Followed, event: dict[str, Any]) -> None:
        followed.last = event
        for queue in followed.listeners:
            queue.put_nowait(event)

    async def _follow(self, followed: Followed) -> None:
        status: JobStatus | None = None
        try:
            async for status in self.client.events(followed.job_id):
                self._send(followed, _event(status))
            if status is None:
                raise RuntimeError("the service sent no status")
            images = await self._store_results(followed, status)
            final = {**_event(status), "final": True, "images": images}
        except Exception as exc:
            log.exception("job %s: following failed", followed.job_id)
            await self.store.update_generation(followed.generation_id, status="failed", error=repr(exc)[:500])
            final = {"state": "failed", "final": True, "images": [],
                     "error": f"Lost track of this job ({type(exc).__name__}); job id {followed.job_id}."}
        followed.finished = True
        self._send(followed, final)
        self._forget_old()

    async def _store_results(self, followed: Followed, status: JobStatus) -> list[dict[str, Any]]:
        error = status.error.message if status.error else None
        if status.state.value != "done":
            await self.store.update_generation(followed.generation_id, status=status.state.value, error=error)
            return []
        stored = []
        for image in status.images:
            png = await self.client.image(followed.job_id, image.index)
            if followed.blind:
                png = await asyncio.to_thread(without_parameters, png)
            image_id = await self.store.add_image(followed.generation_id, index=image.index, seed=image.seed,
                                                  width=image.width, height=image.height, png=png)
            stored.append({"id": image_id, "seed": image.seed, "width": image.width, "height": image.height})
        duration = (round(1000 * (status.finished_at - status.started_at))
                    if status.finished_at and status.started_at else None)
        # The versions actually applied, so the like rate counts the version that made the image.
        await self.store.update_generation(followed.generation_id, status="done", duration_ms=duration,
                                           adapters=[a.to_dict() for a in status.adapters])
        log.info("job %s: %d image(s) stored", followed.job_id, len(stored))
        return stored

    def _forget_old(self) -> None:
        finished = [job_id for job_id, f in self.jobs.items() if f.finished and not f.listeners]
        for job_id in finished[:-FINISHED_KEPT]:
            del self.jobs[job_id]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _event(status: JobStatus) -> dict[str, Any]:
    """What the page needs of a status (no server paths, no parameters it does not show)."""
    event: dict[str, Any] = {"state": status.state.value, "position": status.position, "step": status.step,
                             "total_steps": status.total_steps}
    if status.preview:
        event["preview"] = status.preview
    if status.error:
        event["error"] = status.error.message
    return event
