"""The HTTP API of the generation service (aiohttp), and the bookkeeping of jobs on the loop.

    app = create_app(config, Secrets.from_env())      # what `loraloop serve` runs
    running = await start_service(config, secrets)    # the same on an ephemeral port (tests, bench)

Routes (all JSON; errors are `{"error": {"code", "message"}}`; bearer token when
LORALOOP_SERVICE_TOKEN is set, on everything but /healthz; /metrics also takes
LORALOOP_METRICS_TOKEN, and needs one of the two when either is set):

    POST   /v1/jobs                   -> 202 {"id", "position"} (jobs ahead of it; 0: next)
    POST   /v1/describe               -> Description (the captioning model's words for an image)
    GET    /v1/jobs/{id}              -> JobStatus
    GET    /v1/jobs/{id}/events       -> server-sent events, one JobStatus each, until it finishes
    GET    /v1/jobs/{id}/images/{n}   -> image/png with a `parameters` text chunk
    DELETE /v1/jobs/{id}              -> cancel: queued jobs are dropped, running ones stop at the next step
    GET    /v1/adapters               -> [AdapterInfo]
    POST   /v1/adapters/reload        -> [AdapterInfo]
    POST   /v1/queue/pause | resume   -> Health (a paused queue accepts jobs but starts none)
    GET    /healthz                   -> Health
    GET    /metrics                   -> Prometheus text
    GET    /openapi.json              -> this API as an OpenAPI 3.1 document (generation/openapi.py)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from generation.adapters import AdapterCatalog, AdapterDirectory
from generation.captioner import Captioner, CaptionerUnavailable
from generation.contract import (
    ApiError,
    DescribeRequest,
    Description,
    ErrorCode,
    Health,
    ImageResult,
    InvalidRequest,
    JobAccepted,
    JobRequest,
    JobState,
    WorkerStatus,
)
from generation.jobs import Job, build_spec, decode_image_field, work_budget
from generation.metrics import Metrics
from generation.openapi import build_document
from generation.queue import FairQueue, QueueRefused
from generation.worker import Backend, BackendError, Worker
from loraloop.config import Config, Secrets, is_loopback

log = logging.getLogger(__name__)

SERVICE_KEY: web.AppKey[GenerationService] = web.AppKey("service")
# A queued job can wait minutes without an update; idle connections get closed by proxies.
KEEPALIVE_SECONDS = 15.0
# Load balancers and supervisors probe health without the token.
_OPEN_ENDPOINTS = {"/healthz"}

STATUS_FOR_CODE = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNKNOWN_ADAPTER: 400,
    ErrorCode.UNKNOWN_SCHEDULER: 400,
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.REQUESTER_LIMIT: 429,
    ErrorCode.CAPTIONER_UNAVAILABLE: 503,
}


class ServiceFailure(Exception):
    """An expected failure with an HTTP status; becomes the JSON error body."""

    def __init__(self, code: ErrorCode, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_FOR_CODE.get(code, 500)


def error_response(code: ErrorCode | str, message: str, status: int) -> web.Response:
    code_value = code.value if isinstance(code, ErrorCode) else code
    return web.json_response(ApiError(code_value, message).to_dict(), status=status)


class GenerationService:
    """Jobs by id, the fair queue, the worker, the adapter catalog and the metrics, on one loop."""

    def __init__(self, config: Config, secrets: Secrets) -> None:
        self.config = config
        self.settings = config.service
        self.token = secrets.service_token
        self.metrics_token = secrets.metrics_token
        self.queue: FairQueue[Job] = FairQueue(self.settings.max_queue, self.settings.max_per_requester)
        self.adapter_dir = AdapterDirectory(config.adapters_dir)
        self.catalog = AdapterCatalog({})
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.metrics = Metrics()
        self.backend: Backend | None = None
        self.worker: Worker | None = None  # the local backend's thread (its model, for tests and benchmarks)
        self._reload_lock = asyncio.Lock()
        # The captioner has a thread of its own, so a /describe never waits behind a long batch;
        # it loads on the first /describe (most services never get one) and stays loaded.
        self._captioner: Captioner | None = None
        self._caption_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner")
        self._describing = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.config.adapters_dir.mkdir(parents=True, exist_ok=True)
        await self.reload_adapters()
        backend: Backend
        if self.settings.backend == "ray":
            # Imported here: the local backend never needs Ray installed.
            try:
                from generation.ray_workers import RayWorkers
            except ImportError as exc:
                if exc.name != "ray":
                    raise
                raise BackendError("[service] backend = \"ray\" needs Ray: pip install 'loraloop[ray]'") from None

            backend = RayWorkers(self.settings, self.config.data_dir, self.queue, self)
        else:
            backend = self.worker = Worker(
                model=self.settings.model,
                device=self.settings.device,
                data_dir=self.config.data_dir,
                queue=self.queue,
                sink=self,
                loop=loop,
                max_batch=self.settings.max_batch,
                batch_wait=self.settings.batch_wait_ms / 1000,
                preview_every=self.settings.preview_every,
                settings=self.settings,
            )
        await backend.start()
        self.backend = backend
        # Workers that loaded while a reload ran have their own idea of the directory: tell them now.
        backend.forget_adapters_except({f.sha256 for f in self.catalog.files()})

    async def stop(self) -> None:
        for job in list(self.jobs.values()):
            if not job.state.finished:
                job.cancel_requested.set()
        if self.backend is not None:
            await self.backend.stop()
        # Jobs still queued (a paused queue, say) would never finish, and their open event
        # streams would hold the shutdown until aiohttp's timeout: end them as failed.
        stopped = ApiError(ErrorCode.GENERATION_FAILED.value,
                           "The generation service stopped before this job finished; try again once it is back.")
        for job in list(self.jobs.values()):
            self.on_failed(job, stopped)
        self._caption_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def native_size(self) -> int:
        return self.backend.native_size if self.backend else 512

    @property
    def work_budget(self) -> int:
        return work_budget(self.settings, self.backend.device if self.backend else "cpu")

    # -- requests ----------------------------------------------------------------------------

    async def submit(self, request: JobRequest) -> JobAccepted:
        loop = asyncio.get_running_loop()
        self.queue.announce()  # the worker may hold a batch open for this job
        try:
            # A full queue refuses before any work is spent on the request, its init image included.
            self.queue.check_room(request.requester)
            # Decoding an init image is CPU work: off the loop.
            spec = await loop.run_in_executor(None, build_spec, request, self.settings, self.catalog,
                                              self.native_size, self.work_budget)
            job = Job(id=uuid.uuid4().hex, spec=spec, requester=request.requester)
            position = self.queue.put(job)
        except QueueRefused as exc:
            self.metrics.refused += 1
            raise ServiceFailure(exc.code, exc.message) from None
        finally:
            self.queue.settle()
        self.jobs[job.id] = job
        self._forget_old_jobs()
        log.info("job %s: queued at position %d for %r (%d image(s), %s)", job.id, position,
                 job.requester or "anonymous", job.count, spec.mode)
        return JobAccepted(id=job.id, position=position)

    async def describe(self, request: DescribeRequest) -> Description:
        """The captioning model's words for an image; waits behind at most `max_queue` others."""
        if self._describing >= self.settings.max_queue:
            raise ServiceFailure(ErrorCode.QUEUE_FULL, "Too many images are waiting to be described; "
                                 "try again in a minute.")
        self._describing += 1
        try:
            caption = await asyncio.get_running_loop().run_in_executor(self._caption_thread, self._caption, request)
        finally:
            self._describing -= 1
        return Description(caption=caption)

    def _caption(self, request: DescribeRequest) -> str:
        """On the captioner's thread: decode, load the model the first time, caption."""
        from loraloop.tiny import loadable_model

        image = decode_image_field(request.image, "image", self.settings.max_image_pixels)
        if self._captioner is None:
            dataset = self.config.dataset
            try:
                self._captioner = Captioner(loadable_model(dataset.caption_model, self.config.data_dir, "captioner"),
                                            dataset.caption_device, dataset.caption_min_new_tokens,
                                            dataset.caption_max_new_tokens)
            except CaptionerUnavailable as exc:
                log.error("describe: %s", exc)
                raise ServiceFailure(ErrorCode.CAPTIONER_UNAVAILABLE,
                                     "This service cannot describe images: its captioning model does not load "
                                     "(see its log and [dataset] caption_model).") from None
            log.info("describe: captioning model %s loaded", dataset.caption_model)
        (caption,) = self._captioner([image])
        return caption

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ServiceFailure(ErrorCode.NOT_FOUND, f"No job {job_id!r}: it never existed or has expired.")
        return job

    def position(self, job: Job) -> int:
        if job.state is not JobState.QUEUED:
            return 0
        order = self.queue.order()
        return order.index(job) if job in order else 0

    def cancel(self, job: Job) -> None:
        if job.state.finished:
            return
        job.cancel_requested.set()
        if self.queue.remove(job):
            log.info("job %s: cancelled while queued", job.id)
        else:
            # The worker stops its batch at the next step if no other job in it still wants
            # images, else finishes the others and drops this one's; either way it is over now.
            if self.backend is not None:
                self.backend.cancel(job)
            log.info("job %s: cancelled while running; the worker stops at the next step", job.id)
        self._finish(job, JobState.CANCELLED)

    async def reload_adapters(self) -> AdapterCatalog:
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            self.catalog = await loop.run_in_executor(None, self.adapter_dir.scan)
        if self.backend is not None:
            self.backend.forget_adapters_except({f.sha256 for f in self.catalog.files()})
        log.info("adapters: %d available (%s)", len(self.catalog.files()), ", ".join(self.catalog.names()) or "none")
        return self.catalog

    def health(self) -> Health:
        workers = self.workers()
        return Health(
            # "degraded": some workers are down (a Ray worker restarting); "down": none can take work.
            status="ok" if all(w.alive for w in workers) else "degraded" if any(w.alive for w in workers) else "down",
            model=self.settings.model,
            device=self.backend.device if self.backend else "loading",
            queue_depth=self.queue.depth(),
            paused=self.queue.paused,
            native_size=self.native_size if self.backend and self.backend.device != "loading" else 0,
            backend=self.settings.backend,
            workers=tuple(workers),
        )

    def workers(self) -> list[WorkerStatus]:
        labels = {f.sha256: f.label for f in self.catalog.files()}
        return [WorkerStatus(state.name, state.alive, state.busy,
                             tuple(sorted(labels.get(sha, sha[:12]) for sha in state.adapters)), state.batches)
                for state in (self.backend.states if self.backend else [])]

    # -- the worker's reports (JobSink), on the loop -----------------------------------------

    def on_started(self, jobs: Sequence[Job], total_steps: int) -> None:
        self.metrics.batches += 1
        self.metrics.batched_jobs += len(jobs)
        for job in jobs:
            if job.state.finished:
                continue
            job.state = JobState.RUNNING
            job.started_at = _now()
            job.total_steps = total_steps
            self._publish(job)
        self._publish_positions()

    def on_progress(self, jobs: Sequence[Job], step: int, previews: dict[str, str], step_seconds: float) -> None:
        self.metrics.observe_step(step_seconds)
        for job in jobs:
            if job.state is JobState.RUNNING:
                job.step = step
                self._publish(job, previews.get(job.id))

    def on_finished(self, job: Job, images: list[ImageResult], pngs: list[bytes]) -> None:
        if job.state.finished:
            return
        job.images, job.pngs = images, pngs
        job.step = job.total_steps
        self.metrics.images += len(pngs)
        self._finish(job, JobState.DONE)
        log.info("job %s: done, %d image(s)", job.id, len(pngs))

    def on_cancelled(self, job: Job) -> None:
        if not job.state.finished:
            self._finish(job, JobState.CANCELLED)
            log.info("job %s: cancelled", job.id)

    def on_failed(self, job: Job, error: ApiError) -> None:
        if not job.state.finished:
            job.error = error
            self._finish(job, JobState.FAILED)

    def on_worker_lost(self, name: str) -> None:
        self.metrics.worker_losses += 1

    def on_requeued(self, jobs: list[Job]) -> None:
        """A lost Ray worker's jobs are back in the queue, at the front: they wait for a worker again."""
        self.metrics.requeued += len(jobs)
        for job in jobs:
            if job.state.finished:
                continue
            job.state, job.step, job.started_at = JobState.QUEUED, 0, None
        self._publish_positions()

    # -- helpers -----------------------------------------------------------------------------

    def _finish(self, job: Job, state: JobState) -> None:
        job.state = state
        job.finished_at = _now()
        self.metrics.outcomes[state.value] += 1
        self._publish(job)
        self._publish_positions()

    def _publish(self, job: Job, preview: str | None = None) -> None:
        if not job.subscribers:
            return
        status = job.status(self.position(job), preview)
        for subscriber in job.subscribers:
            subscriber.put_nowait(status)

    def _publish_positions(self) -> None:
        for position, job in enumerate(self.queue.order()):
            if job.subscribers:
                status = job.status(position)
                for subscriber in job.subscribers:
                    subscriber.put_nowait(status)

    def _forget_old_jobs(self) -> None:
        finished = [job_id for job_id, job in self.jobs.items() if job.state.finished]
        for job_id in finished[: max(0, len(finished) - self.settings.keep_finished)]:
            del self.jobs[job_id]


def _now() -> float:
    return time.time()


# -- HTTP ----------------------------------------------------------------------------------


@web.middleware
async def errors_and_auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    service = request.app[SERVICE_KEY]
    named = {} if request.path in _OPEN_ENDPOINTS else {"LORALOOP_SERVICE_TOKEN": service.token}
    if request.path == "/metrics":
        named["LORALOOP_METRICS_TOKEN"] = service.metrics_token
    tokens = {name: token for name, token in named.items() if token}
    if tokens:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not any(
                hmac.compare_digest(given.strip().encode(), token.encode()) for token in tokens.values()):
            return error_response(
                ErrorCode.UNAUTHORIZED,
                f"Missing or wrong token: send 'Authorization: Bearer <{' or '.join(tokens)}>'.",
                401,
            )
    try:
        return await handler(request)
    except InvalidRequest as exc:
        return error_response(exc.code, exc.message, STATUS_FOR_CODE.get(exc.code, 400))
    except ServiceFailure as exc:
        return error_response(exc.code, exc.message, exc.status)
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"The request body is over the {service.settings.max_body_bytes}-byte limit; "
            "send a smaller image.",
            413,
        )
    except web.HTTPNotFound:
        return error_response(ErrorCode.NOT_FOUND, f"No such endpoint: {request.method} {request.path}.", 404)
    except web.HTTPMethodNotAllowed as exc:
        return error_response(
            ErrorCode.INVALID_REQUEST,
            f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(exc.allowed_methods))}.",
            405,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ErrorCode.INVALID_REQUEST, exc.reason, exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        reference = uuid.uuid4().hex[:8]
        log.exception("internal error %s on %s %s", reference, request.method, request.path)
        return error_response(ErrorCode.INTERNAL, f"Internal error (reference {reference}); see the service log.", 500)


routes = web.RouteTableDef()


def _service(request: web.Request) -> GenerationService:
    return request.app[SERVICE_KEY]


async def read_json(request: web.Request) -> Any:
    """A JSON request body, read within `read_timeout_s` and parsed off the loop; raises
    ServiceFailure (415, 408) or InvalidRequest (400). aiohttp refuses one over `max_body_bytes`."""
    service = _service(request)
    if request.content_type != "application/json":
        raise ServiceFailure(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Send JSON with 'Content-Type: application/json' (got {request.content_type!r}).",
        )
    timeout = service.settings.read_timeout_s
    try:
        async with asyncio.timeout(timeout):
            body = await request.read()
    except TimeoutError:
        # A body trickling in would hold its connection open for as long as the client likes.
        log.info("a request body took over %g s to arrive; closing its connection", timeout)
        raise _SlowBody(timeout) from None
    return await asyncio.get_running_loop().run_in_executor(None, parse_json_body, body)


class _SlowBody(Exception):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout


async def _slow_body_response(request: web.Request, seconds: float) -> web.Response:
    response = error_response(ErrorCode.REQUEST_TIMEOUT,
                              f"The request body took over {seconds:g} s to arrive; send it in one go.", 408)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    # Closed now: aiohttp would otherwise linger, reading the rest of the body for 10 s more.
    if request.transport is not None:
        request.transport.close()
    return response


@routes.post("/v1/jobs")
async def submit_job(request: web.Request) -> web.Response:
    try:
        data = await read_json(request)
    except _SlowBody as slow:
        return await _slow_body_response(request, slow.timeout)
    accepted = await _service(request).submit(JobRequest.from_dict(data))
    return web.json_response(accepted.to_dict(), status=202)


@routes.post("/v1/describe")
async def describe_image(request: web.Request) -> web.Response:
    try:
        data = await read_json(request)
    except _SlowBody as slow:
        return await _slow_body_response(request, slow.timeout)
    description = await _service(request).describe(DescribeRequest.from_dict(data))
    return web.json_response(description.to_dict())


def parse_json_body(body: bytes) -> Any:
    """A request body as JSON, or InvalidRequest saying what is wrong with it (blocking: a big body
    takes a while, so the handler runs this on an executor)."""

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise InvalidRequest(f"The body holds the number {text[:20]}, too large for a JSON number here.")
        return value

    def no_constant(name: str) -> Any:
        raise InvalidRequest(f"The body is not valid JSON: {name} is not a JSON number.")

    try:
        return json.loads(body, parse_float=finite, parse_constant=no_constant)
    except InvalidRequest:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON ({exc.msg} at line {exc.lineno}, "
                             f"column {exc.colno}).") from None
    except UnicodeDecodeError:
        raise InvalidRequest("The body is not valid JSON: it is not UTF-8 text.") from None
    except RecursionError:
        raise InvalidRequest("The body nests lists or objects too deeply; a job is a flat object.") from None
    except ValueError:
        # Python refuses to convert integers of over 4300 digits (int_max_str_digits).
        raise InvalidRequest("The body holds a number with too many digits; no field needs more than ten.") from None


@routes.get("/v1/jobs/{id}")
async def job_status(request: web.Request) -> web.Response:
    service = _service(request)
    job = service.job(request.match_info["id"])
    return web.json_response(job.status(service.position(job)).to_dict())


@routes.get("/v1/jobs/{id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    job = service.job(request.match_info["id"])
    updates: asyncio.Queue = asyncio.Queue()
    job.subscribers.add(updates)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        status = job.status(service.position(job))
        while True:
            await response.write(f"data: {json.dumps(status.to_dict())}\n\n".encode())
            if status.state.finished:
                break
            while True:
                try:
                    status = await asyncio.wait_for(updates.get(), KEEPALIVE_SECONDS)
                    break
                except TimeoutError:
                    # A comment line: proxies and clients see traffic while a job waits its turn.
                    await response.write(b": keep-alive\n\n")
        await response.write_eof()
    except ConnectionResetError:
        # The client went away (closed the page, the bot restarted): its job goes on regardless.
        log.debug("job %s: event stream closed by the client", job.id)
    finally:
        job.subscribers.discard(updates)
    return response


@routes.get("/v1/jobs/{id}/images/{index}")
async def job_image(request: web.Request) -> web.Response:
    job = _service(request).job(request.match_info["id"])
    raw_index = request.match_info["index"]
    if job.state is not JobState.DONE:
        raise ServiceFailure(ErrorCode.NOT_FOUND, f"Job {job.id} has no images: it is {job.state.value}.")
    # ASCII digits only: str.isdigit also accepts '²', which int() then refuses.
    if not (raw_index.isascii() and raw_index.isdigit()) or int(raw_index) >= len(job.pngs):
        raise ServiceFailure(
            ErrorCode.NOT_FOUND, f"Job {job.id} has images 0 to {len(job.pngs) - 1}; there is no {raw_index!r}."
        )
    return web.Response(body=job.pngs[int(raw_index)], content_type="image/png")


@routes.delete("/v1/jobs/{id}")
async def cancel_job(request: web.Request) -> web.Response:
    service = _service(request)
    job = service.job(request.match_info["id"])
    service.cancel(job)
    return web.json_response(job.status(service.position(job)).to_dict())


@routes.get("/v1/adapters")
async def list_adapters(request: web.Request) -> web.Response:
    return web.json_response([f.info().to_dict() for f in _service(request).catalog.files()])


@routes.post("/v1/adapters/reload")
async def reload_adapters(request: web.Request) -> web.Response:
    catalog = await _service(request).reload_adapters()
    return web.json_response([f.info().to_dict() for f in catalog.files()])


def _set_paused(request: web.Request, paused: bool) -> web.Response:
    service = _service(request)
    if paused:
        service.queue.pause()
    else:
        service.queue.resume()
    log.info("queue %s", "paused" if paused else "resumed")
    return web.json_response(service.health().to_dict())


@routes.post("/v1/queue/pause")
async def pause_queue(request: web.Request) -> web.Response:
    return _set_paused(request, True)


@routes.post("/v1/queue/resume")
async def resume_queue(request: web.Request) -> web.Response:
    return _set_paused(request, False)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response(_service(request).health().to_dict())


@routes.get("/openapi.json")
async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(build_document(_service(request).settings, STATUS_FOR_CODE))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    service = _service(request)
    text = service.metrics.render(queue_depth=service.queue.depth(), paused=service.queue.paused,
                                  workers=service.workers())
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def exposure_refusal(host: str, token: str | None) -> str | None:
    """Why the service must not listen on `host` without a token, or None when it may."""
    if token or is_loopback(host):
        return None
    return (f"Refusing to listen on {host or 'every interface'} without LORALOOP_SERVICE_TOKEN: anyone who can "
            "reach it could use the GPU. Set LORALOOP_SERVICE_TOKEN (clients send it as a bearer token) "
            "or listen on 127.0.0.1")


def create_app(config: Config, secrets: Secrets) -> web.Application:
    """The service as an aiohttp app; the model loads in its startup hook (on the worker thread)."""
    app = web.Application(middlewares=[errors_and_auth], client_max_size=config.service.max_body_bytes)
    service = GenerationService(config, secrets)
    app[SERVICE_KEY] = service
    app.add_routes(routes)

    async def start(app: web.Application) -> None:
        await service.start()

    async def stop(app: web.Application) -> None:
        await service.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


@dataclass
class RunningService:
    """A started service on a real socket: `url` to reach it, `app` and `service` to look inside."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def service(self) -> GenerationService:
        return self.app[SERVICE_KEY]

    @property
    def adapters_dir(self) -> Any:
        return self.service.config.adapters_dir

    async def stop(self) -> None:
        await self.runner.cleanup()


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: an ephemeral port), taken before the model loads, so a port
    in use fails in a second rather than after a minute of loading. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def start_service(config: Config, secrets: Secrets, host: str = "127.0.0.1", port: int = 0) -> RunningService:
    """Start the service on host:port (0: an ephemeral port) and return once it serves.

    The port is taken first (OSError when it is in use), then the model loads, then it serves.
    """
    sock = listening_socket(host, port)
    app = create_app(config, secrets)
    runner = web.AppRunner(app, handle_signals=False)
    try:
        await runner.setup()  # runs the startup hook: the model loads here
    except BaseException:
        sock.close()
        raise
    site = web.SockSite(runner, sock)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    return RunningService(url=f"http://{bound_host}:{bound_port}", app=app, runner=runner)
