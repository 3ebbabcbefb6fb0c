"""The local backend: one thread that touches torch. It loads the model, takes batches from the
fair queue, runs each with the shared `BatchRunner` (generation/batches.py) and hands every event
back to the event loop with `call_soon_threadsafe`.

Nothing else in the service imports torch, so an HTTP handler can never block on the GPU. The Ray
backend (generation/ray_workers.py) hosts the same runner in worker actors instead of this thread.

At start, after loading, the safety checker (`[service] safety_checker`) loads and
`[service] warmup_sizes` run once (pipeline.warm_up) before the service reports ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from generation.batches import (
    BatchDone,
    BatchRunner,
    Cancelled,
    Event,
    Failed,
    Finished,
    Progress,
    Started,
    Work,
)
from generation.contract import ApiError, ImageResult
from generation.jobs import Job
from generation.queue import FairQueue

if TYPE_CHECKING:
    from loraloop.config import ServiceConfig

log = logging.getLogger(__name__)


class JobSink(Protocol):
    """The loop-side receiver of a backend's reports (all called on the event loop)."""

    def on_started(self, jobs: Sequence[Job], total_steps: int) -> None: ...
    def on_progress(self, jobs: Sequence[Job], step: int, previews: dict[str, str], step_seconds: float) -> None: ...
    def on_finished(self, job: Job, images: list[ImageResult], pngs: list[bytes]) -> None: ...
    def on_cancelled(self, job: Job) -> None: ...
    def on_failed(self, job: Job, error: ApiError) -> None: ...


class BackendError(Exception):
    """The backend cannot start (Ray missing or unreachable, no GPU in the cluster): one sentence saying
    what to do, shown to whoever started the service."""


@dataclass
class WorkerState:
    """What /healthz and /metrics say of one worker (updated on the loop, or by the local thread)."""

    name: str
    alive: bool = True
    busy: bool = False
    adapters: frozenset[str] = frozenset()  # sha256s held, as of its last batch
    batches: int = 0  # batches finished


class Backend(Protocol):
    """Where batches run: the local thread (`Worker`) or Ray worker actors (`ray_workers.RayWorkers`)."""

    @property
    def device(self) -> str: ...
    @property
    def native_size(self) -> int: ...
    @property
    def states(self) -> list[WorkerState]: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def cancel(self, job: Job) -> None: ...
    def forget_adapters_except(self, sha256s: set[str]) -> None: ...


def deliver(sink: JobSink, jobs: Mapping[str, Job], event: Event) -> None:
    """One runner event, to the sink, with the batch's job ids turned back into its `Job`s (on the loop)."""
    match event:
        case Started(job_ids, total_steps):
            sink.on_started([jobs[i] for i in job_ids], total_steps)
        case Progress(job_ids, step, previews, seconds):
            sink.on_progress([jobs[i] for i in job_ids], step, previews, seconds)
        case Finished(job_id, images, pngs):
            sink.on_finished(jobs[job_id], images, pngs)
        case Cancelled(job_id):
            sink.on_cancelled(jobs[job_id])
        case Failed(job_id, error):
            sink.on_failed(jobs[job_id], error)
        case BatchDone():
            pass


class Worker:
    def __init__(
        self,
        *,
        model: str,
        device: str,
        data_dir: Path,
        queue: FairQueue[Job],
        sink: JobSink,
        loop: asyncio.AbstractEventLoop,
        max_batch: int,
        batch_wait: float,
        preview_every: int,
        settings: ServiceConfig | None = None,
    ) -> None:
        self.model_name = model
        self.requested_device = device
        self.data_dir = data_dir
        self.queue = queue
        self.sink = sink
        self.loop = loop
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.preview_every = preview_every
        self.settings = settings  # dtype, the fast path and warm-up; None: the defaults, no warm-up
        self.warmed: list[tuple[int, int, int]] = []  # (width, height, batch) run at start
        self.runner: BatchRunner | None = None
        self.device = "loading"
        self.state = WorkerState("local", alive=False)
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._ready: asyncio.Future = loop.create_future()

    @property
    def model(self) -> Any:
        return self.runner.model if self.runner is not None else None

    @property
    def native_size(self) -> int:
        return self.runner.model.native_size if self.runner is not None else 512

    @property
    def states(self) -> list[WorkerState]:
        return [self.state]

    async def start(self) -> None:
        """Start the thread and wait until the model is loaded (raises what loading raised)."""
        self._thread.start()
        await self._ready
        self.state.alive = True

    async def stop(self) -> None:
        """Ask the thread to exit after the current batch, and wait for it (off the loop)."""
        await asyncio.get_running_loop().run_in_executor(None, self._join)

    def _join(self, timeout: float = 30.0) -> None:
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel(self, job: Job) -> None:
        """Nothing to send: the thread reads `job.cancel_requested` at every step."""

    def forget_adapters_except(self, sha256s: set[str]) -> None:
        """After a reload: unload adapters no longer in the directory, at the next batch."""
        if self.runner is not None:
            self.runner.forget_adapters_except(sha256s)

    # -- on the worker thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.runner, self.warmed = load_runner(self.model_name, self.requested_device, self.data_dir,
                                                   self.settings, self.max_batch, self.preview_every)
            self.device = self.runner.model.device
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it at start
            self.loop.call_soon_threadsafe(_settle, self._ready, exc)
            return
        self.loop.call_soon_threadsafe(_settle, self._ready, None)
        while True:
            batch = self.queue.take_batch(self.max_batch, self.batch_wait)
            if batch is None:
                return
            self.state.busy = True
            try:
                self._run_batch(self.runner, batch)
            finally:
                self.state.busy = False
                self.state.batches += 1
                for job in batch:
                    self.queue.done(job)

    def _run_batch(self, runner: BatchRunner, batch: list[Job]) -> None:
        jobs = {job.id: job for job in batch}
        runner.run([Work(job.id, job.spec) for job in batch], lambda event: self._report(jobs, event),
                   lambda job_id: jobs[job_id].cancel_requested.is_set())

    def _report(self, jobs: dict[str, Job], event: Event) -> None:
        if isinstance(event, BatchDone):
            self.state.adapters = event.adapters
        self.loop.call_soon_threadsafe(deliver, self.sink, jobs, event)


def load_runner(model: str, device: str, data_dir: Path, settings: ServiceConfig | None, max_batch: int,
                preview_every: int) -> tuple[BatchRunner, list[tuple[int, int, int]]]:
    """Load the model, warm it up as `[service]` says, and wrap it in a runner; with the (width, height,
    batch) shapes warmed up. Blocking: minutes on a big model. The local thread and every Ray worker
    actor start this way."""
    from generation.pipeline import compiled_graph_count, load_model, warm_up

    loaded = load_model(model, device, data_dir, settings)
    safety = None
    if settings is not None and settings.safety_checker:
        safety = _load_safety(settings, loaded.device, data_dir)
    warmed: list[tuple[int, int, int]] = []
    if settings is not None and settings.warmup_sizes:
        warmed = warm_up(loaded, settings)
    if loaded.compiled:
        if not warmed:
            log.warning("compile is on with no [service] warmup_sizes: each job of a new shape "
                        "waits for the UNet to compile")
        log.info("torch.compile: %d graph(s) built at start", compiled_graph_count())
    return BatchRunner(loaded, max_batch=max_batch, preview_every=preview_every, safety=safety), warmed


def _load_safety(settings: ServiceConfig, device: str, data_dir: Path) -> Any:
    from generation.safety import SafetyChecker
    from loraloop.tiny import loadable_model

    checker = SafetyChecker.load(loadable_model(settings.safety_checker, data_dir, "safety"), device,
                                 settings.safety_adjustment)
    log.info("safety checker %s loaded (adjustment %g)", settings.safety_checker, settings.safety_adjustment)
    return checker


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
