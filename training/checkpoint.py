"""Checkpoints: what a run saves to resume exactly, the checks before resuming, and Ctrl-C.

    loraloop train data/datasets/foxes --name foxes --resume data/runs/foxes-20260101-120000
    loraloop train data/datasets/foxes --name foxes --resume data/runs/foxes-.../checkpoints/step-000400

    resume = load_resume(path, RunIdentity(...), total_steps)    # in validate, before any weights load
    save(run_dir, progress, identity, unet=..., optimizer=..., ...)  # in the loop, every checkpoint_every
    progress = restore(resume.state, unet=..., optimizer=..., ...)  # after setup

A checkpoint is a directory checkpoints/step-N/ holding state.pt (the LoRA weights, the optimiser
and schedule, every random number generator, the run's progress and what the run was: settings,
dataset hash, base model, process count) and an adapter.safetensors that can be published as it
is. It is written to step-N.tmp and renamed, and only the newest `checkpoints_keep` are kept.

Resuming checks, before any weights load, that the checkpoint belongs to this run: the same
dataset, base model and process count, and the same settings except those that cannot change
what the run computes (RESUME_MAY_CHANGE); the settings that did change are said out loud.
Ctrl-C during an optimiser update waits for the update to finish, so a checkpoint never holds
half of one.

Floor: part of training/; imports torch, numpy, peft and training.adapter_files, nothing of the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict

from training.adapter_files import lora_state_dict, save_adapter

STATE_FILE = "state.pt"
# Settings that can change on --resume without changing what the run computes; anything else must match.
RESUME_MAY_CHANGE = {"checkpoint_every", "checkpoints_keep", "validation_prompts", "sample_every", "sample_steps",
                     "log_with", "validation_every", "early_stopping_patience",
                     "early_stopping_min_delta"}


# What state.pt holds, each entry's type: load_resume checks them all before trusting any.
STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int, "progress": dict, "lora": dict, "optimizer": dict, "lr_scheduler": dict,
    "generator": torch.Tensor, "torch_rng": torch.Tensor, "cuda_rng": (list, type(None)),
    "python_rng": tuple, "numpy_rng": list,
    "processes": int, "settings": dict, "dataset_hash": str, "base_model": str,
}


class ResumeError(Exception):
    """A --resume that cannot go ahead (no checkpoint, a foreign file, another run's); the message says why."""


class Interrupted(Exception):
    """Ctrl-C during training, after the checkpoint was saved; carries its path."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; checkpoint saved, resume with --resume {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class Progress:
    """Everything about the run so far that a checkpoint must carry besides weights and optimiser."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    stale_evaluations: int = 0
    kl_estimate: float = 0.0

    @property
    def final_train_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    @property
    def final_val_loss(self) -> float | None:
        return self.validation[-1]["val_loss"] if self.validation else None


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records about its run, and what a resumed run must match."""

    processes: int
    settings: dict[str, Any]  # [training] as a dict (dataclasses.asdict)
    dataset_hash: str
    base_model: str  # as configured ("tiny", a hub id, a path)


@dataclass(frozen=True)
class Resume:
    """A checkpoint this run may continue from, loaded and checked."""

    checkpoint: Path
    state: dict[str, Any]
    # Settings that differ from the checkpoint's (all of them allowed to), as "key: old -> new".
    notes: list[str]


# ---------------------------------------------------------------------------------------------
# random state and Ctrl-C


def random_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the loop draws from: ours, torch's (LoRA dropout) and CUDA's."""
    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_random_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


@dataclass(frozen=True)
class StepStart:
    """Where an optimiser step began: what Ctrl-C in the middle of the step rolls back to.

    So the checkpoint that Ctrl-C saves resumes exactly like the uninterrupted run.
    """

    random: dict[str, Any]
    kl_estimate: float

    @classmethod
    def now(cls, generator: torch.Generator, progress: Progress) -> StepStart:
        return cls(random_state(generator), progress.kl_estimate)

    def roll_back(self, generator: torch.Generator, progress: Progress) -> None:
        """Undo the random draws (and the KTO estimate update) of the step that was cut short."""
        set_random_state(generator, self.random)
        progress.kl_estimate = self.kl_estimate


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C during the optimiser update takes effect after it, so no checkpoint holds half an update."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; nothing to defer elsewhere
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: pressed.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# saving and restoring


def save(run_dir: Path, progress: Progress, identity: RunIdentity, *, unet: Any, lora_config: Any,
                    optimizer: torch.optim.Optimizer, lr_scheduler: Any, generator: torch.Generator,
                    provenance: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-N/ (state.pt and its adapter) atomically and drop all but the newest `keep`."""
    directory = run_dir / "checkpoints" / f"step-{progress.step:06d}"
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {
        "step": progress.step,
        "progress": dataclasses.asdict(progress),
        "lora": lora_state_dict(unet),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        **random_state(generator),
        "python_rng": random.getstate(),
        # As a list, not numpy's tuple with an array, so the file loads with weights_only.
        "numpy_rng": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        **dataclasses.asdict(identity),
    }
    torch.save(state, tmp / STATE_FILE)
    save_adapter(unet, lora_config, tmp, provenance)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    kept = sorted(p for p in directory.parent.glob("step-*") if not p.name.endswith(".tmp"))
    for old in kept[:-keep]:
        shutil.rmtree(old)
    return directory


def restore(state: dict[str, Any], *, unet: Any, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                       generator: torch.Generator) -> Progress:
    """Put a checkpoint's weights, optimiser, schedule and random state back; its progress."""
    set_peft_model_state_dict(unet, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_random_state(generator, state)
    random.setstate(state["python_rng"])
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return Progress(**state["progress"])


# ---------------------------------------------------------------------------------------------
# before resuming: find the checkpoint and check it belongs to this run


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory from --resume: the checkpoint itself or a run directory (its latest)."""
    if (path / STATE_FILE).is_file():
        return path
    checkpoints = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    checkpoints = [c for c in checkpoints if (c / STATE_FILE).is_file()]
    if not checkpoints:
        raise ResumeError(f"--resume {path}: no checkpoint there (expected {STATE_FILE} or checkpoints/step-N/)")
    return checkpoints[-1]


def state_problem(state: Any) -> str | None:
    """What is wrong with a loaded state.pt, in a few words, or None: a file that unpickles (a
    list, a dict from another program, a checkpoint cut down by hand) is not yet a checkpoint."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = [key for key in STATE_TYPES if key not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = [f"{key} is a {type(state[key]).__name__}" for key, kind in STATE_TYPES.items()
             if not isinstance(state[key], kind) or isinstance(state[key], bool)]
    if wrong:
        return "; ".join(wrong)
    unknown = set(state["progress"]) - {f.name for f in dataclasses.fields(Progress)}
    if unknown:
        return f"its progress has unknown fields {', '.join(sorted(unknown))}"
    return None


def load_resume(path: Path, run: RunIdentity, total_steps: int) -> Resume:
    """The checkpoint --resume PATH names, checked against this run; ResumeError says what differs."""
    checkpoint = find_checkpoint(path)
    # weights_only: a checkpoint is plain tensors and numbers, so a planted file cannot run code.
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ResumeError(f"--resume {checkpoint}: {STATE_FILE} is not a loraloop checkpoint ({exc})") from None
    problem = state_problem(state)
    if problem:
        raise ResumeError(f"--resume {checkpoint}: {STATE_FILE} is not a loraloop checkpoint ({problem}); "
                          "resume from another checkpoint or start a new run")
    saved, current = state["settings"], run.settings
    may_change = set(RESUME_MAY_CHANGE)
    if current["lr_scheduler"] == "constant":  # the only schedule that does not depend on the run's length
        may_change |= {"max_steps", "epochs"}
    blocking = sorted(k for k in current if k not in may_change and saved.get(k) != current[k])
    if blocking:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in blocking)
        raise ResumeError(f"--resume {checkpoint} was trained with different settings ({diffs}); "
                          "use the same settings or start a new run")
    if state["dataset_hash"] != run.dataset_hash:
        raise ResumeError(f"--resume {checkpoint}: the dataset changed since that checkpoint; start a new run")
    if state["processes"] != run.processes:
        # Batches are dealt out per process: another count would train on other batches.
        raise ResumeError(f"--resume {checkpoint} ran on {state['processes']} process(es), this on "
                          f"{run.processes}; resume with the same number of processes")
    if state["base_model"] != run.base_model:
        raise ResumeError(f"--resume {checkpoint} used base model {state['base_model']}, not {run.base_model}")
    notes = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in sorted(current) if saved.get(k) != current[k]]
    if state["step"] >= total_steps:
        raise ResumeError(f"--resume {checkpoint} is already at step {state['step']} of {total_steps}")
    return Resume(checkpoint=checkpoint, state=state, notes=notes)
