"""The one thread that touches torch: it loads the model, takes batches from the fair queue and
runs them, and reports every change back to the event loop with `call_soon_threadsafe`.

Nothing else in the service imports torch, so an HTTP handler can never block on the GPU.

Per-image seeds: each image gets its own CPU `torch.Generator`, so image i of a batch starts from
the same noise as it would alone; `pipeline.make_batch_invariant` takes care of the arithmetic.
A job asking for more images than `max_batch` runs alone, in consecutive chunks.

Safety: with `[service] safety_checker`, each finished image gets the checker's verdict
(generation/safety.py) on this thread, before its PNG is reported.

Adapters: loaded once per file and combined with `set_adapters`; with `[service] lora_hotswap`, the
model's `HotswapSlot` (generation/hotswap.py) takes the job's one adapter instead. At start, after
loading, `[service] warmup_sizes` run once (pipeline.warm_up) before the service reports ready.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from generation.adapters import AdapterFile, AdapterFileError
from generation.contract import ApiError, ErrorCode, ImageResult
from generation.hotswap import SlotMismatch
from generation.jobs import AppliedAdapter, Job
from generation.pngmeta import ImageParameters, encode_png
from generation.queue import FairQueue
from loraloop.hashes import checkpoint_short_hash

if TYPE_CHECKING:
    from loraloop.config import ServiceConfig

log = logging.getLogger(__name__)


class _ChunkCancelled(Exception):
    """Raised from the step callback once every job of a chunk is cancelled: stops the pipeline
    call there, before its remaining steps and its VAE decode (diffusers' `_interrupt` skips the
    steps but still decodes, which for a big image is minutes more)."""


class _ShownFailure(Exception):
    """A failure whose message may go to the client as it is: it names no path and quotes no
    exception (those go to the log, with the job id)."""


class JobSink(Protocol):
    """The loop-side receiver of the worker's reports (all called on the event loop)."""

    def on_started(self, jobs: Sequence[Job], total_steps: int) -> None: ...
    def on_progress(self, jobs: Sequence[Job], step: int, previews: dict[str, str], step_seconds: float) -> None: ...
    def on_finished(self, job: Job, images: list[ImageResult], pngs: list[bytes]) -> None: ...
    def on_cancelled(self, job: Job) -> None: ...
    def on_failed(self, job: Job, error: ApiError) -> None: ...


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
        self.model: Any = None
        self.safety: Any = None  # a generation.safety.SafetyChecker under [service] safety_checker
        self.device = "loading"
        self._loaded_adapters: dict[str, str] = {}  # sha256 -> peft adapter name
        self._wanted_shas: set[str] | None = None
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._ready: asyncio.Future = loop.create_future()

    async def start(self) -> None:
        """Start the thread and wait until the model is loaded (raises what loading raised)."""
        self._thread.start()
        await self._ready

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to exit after the current batch, and wait for it (blocking)."""
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def forget_adapters_except(self, sha256s: set[str]) -> None:
        """After a reload: unload adapters no longer in the directory, at the next batch."""
        self._wanted_shas = set(sha256s)

    # -- on the worker thread --------------------------------------------------------------

    def _report(self, callback: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        from generation.pipeline import compiled_graph_count, load_model, warm_up

        try:
            self.model = load_model(self.model_name, self.requested_device, self.data_dir, self.settings)
            self.device = self.model.device
            if self.settings is not None and self.settings.safety_checker:
                self.safety = _load_safety(self.settings, self.device, self.data_dir)
            if self.settings is not None and self.settings.warmup_sizes:
                self.warmed = warm_up(self.model, self.settings)
            if self.model.compiled:
                if not self.warmed:
                    log.warning("compile is on with no [service] warmup_sizes: each job of a new shape "
                                "waits for the UNet to compile")
                log.info("torch.compile: %d graph(s) built at start", compiled_graph_count())
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it at start
            self._report(_settle, self._ready, exc)
            return
        self._report(_settle, self._ready, None)
        while True:
            batch = self.queue.take_batch(self.max_batch, self.batch_wait)
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception:
                # A bug in one batch must not end the thread: its jobs fail, the next batch runs.
                log.exception("jobs %s: the worker failed outside the pipeline", ",".join(job.id for job in batch))
                for job in batch:
                    self._report(self.sink.on_failed, job, ApiError(
                        ErrorCode.GENERATION_FAILED.value,
                        f"Generation failed; the service log has the details (job {job.id})."))
            finally:
                for job in batch:
                    self.queue.done(job)

    def _run_batch(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if job.cancel_requested.is_set():
                self._report(self.sink.on_cancelled, job)
            else:
                live.append(job)
        if not live:
            return
        spec = live[0].spec
        # (job, seed index) per image; a lone job over max_batch runs in chunks.
        items = [(job, i) for job in live for i in range(job.count)]
        chunks = [items[start:start + self.max_batch] for start in range(0, len(items), self.max_batch)]
        per_chunk = spec.denoising_steps
        total = per_chunk * len(chunks)
        ids = ",".join(job.id for job in live)
        log.info("jobs %s: running %d image(s) in %d call(s), %s", ids, len(items), len(chunks), spec.mode)
        self._report(self.sink.on_started, live, total)
        try:
            self._prune_adapters()
            self._apply_adapters(spec.adapters)
            pipe = self.model.txt2img if spec.init_image is None else self.model.img2img
            images: dict[tuple[str, int], Any] = {}
            for number, chunk in enumerate(chunks):
                if all(job.cancel_requested.is_set() for job, _ in chunk):
                    continue  # nobody wants these images any more
                try:
                    outputs = self._call_pipeline(pipe, live, chunk, number * per_chunk, total)
                except _ChunkCancelled:
                    continue
                for (job, index), image in zip(chunk, outputs, strict=True):
                    images[(job.id, index)] = image
        except Exception as exc:
            log.exception("jobs %s: generation failed", ids)
            what = str(exc) if isinstance(exc, _ShownFailure) else "Generation failed"
            for job in live:
                error = ApiError(ErrorCode.GENERATION_FAILED.value,
                                 f"{what}; the service log has the details (job {job.id}).")
                self._report(self.sink.on_failed, job, error)
            return
        for job in live:
            if job.cancel_requested.is_set():
                self._report(self.sink.on_cancelled, job)
                continue
            results, pngs = [], []
            verdicts = self._verdicts([images[(job.id, index)] for index in range(job.count)], job)
            for index in range(job.count):
                png = encode_png(images[(job.id, index)], self._parameters(job, index))
                pngs.append(png)
                results.append(ImageResult(index, job.spec.seeds[index], job.spec.width, job.spec.height,
                                           hashlib.sha256(png).hexdigest(), verdicts[index]))
            self._report(self.sink.on_finished, job, results, pngs)

    def _verdicts(self, images: list[Any], job: Job) -> list[bool | None]:
        """The safety check's verdict per image; None for each when the service runs none."""
        if self.safety is None:
            return [None] * len(images)
        flagged = self.safety.flags(images)
        if any(flagged):
            log.info("job %s: the safety check flagged %d of %d image(s)", job.id, sum(flagged), len(images))
        return list(flagged)

    def _call_pipeline(self, pipe: Any, live: list[Job], chunk: list[tuple[Job, int]], done_before: int,
                       total: int) -> list[Any]:
        import torch

        from generation.pipeline import latent_preview, make_scheduler

        spec = chunk[0][0].spec
        pipe.scheduler = make_scheduler(spec.scheduler, self.model.txt2img.scheduler.config)
        last = time.perf_counter()

        def on_step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal last
            now = time.perf_counter()
            seconds, last = now - last, now
            previews: dict[str, str] = {}
            if self.preview_every and (step + 1) % self.preview_every == 0:
                latents = kwargs["latents"]  # (B, 4, H/8, W/8); B = images in this chunk
                for row, (job, _) in enumerate(chunk):
                    if job.id not in previews:  # one thumbnail per job: its first image in this chunk
                        previews[job.id] = _png_base64(latent_preview(latents[row]))
            self._report(self.sink.on_progress, live, done_before + step + 1, previews, seconds)
            if all(job.cancel_requested.is_set() for job, _ in chunk):
                raise _ChunkCancelled
            return kwargs

        arguments: dict[str, Any] = dict(
            prompt=[job.spec.prompt for job, _ in chunk],
            negative_prompt=[job.spec.negative_prompt for job, _ in chunk],
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            generator=[torch.Generator("cpu").manual_seed(job.spec.seeds[i]) for job, i in chunk],
            callback_on_step_end=on_step_end,
            output_type="pil",
        )
        if spec.init_image is None:
            arguments.update(width=spec.width, height=spec.height)
        else:
            arguments.update(image=[job.spec.init_image for job, _ in chunk], strength=spec.strength)
        with torch.inference_mode():
            return list(pipe(**arguments).images)

    def _apply_adapters(self, adapters: tuple[AppliedAdapter, ...]) -> None:
        if self.model.slot is not None:  # [service] lora_hotswap: one slot, swapped in place
            try:
                self.model.slot.apply(adapters)
            except SlotMismatch as exc:  # its messages name adapters and reasons, never paths
                raise _ShownFailure(str(exc)) from exc
            return
        pipe = self.model.txt2img
        weights: dict[str, float] = {}  # peft name -> weight; one file under two names adds up
        for adapter in adapters:
            sha = adapter.file.sha256
            if sha not in self._loaded_adapters:
                name = f"lora_{sha[:16]}"
                try:
                    _load_exactly(pipe, adapter.file, name)
                except _ShownFailure:
                    raise
                except Exception as exc:
                    if name in _adapter_names(pipe):
                        pipe.delete_adapters(name)
                    raise _ShownFailure(f"Adapter {adapter.file.label} does not fit this model") from exc
                self._loaded_adapters[sha] = name
                log.info("adapter %s loaded (%s)", adapter.file.label, sha[:12])
            name = self._loaded_adapters[sha]
            weights[name] = weights.get(name, 0.0) + adapter.weight
        if weights:
            pipe.enable_lora()
            pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        elif self._loaded_adapters:
            pipe.disable_lora()

    def _prune_adapters(self) -> None:
        wanted, self._wanted_shas = self._wanted_shas, None
        if wanted is None:
            return
        if self.model.slot is not None:
            self.model.slot.forget_except(wanted)
            return
        stale = [sha for sha in self._loaded_adapters if sha not in wanted]
        if stale:
            self.model.txt2img.delete_adapters([self._loaded_adapters.pop(sha) for sha in stale])
            log.info("unloaded %d adapter(s) no longer in the adapters directory", len(stale))

    def _parameters(self, job: Job, index: int) -> ImageParameters:
        spec = job.spec
        return ImageParameters(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            steps=spec.steps,
            guidance=spec.guidance,
            seed=spec.seeds[index],
            width=spec.width,
            height=spec.height,
            scheduler=spec.scheduler,
            model=self.model.a1111_name,
            model_hash=checkpoint_short_hash(self.model.checkpoint_sha256) if self.model.checkpoint_sha256 else "",
            adapters=tuple((a.requested_name, a.weight, a.file.a1111_hash) for a in spec.adapters),
            strength=spec.strength,
        )


def _load_safety(settings: ServiceConfig, device: str, data_dir: Path) -> Any:
    from generation.safety import SafetyChecker
    from loraloop.tiny import loadable_model

    checker = SafetyChecker.load(loadable_model(settings.safety_checker, data_dir, "safety"), device,
                                 settings.safety_adjustment)
    log.info("safety checker %s loaded (adjustment %g)", settings.safety_checker, settings.safety_adjustment)
    return checker


def _load_exactly(pipe: Any, file: AdapterFile, name: str) -> None:
    """Load the very bytes the scan hashed (`AdapterFile.verified_copy`), never a file swapped
    in the adapters directory since the scan."""
    try:
        with file.verified_copy() as path:
            pipe.load_lora_weights(str(path), adapter_name=name)
    except AdapterFileError as exc:
        log.error("adapter %s at %s: %s", file.label, file.path, exc)
        raise _ShownFailure(f"Adapter {file.label} changed on disk since the adapters were last "
                            "reloaded; reload them and try again") from exc


def _adapter_names(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
