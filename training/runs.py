"""Training runs on disk, read back for people: what `loraloop train` left in each run directory.

A run directory (training/train.py's docstring lists it) holds report.json with the loss
history, samples/step-N.png, the adapter with its provenance, and, once published, the store's
training run id (training/publish.py's RUN_ID_FILE). Reading it needs neither torch nor the
model, so the web console lists runs without loading anything heavy.

    for run in list_runs(config.data_dir / "runs"):
        print(run.name, run.steps, run.final_train_loss)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
RUN_ID_FILE = "training_run_id"  # written by publish (training/publish.py) after a run's first publish
PROVENANCE_KEYS = ("base_model", "objective", "dataset_hash", "steps", "total_steps", "stopped_early",
                   "best_step", "seconds")


@dataclass(frozen=True)
class RunSummary:
    name: str
    finished: bool  # report.json written: the run ended and its adapter is saved
    provenance: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    train_points: list[tuple[int, float]] = field(default_factory=list)
    validation_points: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # file names under samples/, by step
    training_run_id: int | None = None  # the store's, once published


def read_run(folder: Path) -> RunSummary | None:
    """The run in `folder`, or None when it is no run directory (no adapter, no report)."""
    report_path = folder / REPORT_FILE
    if not report_path.is_file() and not (folder / "adapter.safetensors").is_file():
        return None
    report: dict[str, Any] = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            log.warning("%s: unreadable report", report_path, exc_info=True)
    run_id_path = folder / RUN_ID_FILE
    run_id = int(run_id_path.read_text()) if run_id_path.is_file() and run_id_path.read_text().strip().isdigit() \
        else None
    samples = sorted((p.name for p in (folder / "samples").glob("step-*.png")),
                     key=lambda name: int(name[5:-4]) if name[5:-4].isdigit() else 0)
    return RunSummary(
        name=folder.name, finished=bool(report), provenance={k: report[k] for k in PROVENANCE_KEYS if k in report},
        settings=dict(report.get("settings", {})), final_train_loss=report.get("final_train_loss"),
        final_val_loss=report.get("final_val_loss"),
        train_points=[(int(r["step"]), float(r["loss"])) for r in report.get("history", []) if "loss" in r],
        validation_points=[(int(r["step"]), float(r["val_loss"])) for r in report.get("validation", [])],
        samples=samples, training_run_id=run_id,
    )


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every run under `runs_dir`, newest first."""
    if not runs_dir.is_dir():
        return []
    folders = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    return [run for run in map(read_run, folders) if run is not None]
