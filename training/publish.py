"""Publishing trained adapters to the service: `loraloop adapters publish RUN --name NAME` and `adapters list`.

    loraloop adapters publish data/runs/foxes-20260101-120000 --name foxes    # -> ADAPTERS_DIR/foxes/vN+1
    loraloop adapters publish data/runs/foxes-20260101-120000 --name foxes --service-url http://gpu-box:8765
    loraloop adapters list

Publishing copies the run's adapter to ADAPTERS_DIR/NAME/v{N+1}.safetensors, records the
training run and the version in the store, then asks the running service to rescan its
adapters. The copy is written to a hidden temp file and linked into place, so the service
never sees a half-written file and two publishes can never take the same version; if the
store refuses the record, the file is removed again. The commands themselves are in training/cli.py.

The run's kohya copy goes to the A1111 folder beside it (`Config.a1111_adapters_dir`), named as
the service names the version, so a prompt from one of our PNGs works there as it is:

    ADAPTERS_DIR/fox/v2.safetensors          the service's (diffusers format)
    ADAPTERS_DIR-a1111/fox@2.safetensors     <lora:fox@2:0.8> in A1111, Forge, ComfyUI
    ADAPTERS_DIR-a1111/fox.safetensors       <lora:fox:0.8>: the default version, replaced at each publish
                                             and, under `loraloop loop`, when a candidate is promoted

Each file's `ss_output_name` is its own stem (A1111 lists a LoRA under it, and two files with one
alias would make `fox` ambiguous); only the header differs from the run's copy, so the
`sshs_model_hash` A1111 and Civitai go by is the same in all three.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generation.adapters import VERSION_FILE_RE, AdapterDirectory
from generation.client import UNAVAILABLE, ServiceClient, ServiceError
from generation.contract import ADAPTER_NAME_RE
from loraloop.hashes import lora_hash
from loraloop.store import AdapterVersion, Store, StoreError
from training.adapter_files import ADAPTER_FILE, kohya_copy_of, read_provenance, write_a1111_copy

# Written into the run directory after its first publish, so publishing it again reuses the run's record.
from training.runs import RUN_ID_FILE

log = logging.getLogger(__name__)



class PublishError(Exception):
    """A publish that cannot go ahead; the message says what to do."""


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    path: Path
    sha256: str
    training_run_id: int
    base_model: str = ""
    # The A1111 copies written (pinned version, then newest); empty when the run has no kohya copy.
    a1111_files: tuple[Path, ...] = ()


def find_adapter(run: Path) -> Path:
    """The adapter file of a run directory, a checkpoint directory, or an adapter file itself."""
    if run.is_file():
        if run.suffix != ".safetensors":
            raise PublishError(f"{run} is not a .safetensors adapter")
        return run
    if not run.is_dir():
        raise PublishError(f"{run} does not exist; give a run directory from `loraloop train`")
    adapter = run / ADAPTER_FILE
    if not adapter.is_file():
        raise PublishError(f"{run} has no {ADAPTER_FILE}: the run did not finish. Resume it with "
                           f"`loraloop train ... --resume {run}`, or publish one of its checkpoints/step-N")
    return adapter


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions_on_disk(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for f in folder.iterdir() if (m := VERSION_FILE_RE.match(f.name))]


def _run_record(adapter: Path) -> tuple[dict[str, Any], str, str, dict[str, Any]]:
    """(config, dataset path, dataset hash, metrics) for the store, from the run's report or the adapter itself."""
    report_path = adapter.parent / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        metrics = {k: report.get(k) for k in ("steps", "final_train_loss", "final_val_loss", "base_val_loss",
                                               "best_val_loss", "best_step", "adapter_step", "seconds")}
        config = {"base_model": report["base_model"], "objective": report["objective"], **report["settings"]}
        return config, report["dataset"], report["dataset_hash"], metrics
    provenance = read_provenance(adapter)
    if not provenance.get("dataset_hash"):
        raise PublishError(f"{adapter} has no loraloop provenance (no report.json beside it, no metadata); "
                           "publish adapters trained with `loraloop train`")
    metrics = {k: provenance.get(k) for k in ("steps", "final_train_loss", "final_val_loss", "best_val_loss")}
    config = {k: provenance.get(k) for k in ("base_model", "objective", "rank", "alpha", "targets", "resolution")}
    return config, str(provenance.get("dataset", "")), provenance["dataset_hash"], metrics


def publish(run: Path, name: str, adapters_dir: Path, store: Store, a1111_dir: Path | None = None,
            experiment: Mapping[str, Any] | None = None) -> Published:
    """Copy a run's adapter in as NAME's next version and record it, and its kohya copy into
    `a1111_dir` when given; raises PublishError.

    With `experiment` (see `Store.record_adapter`) the version is a candidate on trial, not the
    new default: the loop (training/loop.py) publishes this way, and the A1111 folder gets only
    NAME@N, not the NAME that means the default."""
    if not ADAPTER_NAME_RE.match(name):
        raise PublishError(f"adapter name {name!r} is not valid: use letters, digits, '-', '_' or '.', "
                           "starting with a letter or digit, at most 64 characters")
    adapter = find_adapter(Path(run))
    config, dataset_path, dataset_hash, metrics = _run_record(adapter)
    sha256 = _sha256(adapter)
    folder = adapters_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".publish-{os.getpid()}.safetensors.tmp"
    with adapter.open("rb") as source, tmp.open("wb") as target:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            target.write(chunk)
        target.flush()
        os.fsync(target.fileno())
    if _sha256(tmp) != sha256:
        tmp.unlink()
        raise PublishError(f"{adapter} changed while it was being copied; publish again")
    try:
        run_id_path = adapter.parent / RUN_ID_FILE
        run_id = None
        if run_id_path.is_file():
            run_id = int(run_id_path.read_text())
            try:
                store.training_run(run_id)
            except StoreError:
                run_id = None
        if run_id is None:
            run_id = store.record_training_run(config=config, dataset_path=dataset_path, dataset_hash=dataset_hash,
                                               status="done", metrics=metrics)
            run_id_path.write_text(str(run_id))
        while True:
            recorded = [a.version for a in store.adapters(name)]
            version = max([0, *recorded, *_versions_on_disk(folder)]) + 1
            final = folder / f"v{version}.safetensors"
            try:
                # A hard link never replaces an existing file: a concurrent publish that took this
                # version makes us try the next one instead of overwriting it.
                os.link(tmp, final)
            except FileExistsError:
                continue
            try:
                store.record_adapter(name=name, version=version, file_sha256=sha256, training_run_id=run_id,
                                     experiment=experiment)
            except StoreError as exc:
                final.unlink()
                raise PublishError(
                    f"could not record {name} v{version} in the store ({exc}); nothing was published") from None
            break
    finally:
        tmp.unlink(missing_ok=True)
    log.info("published %s as %s v%d (%s)", adapter, name, version, sha256[:12])
    a1111_files: tuple[Path, ...] = ()
    kohya = kohya_copy_of(adapter)
    if a1111_dir is not None and kohya.is_file():
        labels = (f"{name}@{version}",) if experiment else (f"{name}@{version}", name)
        a1111_files = tuple(write_a1111_copy(kohya, a1111_dir / f"{label}.safetensors", label) for label in labels)
    return Published(name=name, version=version, path=final, sha256=sha256, training_run_id=run_id,
                     base_model=str(config.get("base_model") or ""), a1111_files=a1111_files)


def refresh_a1111_alias(store: Store, name: str, a1111_dir: Path) -> Path | None:
    """Make A1111's NAME the copy of NAME's default version, when it is not already.

    A candidate is published as NAME@N only; once the gate (or `/admin promote`) makes it the
    default, `<lora:NAME:...>` should mean it there too. Returns the alias written, or None when
    it was already right or NAME@N has no A1111 copy (published without one)."""
    version = store.default_version(name)
    source = a1111_dir / f"{name}@{version}.safetensors"
    if version is None or not source.is_file():
        return None
    alias = a1111_dir / f"{name}.safetensors"
    if alias.is_file():
        with alias.open("rb") as current, source.open("rb") as wanted:
            if lora_hash(current) == lora_hash(wanted):
                return None
    log.info("A1111 folder: %s now means %s@%d", name, name, version)
    return write_a1111_copy(source, alias, name)


def remove_adapter(name: str, adapters_dir: Path) -> bool:
    """Delete NAME's folder of versions from the adapters directory (a personal style whose owner
    deleted it or opted out); False if there was none. The store keeps its history."""
    if not ADAPTER_NAME_RE.match(name):
        raise PublishError(f"adapter name {name!r} is not valid")
    folder = adapters_dir / name
    if not folder.is_dir() or folder.is_symlink():
        return False
    shutil.rmtree(folder)
    log.info("removed adapter %s from %s", name, adapters_dir)
    return True


async def tell_service(base_url: str, token: str | None, published: Published) -> str:
    """Ask the running service to rescan its adapters; a sentence saying what happened.

    Raises ServiceError when the service answers with an error (a wrong token, say); a service
    that is not running is not an error: it scans the directory when it starts.
    """
    label = f"{published.name}@{published.version}"
    try:
        async with ServiceClient(base_url, token=token) as client:
            served = await client.reload_adapters()
    except ServiceError as exc:
        if exc.code == UNAVAILABLE:
            return f"the service at {base_url} is not running; it will load {label} when it starts"
        raise
    if any(a.name == published.name and a.version == published.version for a in served):
        return f"the service at {base_url} now serves {label}"
    return f"the service at {base_url} reloaded but does not list {label}: is it using another adapters directory?"


@dataclass(frozen=True)
class ListedAdapter:
    label: str
    sha256: str
    latest: bool
    description: str
    base_model: str
    published_at: str | None
    training_run_id: int | None
    metrics: dict[str, Any]


def list_adapters(adapters_dir: Path, store: Store | None) -> list[ListedAdapter]:
    """Every usable adapter in the directory, with its store record (when there is one)."""
    # Keyed as the directory names versions: an unversioned file (version None) has no record.
    records: dict[tuple[str, int | None], AdapterVersion] = (
        {(a.name, a.version): a for a in store.adapters()} if store is not None else {})
    out = []
    for file in AdapterDirectory(adapters_dir).scan().files():
        record = records.get((file.name, file.version))
        metrics: dict[str, Any] = {}
        if record is not None and record.training_run_id is not None and store is not None:
            metrics = store.training_run(record.training_run_id).metrics
        out.append(ListedAdapter(
            label=file.label, sha256=file.sha256, latest=file.latest, description=file.description,
            base_model=file.base_model, published_at=record.created_at if record else None,
            training_run_id=record.training_run_id if record else None, metrics=metrics,
        ))
    return out
