"""Counters behind `GET /metrics`, rendered in the Prometheus text format.

Updated only on the event loop (the worker's reports arrive there), so no locking is needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from generation.contract import WorkerStatus

# Seconds per denoising step (one pipeline step for the whole batch).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
OUTCOMES = ("done", "failed", "cancelled")


class Metrics:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        self.images = 0
        self.refused = 0
        self.batches = 0  # worker runs: one or more compatible jobs sharing pipeline calls
        self.batched_jobs = 0
        self.step_buckets = [0] * len(STEP_BUCKETS)
        self.step_count = 0
        self.step_sum = 0.0
        self.worker_losses = 0  # Ray workers lost mid-batch
        self.requeued = 0  # jobs put back at the front after such a loss

    def observe_step(self, seconds: float) -> None:
        self.step_count += 1
        self.step_sum += seconds
        for i, bound in enumerate(STEP_BUCKETS):
            if seconds <= bound:
                self.step_buckets[i] += 1

    def render(self, queue_depth: int, paused: bool, workers: Sequence[WorkerStatus] = ()) -> str:
        lines = [
            "# HELP loraloop_queue_depth Jobs waiting to start.",
            "# TYPE loraloop_queue_depth gauge",
            f"loraloop_queue_depth {queue_depth}",
            "# HELP loraloop_queue_paused 1 while the queue is paused.",
            "# TYPE loraloop_queue_paused gauge",
            f"loraloop_queue_paused {int(paused)}",
            "# HELP loraloop_jobs_total Finished jobs by outcome.",
            "# TYPE loraloop_jobs_total counter",
            *(f'loraloop_jobs_total{{outcome="{o}"}} {self.outcomes[o]}' for o in OUTCOMES),
            "# HELP loraloop_jobs_refused_total Jobs refused because the queue or a requester was full.",
            "# TYPE loraloop_jobs_refused_total counter",
            f"loraloop_jobs_refused_total {self.refused}",
            "# HELP loraloop_images_total Images generated.",
            "# TYPE loraloop_images_total counter",
            f"loraloop_images_total {self.images}",
            "# HELP loraloop_batches_total Worker runs; jobs per run = batched_jobs / batches.",
            "# TYPE loraloop_batches_total counter",
            f"loraloop_batches_total {self.batches}",
            "# HELP loraloop_batched_jobs_total Jobs started by those runs.",
            "# TYPE loraloop_batched_jobs_total counter",
            f"loraloop_batched_jobs_total {self.batched_jobs}",
            "# HELP loraloop_step_seconds Time per denoising step of a batch.",
            "# TYPE loraloop_step_seconds histogram",
            *(f'loraloop_step_seconds_bucket{{le="{b}"}} {n}'
              for b, n in zip(STEP_BUCKETS, self.step_buckets, strict=True)),
            f'loraloop_step_seconds_bucket{{le="+Inf"}} {self.step_count}',
            f"loraloop_step_seconds_sum {self.step_sum:.6f}",
            f"loraloop_step_seconds_count {self.step_count}",
            "# HELP loraloop_worker_alive 1 while the worker can take work (0: a Ray worker restarting or gone).",
            "# TYPE loraloop_worker_alive gauge",
            *(f'loraloop_worker_alive{{worker="{w.name}"}} {int(w.alive)}' for w in workers),
            "# HELP loraloop_worker_busy 1 while the worker runs a batch.",
            "# TYPE loraloop_worker_busy gauge",
            *(f'loraloop_worker_busy{{worker="{w.name}"}} {int(w.busy)}' for w in workers),
            "# HELP loraloop_worker_adapters Adapter files the worker holds loaded.",
            "# TYPE loraloop_worker_adapters gauge",
            *(f'loraloop_worker_adapters{{worker="{w.name}"}} {len(w.adapters)}' for w in workers),
            "# HELP loraloop_worker_batches_total Batches the worker finished.",
            "# TYPE loraloop_worker_batches_total counter",
            *(f'loraloop_worker_batches_total{{worker="{w.name}"}} {w.batches}' for w in workers),
            "# HELP loraloop_worker_losses_total Workers lost mid-batch (the Ray backend).",
            "# TYPE loraloop_worker_losses_total counter",
            f"loraloop_worker_losses_total {self.worker_losses}",
            "# HELP loraloop_jobs_requeued_total Jobs put back at the front of the queue after losing their worker.",
            "# TYPE loraloop_jobs_requeued_total counter",
            f"loraloop_jobs_requeued_total {self.requeued}",
        ]
        return "\n".join(lines) + "\n"
