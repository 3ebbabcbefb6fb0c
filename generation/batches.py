"""Running one batch of jobs on a loaded model: the code both backends share.

    runner = BatchRunner(load_model(...), max_batch=4, preview_every=5)
    runner.run([Work(job.id, job.spec), ...], emit, cancelled)

`BatchRunner` owns the model's adapters (loaded once per file, combined with `set_adapters`, or the
`HotswapSlot` under `[service] lora_hotswap`) and runs a batch: the adapters, the pipeline calls with
one CPU `torch.Generator` per image, the step callback (progress, previews, cancel) and the PNGs.
It reports through `emit` with plain, picklable events naming jobs by id, so the local worker
thread (generation/worker.py) and a Ray worker actor (generation/ray_workers.py) host it the same
way: the thread hands the events to the event loop, the actor streams them back to the service.
`cancelled(job_id)` is asked at every step; a chunk whose jobs are all cancelled stops there.

Per-image seeds: image i of a batch starts from the same noise as it would alone;
`pipeline.make_batch_invariant` takes care of the arithmetic. A job asking for more images than
`max_batch` runs alone, in consecutive chunks.

Safety: with a checker (`[service] safety_checker`, generation/safety.py), each finished image gets
its verdict here, before its PNG is reported, on whichever backend runs the batch.

Floor: part of generation/; torch only inside the calls that run the pipeline.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from generation.adapters import AdapterFile, AdapterFileError
from generation.contract import ApiError, ErrorCode, ImageResult
from generation.hotswap import SlotMismatch
from generation.jobs import AppliedAdapter, JobSpec
from generation.pngmeta import ImageParameters, encode_png
from loraloop.hashes import checkpoint_short_hash

if TYPE_CHECKING:
    from generation.pipeline import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Work:
    """One job as a runner sees it: its id and what to run (picklable, unlike the loop's `Job`)."""

    job_id: str
    spec: JobSpec


@dataclass(frozen=True)
class Started:
    job_ids: tuple[str, ...]
    total_steps: int


@dataclass(frozen=True)
class Progress:
    job_ids: tuple[str, ...]
    step: int
    previews: dict[str, str]  # job id -> base64 PNG thumbnail, on preview steps
    step_seconds: float


@dataclass(frozen=True)
class Finished:
    job_id: str
    images: list[ImageResult]
    pngs: list[bytes]


@dataclass(frozen=True)
class Cancelled:
    job_id: str


@dataclass(frozen=True)
class Failed:
    job_id: str
    error: ApiError


@dataclass(frozen=True)
class BatchDone:
    """The last event of every batch: the adapters (sha256s) the runner holds now."""

    adapters: frozenset[str] = field(default_factory=frozenset)


Event = Started | Progress | Finished | Cancelled | Failed | BatchDone


class _ChunkCancelled(Exception):
    """Raised from the step callback once every job of a chunk is cancelled: stops the pipeline
    call there, before its remaining steps and its VAE decode (diffusers' `_interrupt` skips the
    steps but still decodes, which for a big image is minutes more)."""


class _ShownFailure(Exception):
    """A failure whose message may go to the client as it is: it names no path and quotes no
    exception (those go to the log, with the job id)."""


class BatchRunner:
    """A loaded model and its adapters; `run` runs one batch and reports it through `emit`."""

    def __init__(self, model: LoadedModel, *, max_batch: int, preview_every: int, safety: Any = None) -> None:
        self.model = model
        self.safety = safety  # a generation.safety.SafetyChecker, or None: no check, verdicts None
        self.max_batch = max_batch
        self.preview_every = preview_every
        self._loaded_adapters: dict[str, str] = {}  # sha256 -> peft adapter name
        self._wanted_shas: set[str] | None = None

    def forget_adapters_except(self, sha256s: set[str]) -> None:
        """After a reload: unload adapters no longer in the directory, at the next batch (thread-safe:
        one assignment, read once by the next batch)."""
        self._wanted_shas = set(sha256s)

    def held_adapters(self) -> frozenset[str]:
        """The sha256s of the adapter files this runner can apply without reading them again."""
        if self.model.slot is not None:
            return self.model.slot.held()
        return frozenset(self._loaded_adapters)

    def run(self, work: Sequence[Work], emit: Callable[[Event], None], cancelled: Callable[[str], bool]) -> None:
        """Run one batch of compatible jobs; every job gets exactly one of Finished, Cancelled or Failed,
        and BatchDone comes last. Never raises: a bug fails the batch's jobs, the next batch runs."""
        reported: set[str] = set()

        def settle(event: Finished | Cancelled | Failed) -> None:
            reported.add(event.job_id)
            emit(event)

        try:
            self._run(work, emit, settle, cancelled)
        except Exception:
            log.exception("jobs %s: the worker failed outside the pipeline", ",".join(w.job_id for w in work))
            for item in work:
                if item.job_id not in reported:
                    settle(Failed(item.job_id, ApiError(
                        ErrorCode.GENERATION_FAILED.value,
                        f"Generation failed; the service log has the details (job {item.job_id}).")))
        emit(BatchDone(self.held_adapters()))

    def _run(self, work: Sequence[Work], emit: Callable[[Event], None],
             settle: Callable[[Finished | Cancelled | Failed], None], cancelled: Callable[[str], bool]) -> None:
        live = []
        for item in work:
            if cancelled(item.job_id):
                settle(Cancelled(item.job_id))
            else:
                live.append(item)
        if not live:
            return
        spec = live[0].spec
        # (job, seed index) per image; a lone job over max_batch runs in chunks.
        items = [(job, i) for job in live for i in range(job.spec.count)]
        chunks = [items[start:start + self.max_batch] for start in range(0, len(items), self.max_batch)]
        per_chunk = spec.denoising_steps
        total = per_chunk * len(chunks)
        ids = tuple(job.job_id for job in live)
        log.info("jobs %s: running %d image(s) in %d call(s), %s", ",".join(ids), len(items), len(chunks), spec.mode)
        emit(Started(ids, total))
        try:
            self._prune_adapters()
            self._apply_adapters(spec.adapters)
            pipe = self.model.txt2img if spec.init_image is None else self.model.img2img
            images: dict[tuple[str, int], Any] = {}
            for number, chunk in enumerate(chunks):
                if all(cancelled(job.job_id) for job, _ in chunk):
                    continue  # nobody wants these images any more
                try:
                    outputs = self._call_pipeline(pipe, ids, chunk, number * per_chunk, emit, cancelled)
                except _ChunkCancelled:
                    continue
                for (job, index), image in zip(chunk, outputs, strict=True):
                    images[(job.job_id, index)] = image
        except Exception as exc:
            log.exception("jobs %s: generation failed", ",".join(ids))
            what = str(exc) if isinstance(exc, _ShownFailure) else "Generation failed"
            for job in live:
                settle(Failed(job.job_id, ApiError(ErrorCode.GENERATION_FAILED.value,
                                                   f"{what}; the service log has the details (job {job.job_id}).")))
            return
        for job in live:
            if cancelled(job.job_id):
                settle(Cancelled(job.job_id))
                continue
            results, pngs = [], []
            verdicts = self._verdicts([images[(job.job_id, index)] for index in range(job.spec.count)], job.job_id)
            for index in range(job.spec.count):
                png = encode_png(images[(job.job_id, index)], self._parameters(job.spec, index))
                pngs.append(png)
                results.append(ImageResult(index, job.spec.seeds[index], job.spec.width, job.spec.height,
                                           hashlib.sha256(png).hexdigest(), verdicts[index]))
            settle(Finished(job.job_id, results, pngs))

    def _verdicts(self, images: list[Any], job_id: str) -> list[bool | None]:
        """The safety check's verdict per image; None for each when the service runs none."""
        if self.safety is None:
            return [None] * len(images)
        flagged = self.safety.flags(images)
        if any(flagged):
            log.info("job %s: the safety check flagged %d of %d image(s)", job_id, sum(flagged), len(images))
        return list(flagged)

    def _call_pipeline(self, pipe: Any, ids: tuple[str, ...], chunk: list[tuple[Work, int]], done_before: int,
                       emit: Callable[[Event], None], cancelled: Callable[[str], bool]) -> list[Any]:
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
                    if job.job_id not in previews:  # one thumbnail per job: its first image in this chunk
                        previews[job.job_id] = _png_base64(latent_preview(latents[row]))
            emit(Progress(ids, done_before + step + 1, previews, seconds))
            if all(cancelled(job.job_id) for job, _ in chunk):
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

    def _parameters(self, spec: JobSpec, index: int) -> ImageParameters:
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
