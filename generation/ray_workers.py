"""The Ray backend (`[service] backend = "ray"`): the service's own front, batches run by worker actors.

    backend = RayWorkers(settings, data_dir, queue, service)   # built by GenerationService.start
    await backend.start()                                      # joins or starts the cluster, loads every model

The aiohttp front keeps everything that is a product rule: the HTTP API, auth, the fair queue,
per-user caps, micro-batching, SSE, the adapter catalogue, metrics. Only the batch leaves the
process: one dispatcher takes the next batch in fair order (`FairQueue.take_batch`, the same call
the local thread makes) as soon as a worker is idle, and hands it to an idle worker, preferring
the one that already holds the most of the batch's adapters (the idea of Ray Serve's model
multiplexing, kept in our scheduler because fairness is ours to decide, not the engine's).

`WorkerActor` is a thin host around the same `BatchRunner` the local thread uses
(generation/batches.py): it loads the model once, runs a batch on a thread of its own and streams
the runner's events back (a Ray streaming generator), which the front turns into the same
`JobSink` calls, hence the same SSE events, as the local backend. `cancel` reaches the actor
while it runs (a threaded actor) and the runner stops at the next step.

Failover: a worker that dies mid-batch (killed, out of memory, its node lost) has the batch's
unfinished jobs put back at the front of their requesters' turns, once; lost a second time, a job
fails with `LOST_TWICE`. Idle workers are asked every `WATCH_SECONDS` whether they are still there,
so one that died idle is out of the rotation before a batch is sent to it. Ray restarts the actor
(`max_restarts`, `[service] ray_worker_restarts`); it takes work again once its model has loaded,
and meanwhile the others keep serving.

Adapters reach every worker through the shared ADAPTERS_DIR: a job carries its `AdapterFile`
(path and sha256 from the front's scan) and the worker loads it through `verified_copy`, which
refuses bytes that are not the scanned ones. A reload tells every worker to drop what is gone.
Workers on machines without the directory mounted cannot load adapters: mount it on every node.

Floor: part of generation/; imported only when the backend is "ray", so the default install never
needs Ray. torch is imported inside the actor, never in the front.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue as queues
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from generation.batches import BatchDone, BatchRunner, Event, Work
from generation.contract import ApiError, ErrorCode
from generation.jobs import Job
from generation.queue import FairQueue
from generation.worker import BackendError, JobSink, WorkerState, deliver, load_runner
from loraloop.config import ServiceConfig

log = logging.getLogger(__name__)

# What a job lost with its worker twice is told (README "Several GPUs: the Ray backend").
LOST_TWICE = "The GPU worker running this job was lost twice; try again (job {job_id})."
# How often idle workers are asked whether they are still there, and how long one may take to answer: a
# worker that died idle is noticed here rather than by the next batch sent to it.
WATCH_SECONDS = 5.0
ANSWER_SECONDS = 30.0
# Errors that mean the actor is gone (dead, restarting, or its node unreachable), not that the batch failed.
_LOST = (RayActorError, ActorUnavailableError)


class WorkerActor:
    """One GPU (or CPU) worker: loads the model once and runs batches with the shared runner."""

    def __init__(self, model: str, device: str, data_dir: str, settings: ServiceConfig, threads: int) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO)
        self.runner: BatchRunner
        self.runner, self.warmed = load_runner(model, device, Path(data_dir), settings, settings.max_batch,
                                               settings.preview_every)
        self._cancelled: set[str] = set()

    def ready(self) -> dict[str, Any]:
        """Answers once the model has loaded (Ray holds calls until `__init__` is done)."""
        model = self.runner.model
        return {"device": model.device, "native_size": model.native_size, "adapters": self.runner.held_adapters(),
                "pid": os.getpid()}

    def run_batch(self, work: list[Work], cancelled: list[str]) -> Iterator[Event]:
        """Run one batch, yielding the runner's events as they happen (a Ray streaming generator)."""
        self._cancelled.update(cancelled)
        events: queues.SimpleQueue[Event | None] = queues.SimpleQueue()

        def run() -> None:
            try:
                self.runner.run(work, events.put, self._cancelled.__contains__)
            finally:
                events.put(None)

        # The runner reports from inside the pipeline's step callback, which cannot yield: it runs on
        # its own thread and this generator forwards what it puts.
        threading.Thread(target=run, name="batch", daemon=True).start()
        while (event := events.get()) is not None:
            yield event
        self._cancelled.difference_update(item.job_id for item in work)

    def cancel(self, job_ids: list[str]) -> None:
        """Stop these jobs at the next step (their batch may be running now, or about to start)."""
        self._cancelled.update(job_ids)

    def forget_adapters_except(self, sha256s: list[str]) -> None:
        self.runner.forget_adapters_except(set(sha256s))


class RequeueSink(JobSink, Protocol):
    """A `JobSink` that also hears of lost workers and of the jobs put back because of them."""

    def on_worker_lost(self, name: str) -> None: ...
    def on_requeued(self, jobs: list[Job]) -> None: ...


@dataclass(eq=False)
class _Worker:
    handle: Any  # the actor handle
    state: WorkerState
    job_ids: set[str] = field(default_factory=set)
    rejoining: bool = False  # waiting for Ray to restart it


class RayWorkers:
    """The Ray backend: N worker actors behind the service's fair queue."""

    def __init__(self, settings: ServiceConfig, data_dir: Path, queue: FairQueue[Job], sink: RequeueSink) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.queue = queue
        self.sink = sink
        self.workers: list[_Worker] = []
        self.device = "loading"
        self.native_size = 512
        self._started_ray = False
        self._idle = asyncio.Event()
        self._taker = ThreadPoolExecutor(1, thread_name_prefix="ray-dispatch")  # take_batch blocks
        self._tasks: set[asyncio.Task] = set()

    @property
    def states(self) -> list[WorkerState]:
        return [worker.state for worker in self.workers]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Join (or start) the cluster, start the actors and wait until every model has loaded."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._connect)
        count = self.settings.ray_workers or await loop.run_in_executor(None, _cluster_gpus)
        if count < 1:
            raise BackendError("The Ray cluster has no GPUs: set [service] ray_workers, and ray_cpu_threads "
                               "for CPU workers")
        threads = self.settings.ray_cpu_threads
        actor = ray.remote(WorkerActor).options(
            num_cpus=threads or 1,
            num_gpus=0 if threads else 1,
            max_restarts=self.settings.ray_worker_restarts,
            max_task_retries=0,  # a lost batch is ours to re-queue, once, at the front of the turns
            max_concurrency=4,  # run_batch, and cancel / forget / ready while it runs
        )
        device = "cpu" if threads else self.settings.device
        for number in range(count):
            handle = actor.remote(self.settings.model, device, str(self.data_dir), self.settings, threads)
            self.workers.append(_Worker(handle, WorkerState(f"ray-{number}", alive=False)))
        infos = await asyncio.gather(*(worker.handle.ready.remote() for worker in self.workers))
        for worker, info in zip(self.workers, infos, strict=True):
            self._joined(worker, info)
        self.device, self.native_size = infos[0]["device"], infos[0]["native_size"]
        log.info("ray: %d worker(s) ready on %s", count, self.device)
        self._update_idle()
        self._spawn(self._dispatch())
        self._spawn(self._watch())

    def _connect(self) -> None:
        if ray.is_initialized():
            return  # the process already has a cluster (a test session, a notebook): share it
        address = None if self.settings.ray_address == "local" else self.settings.ray_address
        try:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False,
                     include_dashboard=False if address is None else None)
        except ConnectionError as exc:
            log.error("ray.init(address=%r): %s", address, exc)
            raise BackendError(f"Cannot reach the Ray cluster at {address}: start it with `ray start --head` "
                               "there, or set [service] ray_address (\"local\" starts one here)") from None
        self._started_ray = True

    async def stop(self) -> None:
        self.queue.close()  # the dispatcher's take_batch returns None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            ray.kill(worker.handle, no_restart=True)
        self._taker.shutdown(wait=False)
        if self._started_ray:
            await asyncio.get_running_loop().run_in_executor(None, ray.shutdown)

    # -- what the service asks ---------------------------------------------------------------

    def cancel(self, job: Job) -> None:
        for worker in self.workers:
            if job.id in worker.job_ids:
                worker.handle.cancel.remote([job.id])

    def forget_adapters_except(self, sha256s: set[str]) -> None:
        for worker in self.workers:
            worker.handle.forget_adapters_except.remote(sorted(sha256s))

    # -- dispatch, on the loop ---------------------------------------------------------------

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._idle.wait()
            batch = await loop.run_in_executor(self._taker, self.queue.take_batch, self.settings.max_batch,
                                               self.settings.batch_wait_ms / 1000)
            if batch is None:
                return
            worker = self._choose(batch)
            if worker is None:  # the idle worker was lost while the batch was being gathered
                self.queue.put_back(batch)
                continue
            worker.state.busy = True
            worker.job_ids = {job.id for job in batch}
            self._update_idle()
            self._spawn(self._run_on(worker, batch))

    def _choose(self, batch: list[Job]) -> _Worker | None:
        """An idle worker, the one holding most of the batch's adapters first (then the lowest number)."""
        wanted = {adapter.file.sha256 for adapter in batch[0].spec.adapters}
        idle = [worker for worker in self.workers if worker.state.alive and not worker.state.busy]
        return max(idle, key=lambda worker: len(wanted & worker.state.adapters), default=None)

    async def _run_on(self, worker: _Worker, batch: list[Job]) -> None:
        jobs = {job.id: job for job in batch}
        again: list[Job] = []
        try:
            stream = worker.handle.run_batch.remote(
                [Work(job.id, job.spec) for job in batch], [job.id for job in batch if job.cancel_requested.is_set()])
            async for ref in stream:
                event = await ref
                if isinstance(event, BatchDone):
                    worker.state.adapters = event.adapters
                deliver(self.sink, jobs, event)
            worker.state.batches += 1
        except _LOST as exc:
            log.warning("ray worker %s lost mid-batch (jobs %s): %s", worker.state.name, ",".join(jobs),
                        type(exc).__name__)
            again = self._lost(worker, batch)
        except Exception:
            log.exception("jobs %s: the batch failed on ray worker %s", ",".join(jobs), worker.state.name)
            for job in batch:
                self.sink.on_failed(job, ApiError(
                    ErrorCode.GENERATION_FAILED.value,
                    f"Generation failed; the service log has the details (job {job.id})."))
        finally:
            worker.state.busy = False
            worker.job_ids = set()
            for job in batch:
                if job not in again:
                    self.queue.done(job)
            self._update_idle()

    def _lost(self, worker: _Worker, batch: list[Job]) -> list[Job]:
        """The worker died: its unfinished jobs go back to the front of the queue once, then fail."""
        self.sink.on_worker_lost(worker.state.name)
        again = []
        for job in batch:
            if job.state.finished:
                continue
            if job.requeues:
                log.warning("job %s: lost with a second worker; failed", job.id)
                self.sink.on_failed(job, ApiError(ErrorCode.GENERATION_FAILED.value, LOST_TWICE.format(job_id=job.id)))
            else:
                job.requeues += 1
                again.append(job)
        if again:
            self.queue.put_back(again)
            self.sink.on_requeued(again)
            log.info("jobs %s: re-queued at the front after losing ray worker %s", ",".join(j.id for j in again),
                     worker.state.name)
        self._gone(worker)
        return again

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            idle = [worker for worker in self.workers if worker.state.alive and not worker.state.busy]
            answers = await asyncio.gather(
                *(asyncio.wait_for(worker.handle.ready.remote(), ANSWER_SECONDS) for worker in idle),
                return_exceptions=True)
            for worker, answer in zip(idle, answers, strict=True):
                if isinstance(answer, (*_LOST, TimeoutError)) and not worker.state.busy:
                    log.warning("ray worker %s stopped answering while idle (%s)", worker.state.name,
                                type(answer).__name__)
                    self._gone(worker)
                    self._update_idle()

    def _gone(self, worker: _Worker) -> None:
        """Take the worker out of the rotation until Ray has restarted it."""
        worker.state.alive = False
        worker.state.adapters = frozenset()
        if not worker.rejoining:
            worker.rejoining = True
            self._spawn(self._rejoin(worker))

    async def _rejoin(self, worker: _Worker) -> None:
        """Wait for Ray to restart the actor and its model to load, then give it work again."""
        try:
            await self._wait_for_restart(worker)
        finally:
            worker.rejoining = False

    async def _wait_for_restart(self, worker: _Worker) -> None:
        while True:
            try:
                info = await worker.handle.ready.remote()
                break
            except ActorUnavailableError:
                await asyncio.sleep(1.0)  # restarting, or its node unreachable for now: ask again
            except RayActorError:
                log.error("ray worker %s is gone for good (restarts used up, [service] ray_worker_restarts)",
                          worker.state.name)
                return
        self._joined(worker, info)
        log.info("ray worker %s is back (pid %s)", worker.state.name, info["pid"])
        self._update_idle()

    def _joined(self, worker: _Worker, info: dict[str, Any]) -> None:
        worker.state.alive = True
        worker.state.adapters = frozenset(info["adapters"])

    def _update_idle(self) -> None:
        if any(worker.state.alive and not worker.state.busy for worker in self.workers):
            self._idle.set()
        else:
            self._idle.clear()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
