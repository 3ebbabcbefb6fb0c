"""The admin's background jobs: curate, train, compare, publish and a loop pass, with progress.

Each job calls the same functions the command line calls (`training.curate.curate`,
`training.train.validate`/`train`, `training.compare.render_grid`, `training.publish.publish`
and `tell_service`, `training.loop.LoopRunner.step`); only the arguments come from a form. They
run one at a time on one worker thread, never on the event loop, with a store of their own
(the Store is per thread). Progress and the outcome reach the page through `listen`, the
same way a generation's progress does. Messages never name server paths: the data directory is
shown as DATA_DIR.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraloop.config import Config
from loraloop.store import Store

log = logging.getLogger(__name__)

SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KINDS = ("curate", "train", "compare", "publish", "loop")


class JobError(Exception):
    """A job that cannot run as asked; the message says what to change."""


@dataclass
class AdminJob:
    id: int
    kind: str
    title: str
    state: str = "queued"  # queued, running, done, failed
    step: int = 0
    total: int = 0
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    listeners: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)

    def event(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "step": self.step, "total": self.total,
                "message": self.message, "result": self.result, "final": self.state in ("done", "failed")}


def slug(value: str, what: str) -> str:
    value = value.strip()
    if not SLUG_RE.fullmatch(value):
        raise JobError(f"{what} {value!r} is not valid: letters, digits, '-', '_' or '.', at most 64 characters")
    return value


class AdminJobs:
    def __init__(self, config: Config, service_url: str, service_token: str | None) -> None:
        self.config = config
        self.service_url = service_url
        self.service_token = service_token
        self.jobs: dict[int, AdminJob] = {}
        self._ids = itertools.count(1)
        # One thread: training jobs hold the GPU and the GIL for long stretches; one at a time.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-job")
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- paths the forms name -------------------------------------------------------------

    @property
    def datasets_dir(self) -> Path:
        return self.config.data_dir / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.config.data_dir / "runs"

    @property
    def compare_dir(self) -> Path:
        return self.config.data_dir / "compare"

    def datasets(self) -> list[str]:
        return sorted(p.name for p in self.datasets_dir.iterdir() if p.is_dir()) if self.datasets_dir.is_dir() else []

    def runs(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        found = [p for p in self.runs_dir.iterdir() if (p / "adapter.safetensors").is_file()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def hide_paths(self, text: str) -> str:
        return text.replace(str(self.config.data_dir), "DATA_DIR")

    # --- starting and following -------------------------------------------------------------

    def submit(self, kind: str, form: dict[str, str]) -> AdminJob:
        """Check the form, then queue the job; raises JobError for a form that cannot run."""
        work, title = getattr(self, f"_plan_{kind}")(form)
        job = AdminJob(id=next(self._ids), kind=kind, title=title)
        self.jobs[job.id] = job
        self._loop = asyncio.get_running_loop()
        self._loop.run_in_executor(self._pool, self._run, job, work)
        log.info("admin job %d: %s queued", job.id, title)
        return job

    async def listen(self, job_id: int) -> AsyncIterator[dict[str, Any]]:
        job = self.jobs[job_id]
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        job.listeners.add(queue)
        try:
            event = job.event()
            while True:
                yield event
                if event["final"]:
                    return
                event = await queue.get()
        finally:
            job.listeners.discard(queue)

    def _update(self, job: AdminJob, **changes: Any) -> None:
        """From the worker thread: change the job and tell its listeners on the loop."""
        def apply() -> None:
            for key, value in changes.items():
                setattr(job, key, value)
            event = job.event()
            for queue in job.listeners:
                queue.put_nowait(event)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(apply)

    def _run(self, job: AdminJob, work: Callable[[AdminJob], dict[str, Any]]) -> None:
        self._update(job, state="running", message="running")
        try:
            result = work(job)
        except Exception as exc:
            expected = type(exc).__name__.endswith("Error")
            log.log(logging.WARNING if expected else logging.ERROR, "admin job %d (%s) failed", job.id, job.title,
                    exc_info=not expected)
            message = self.hide_paths(str(exc)) if expected else f"failed unexpectedly; admin job {job.id} in the log"
            self._update(job, state="failed", message=message)
            return
        log.info("admin job %d: %s done", job.id, job.title)
        self._update(job, state="done", message=result.pop("message", "done"), result=result)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the jobs: each checks its form here, on the loop, and returns the work for the thread ---

    def _plan_curate(self, form: dict[str, str]) -> tuple[Callable[[AdminJob], dict[str, Any]], str]:
        from training.curate import CurationSettings, curate

        name = slug(form.get("dataset", ""), "dataset name")
        fmt = form.get("format", "sft")
        if fmt not in ("sft", "kto", "dpo"):
            raise JobError("format must be sft, kto or dpo")
        adapter = form.get("adapter", "").strip() or None
        version = None
        if adapter and "@" in adapter:
            adapter, _, pinned = adapter.partition("@")
            if not pinned.isdigit():
                raise JobError("write the adapter as NAME or NAME@VERSION")
            version = int(pinned)
        overrides: dict[str, Any] = {"format": fmt, "adapter": adapter, "adapter_version": version}
        if form.get("min_raters"):
            overrides["min_raters"] = _number(form["min_raters"], int, "min raters")
        if form.get("min_score") not in (None, ""):
            overrides["min_score"] = _number(form["min_score"], float, "min score")
        settings = CurationSettings.from_config(self.config.curation, **overrides)
        out = self.datasets_dir / name

        def work(job: AdminJob) -> dict[str, Any]:
            with Store.from_config(self.config) as store:
                report = curate(store, out, settings)
            return {"message": f"{report.summary()}; dataset hash {report.dataset_hash[:12]}", "dataset": name}

        return work, f"curate {name} ({fmt})"

    def _plan_train(self, form: dict[str, str]) -> tuple[Callable[[AdminJob], dict[str, Any]], str]:
        import dataclasses

        from training.train import Job, train, validate

        dataset = form.get("dataset", "")
        if dataset not in self.datasets():
            raise JobError("pick a curated dataset")
        name = slug(form.get("name", ""), "adapter name")
        changes: dict[str, Any] = {}
        if form.get("steps"):
            changes["max_steps"] = _number(form["steps"], int, "steps")
        try:
            settings = dataclasses.replace(self.config.training, **changes)
        except ValueError as exc:
            raise JobError(f"[training] {exc}") from None
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        output = self.runs_dir / f"{name}-{stamp}"
        train_job = Job(dataset=self.datasets_dir / dataset, name=name, model=self.config.service.model,
                        settings=settings, data_dir=self.config.data_dir, output=output)

        def work(job: AdminJob) -> dict[str, Any]:
            plan = validate(train_job)
            self._update(job, total=plan.total_steps, message=f"training on {len(plan.train)} examples")
            report = train(plan, on_step=lambda progress: self._update(
                job, step=progress.step, message=f"step {progress.step} of {plan.total_steps}"))
            loss = report.get("final_train_loss") if report else None
            return {"message": f"trained {name}: final train loss {loss:.4g}" if isinstance(loss, float)
                    else f"trained {name}", "run": output.name, "name": name}

        return work, f"train {name} on {dataset}"

    def _plan_compare(self, form: dict[str, str]) -> tuple[Callable[[AdminJob], dict[str, Any]], str]:
        from training.compare import CompareError, render_grid, resolve_columns

        prompts = [line.strip() for line in form.get("prompts", "").splitlines() if line.strip()]
        if not prompts or len(prompts) > 8:
            raise JobError("give one to eight prompts, one a line")
        spec = form.get("adapters", "").strip()
        if not spec:
            raise JobError("name the adapters to compare, e.g. base,fox@1,fox@2")
        if "/" in spec or "\\" in spec:
            raise JobError("compare published adapters by name (base, NAME, NAME@N), not by path")
        try:
            columns = resolve_columns(spec, self.config.adapters_dir)
        except CompareError as exc:
            raise JobError(self.hide_paths(str(exc))) from None
        steps = _number(form.get("steps") or "10", int, "steps")
        seed = _number(form.get("seed") or "0", int, "seed")

        def work(job: AdminJob) -> dict[str, Any]:
            from generation.pipeline import load_model

            loaded = load_model(self.config.service.model, self.config.service.device, self.config.data_dir)
            grid = render_grid(loaded.txt2img, columns, prompts, seed, steps, loaded.native_size,
                               self.config.service.default_guidance)
            self.compare_dir.mkdir(parents=True, exist_ok=True)
            file = f"compare-{job.id}-{int(time.time())}.png"
            grid.save(self.compare_dir / file)
            return {"message": f"{len(prompts)} prompt(s) × {len(columns)} adapter(s)", "grid": file}

        return work, f"compare {spec}"

    def _plan_publish(self, form: dict[str, str]) -> tuple[Callable[[AdminJob], dict[str, Any]], str]:
        from training.publish import publish, tell_service

        run = form.get("run", "")
        if run not in self.runs():
            raise JobError("pick a finished training run")
        name = slug(form.get("name", ""), "adapter name")

        def work(job: AdminJob) -> dict[str, Any]:
            with Store.from_config(self.config) as store:
                published = publish(self.runs_dir / run, name, self.config.adapters_dir, store,
                                    self.config.a1111_adapters_dir)
            told = asyncio.run(tell_service(self.service_url, self.service_token, published))
            return {"message": f"published {published.name}@{published.version}: {told}",
                    "adapter": published.name, "version": published.version}

        return work, f"publish {run} as {name}"

    def _plan_loop(self, form: dict[str, str]) -> tuple[Callable[[AdminJob], dict[str, Any]], str]:
        from training.loop import LoopRunner

        runner = LoopRunner(self.config, self.service_url, self.service_token)

        def work(job: AdminJob) -> dict[str, Any]:
            done = runner.step()
            lines = [f"{e.adapter} v{e.candidate_version}: {v.explain()}" for e, v in done.decisions]
            lines += [f"{r.adapter}: " + (f"round failed: {r.error}" if r.error else
                      f"candidate v{r.candidate_version} on trial against v{r.control_version}") for r in done.rounds]
            return {"message": "; ".join(lines) or f"nothing to do ({done.raters} raters weighed)"}

        return work, "one loop pass"


def _expected_errors() -> tuple[type[Exception], ...]:
    """The failures whose message is written for a person (what to change), shown on the job's page;
    anything else is a bug, shown as a reference to the log."""
    from generation.client import ServiceError
    from generation.pipeline import ModelLoadError
    from loraloop.store import StoreError
    from training.checkpoint import Interrupted
    from training.compare import CompareError
    from training.dataset import DatasetError
    from training.publish import PublishError
    from training.train import TrainError

    return (JobError, DatasetError, TrainError, Interrupted, CompareError, PublishError, StoreError, ServiceError,
            ModelLoadError)


def _number(text: str, kind: type, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise JobError(f"{what} must be a number") from None
    if value < 0:
        raise JobError(f"{what} must not be negative")
    return value
