"""Publishing trained adapters to the service: `loraloop adapters publish RUN --name NAME` and `adapters list`.

    loraloop adapters publish data/runs/foxes-20260101-120000 --name foxes    # -> ADAPTERS_DIR/foxes/vN+1
    loraloop adapters publish data/runs/foxes-20260101-120000 --name foxes --service-url http://gpu-box:8765
    loraloop adapters list

Publishing copies the run's adapter to ADAPTERS_DIR/NAME/v{N+1}.safetensors, records the
training run and the version in the store, then asks the running service to rescan its
adapters. The copy is written to a hidden temp file and linked into place, so the service
never sees a half-written file and two publishes can never take the same version; if the
store refuses the record, the file is removed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generation.adapters import VERSION_FILE_RE, AdapterDirectory
from generation.contract import ADAPTER_NAME_RE
from loraloop.store import Store, StoreError
from training.train import ADAPTER_FILE, read_provenance

log = logging.getLogger(__name__)

# Written into the run directory after its first publish, so publishing it again reuses the run's record.
RUN_ID_FILE = "training_run_id"


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


def publish(run: Path, name: str, adapters_dir: Path, store: Store) -> Published:
    """Copy a run's adapter in as NAME's next version and record it; raises PublishError."""
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
                store.record_adapter(name=name, version=version, file_sha256=sha256, training_run_id=run_id)
            except StoreError as exc:
                final.unlink()
                raise PublishError(
                    f"could not record {name} v{version} in the store ({exc}); nothing was published") from None
            break
    finally:
        tmp.unlink(missing_ok=True)
    log.info("published %s as %s v%d (%s)", adapter, name, version, sha256[:12])
    return Published(name=name, version=version, path=final, sha256=sha256, training_run_id=run_id,
                     base_model=str(config.get("base_model") or ""))


async def tell_service(base_url: str, token: str | None, published: Published) -> str:
    """Ask the running service to rescan its adapters; a sentence saying what happened.

    Raises ServiceError when the service answers with an error (a wrong token, say); a service
    that is not running is not an error: it scans the directory when it starts.
    """
    from generation.client import UNAVAILABLE, ServiceClient, ServiceError

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
    records = {(a.name, a.version): a for a in store.adapters()} if store is not None else {}
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


def _adapters_group():
    import click

    @click.group("adapters")
    def adapters() -> None:
        """Publish trained adapters to the generation service and list them."""

    @adapters.command("publish")
    @click.argument("run", type=click.Path(path_type=Path))
    @click.option("--name", required=True, help="Adapter name; the run becomes its next version (NAME@N).")
    @click.option("--service-url", help="The running service to reload (default: [service] host and port).")
    @click.pass_obj
    def publish_command(app, run: Path, name: str, service_url: str | None) -> None:
        """Publish a training RUN as the next version of adapter NAME.

        \b
        Examples:
          loraloop adapters publish data/runs/foxes-20260101-120000 --name foxes
          loraloop adapters publish data/runs/foxes-20260101-120000/checkpoints/step-000400 --name foxes
        """
        config = app.config
        try:
            with Store.from_config(config) as store:
                published = publish(run, name, config.adapters_dir, store)
        except (PublishError, StoreError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"published {published.name}@{published.version} -> {published.path} "
                   f"(sha256 {published.sha256[:12]}, training run {published.training_run_id})")
        if published.base_model and published.base_model != config.service.model:
            # A LoRA only means something on the model it was trained on; say so, but it may be deliberate.
            click.echo(f"warning: {published.name}@{published.version} was trained on {published.base_model}, "
                       f"but [service] model is {config.service.model}", err=True)
        import asyncio

        from generation.client import ServiceError
        from loraloop.config import Secrets

        url = service_url or f"http://{config.service.host}:{config.service.port}"
        try:
            click.echo(asyncio.run(tell_service(url, Secrets.from_env().service_token, published)))
        except ServiceError as exc:
            raise click.ClickException(f"published, but the service at {url} refused to reload ({exc}); "
                                       "restart it to load the new version") from None

    @adapters.command("list")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per adapter version.")
    @click.pass_obj
    def list_command(app, as_json: bool) -> None:
        """List the adapters in the service's adapters directory, with how they were trained.

        \b
        Example:
          loraloop adapters list
        """
        config = app.config
        try:
            store = Store.from_config(config) if config.database_path.exists() else None
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            rows = list_adapters(config.adapters_dir, store)
        finally:
            if store is not None:
                store.close()
        if as_json:
            for row in rows:
                click.echo(json.dumps(row.__dict__))
            return
        if not rows:
            click.echo(f"no adapters in {config.adapters_dir}; publish one with `loraloop adapters publish`")
            return
        for row in rows:
            loss = row.metrics.get("final_val_loss") or row.metrics.get("final_train_loss")
            click.echo(f"{row.label:<24} {'latest' if row.latest else '':<6} {row.sha256[:12]}  "
                       f"{row.published_at or 'not recorded':<25} "
                       f"{'run ' + str(row.training_run_id) if row.training_run_id else '':<8} "
                       f"{f'loss {loss:.4g}' if isinstance(loss, float) else ''}  {row.description}")

    return adapters


adapters_command = _adapters_group()
