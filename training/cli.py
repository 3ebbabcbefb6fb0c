"""Admin commands for datasets, training and adapters: `loraloop dataset ...`, `train`, `compare`, `adapters ...`,
`loop`.

Each command parses its options, calls the module that owns the step, and turns that module's
error into a `click.ClickException`; the work itself lives in training/ (importer, caption,
curate, train, compare, publish, loop).
"""

# Every command imports what it runs (torch, diffusers, the trainer, the store) inside its body, so
# `loraloop --help` and a mistyped flag answer at once (about 0.4 s; keep it well under 1 s).

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import click

from loraloop.config import ConfigError, Secrets, TrainingConfig, fits_type
from loraloop.context import AppContext, pass_app


@click.group()
def dataset() -> None:
    """Build training datasets: import pictures, caption them, curate rated images."""


@dataset.command("import")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "source_format", default="auto", show_default=True,
              type=click.Choice(["auto", "folder", "metadata", "json", "csv", "dreambooth", "urls"]),
              help="How to read SRC; auto goes by file suffix or folder contents.")
@click.option("--resolution", type=int, help="Square output size, a multiple of 8 (default: [training] resolution).")
@click.option("--min-size", type=click.IntRange(min=1), help="Drop images whose shorter side is smaller.")
@click.option("--image-column", help="CSV column with the image path or URL ([dataset] csv_image_column).")
@click.option("--caption-column", help="CSV column with the caption ([dataset] csv_caption_column).")
@click.option("--workers", type=click.IntRange(min=0),
              help="Processes resizing images; 0: one per core ([dataset] import_workers).")
@click.option("--allow-private-host", "private_hosts", multiple=True, metavar="ADDRESS",
              help="Let downloads reach this private address or network, e.g. 192.168.1.0/24; repeatable "
                   "(adds to [dataset] allow_private_hosts).")
@click.option("--allow-paths-outside-source", is_flag=True, default=None,
              help="Let JSON/CSV/metadata sources name files outside their own folder.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
@pass_app
def import_(app: AppContext, src: Path, out: Path, source_format: str, resolution: int | None, min_size: int | None,
            image_column: str | None, caption_column: str | None, workers: int | None,
            private_hosts: tuple[str, ...], allow_paths_outside_source: bool | None, no_progress: bool) -> None:
    """Import pictures from SRC into a training dataset folder OUT.

    SRC is a folder of images with .txt captions, a folder with metadata.jsonl, DreamBooth
    folders named <trigger>_<class>, a JSON list of {"link", "caption"}, a CSV, or a .txt of
    image URLs. Images are turned upright, made RGB and centre-cropped to the training
    resolution; unreadable, too small, duplicate and badly captioned ones are dropped and listed
    in OUT/report.json.

    \b
        loraloop dataset import ~/pictures/fox data/datasets/fox
        loraloop dataset import photos.csv data/datasets/fox --image-column path --caption-column text
        loraloop dataset import urls.txt data/datasets/fox --resolution 768
        loraloop dataset import nas-urls.txt data/datasets/fox --allow-private-host 192.168.1.20
    """
    from training.dataset import DatasetError
    from training.importer import ImportSettings, import_dataset

    overrides: dict[str, Any] = {
        k: v for k, v in {"min_image_size": min_size, "csv_image_column": image_column,
                          "csv_caption_column": caption_column, "import_workers": workers,
                          "allow_paths_outside_source": allow_paths_outside_source}.items()
        if v is not None}
    if private_hosts:
        overrides["allow_private_hosts"] = [*app.config.dataset.allow_private_hosts, *private_hosts]
    try:
        config = app.config.replace("dataset", **overrides) if overrides else app.config
        if resolution is not None:
            config = config.replace("training", resolution=resolution)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from training.base_model import BaseModelError, resolve_resolution

    try:
        size = resolve_resolution(config.training.resolution, config.service.model)
    except BaseModelError as exc:
        raise click.ClickException(str(exc)) from None
    settings = ImportSettings.from_config(config.dataset, size)
    try:
        report = import_dataset(src, out, settings, source_format=source_format, progress=not no_progress)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Imported {src} ({report.format}) into {out}: {report.summary()}.")
    shown = 10
    for entry in report.dropped[:shown]:
        click.echo(f"  dropped {entry['source']}: {entry['reason'].replace('_', ' ')} ({entry['detail']})")
    if len(report.dropped) > shown:
        click.echo(f"  ... and {len(report.dropped) - shown} more")
    click.echo(f"Details: {out / 'report.json'}")


@dataset.command("caption")
@click.argument("dataset_dir", metavar="DATASET", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", help="BLIP model id, local directory, or 'tiny' (default: [dataset] caption_model).")
@click.option("--prefix", default="", help='Put before every new caption, e.g. a trigger word: --prefix "sks,".')
@click.option("--overwrite", is_flag=True, help="Recaption every image, not only those without a caption.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch ([dataset] caption_batch_size).")
@click.option("--device", help="auto, cpu, cuda or cuda:N ([dataset] caption_device).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@pass_app
def caption(app: AppContext, dataset_dir: Path, model: str | None, prefix: str, overwrite: bool,
            batch_size: int | None, device: str | None, no_progress: bool) -> None:
    """Fill a dataset's missing captions with BLIP.

    Captions already in DATASET/metadata.jsonl are kept unless --overwrite. The file is saved
    after every batch, so an interrupted run can simply be started again.

    \b
        loraloop dataset caption data/datasets/fox
        loraloop dataset caption data/datasets/fox --prefix "sks fox," --overwrite
        loraloop dataset caption data/datasets/fox --model Salesforce/blip-image-captioning-base
    """
    from training.caption import CaptionSettings, caption_dataset
    from training.dataset import DatasetError

    overrides = {k: v for k, v in {"caption_model": model, "caption_batch_size": batch_size,
                                   "caption_device": device}.items() if v is not None}
    try:
        config = app.config.replace("dataset", **overrides) if overrides else app.config
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        report = caption_dataset(dataset_dir, CaptionSettings.from_config(config.dataset), prefix=prefix,
                                 overwrite=overwrite, data_dir=config.data_dir, progress=not no_progress)
    except DatasetError as exc:  # CaptionError among them
        raise click.ClickException(str(exc)) from None
    click.echo(f"{dataset_dir}: {report.summary()}.")


@dataset.command("curate")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "dataset_format", type=click.Choice(["sft", "kto", "dpo"]),
              help="sft: liked images; kto: liked and disliked, labelled; dpo: preference pairs ([curation] format).")
@click.option("--adapter", help="Only images made with this adapter (NAME, or NAME@VERSION).")
@click.option("--adapter-version", type=click.IntRange(min=0), help="Only this version of --adapter.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M"]),
              help="Only images made at or after this UTC date.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M"]),
              help="Only images made before this UTC date.")
@click.option("--min-raters", type=click.IntRange(min=1),
              help="Distinct raters an image needs ([curation] min_raters).")
@click.option("--min-score", type=float,
              help="Weighted net votes to keep an image ([curation] min_score).")
@click.option("--min-wilson", type=click.FloatRange(0, 1, max_open=True),
              help="Wilson lower bound on the like ratio to keep an image ([curation] min_wilson).")
@click.option("--include-self-votes/--exclude-self-votes", default=None,
              help="Count requesters' votes on their own images ([curation] include_self_votes).")
@click.option("--near-duplicate-distance", type=click.IntRange(0, 64),
              help="Perceptual-hash bits at or under which images collapse ([curation] near_duplicate_distance).")
@click.option("--max-pairs-per-prompt", type=click.IntRange(min=0), help="dpo: pairs per prompt, 0 for no cap.")
@click.option("--link-images/--copy-images", default=None,
              help="Hard-link images from the store, or copy them ([curation] link_images).")
@pass_app
def curate_(app: AppContext, out: Path, dataset_format: str | None, adapter: str | None,
            adapter_version: int | None, since, until, min_raters: int | None, min_score: float | None,
            min_wilson: float | None, include_self_votes: bool | None,
            near_duplicate_distance: int | None, max_pairs_per_prompt: int | None,
            link_images: bool | None) -> None:
    """Turn the server's votes into a training dataset in OUT.

    Flagged images, opted-out users, self-votes, thinly rated images and duplicates are left
    out; OUT/report.json says what was kept and why the rest was dropped, OUT/dataset_hash
    names the dataset for training, OUT/score_histogram.png shows the scores.

    \b
        loraloop dataset curate data/datasets/liked
        loraloop dataset curate data/datasets/thumbs --format kto --min-raters 3
        loraloop dataset curate data/datasets/pairs --format dpo --adapter pixel@3
        loraloop dataset curate data/datasets/nov --since 2026-11-01 --until 2026-12-01 --min-wilson 0.5
    """
    import datetime as dt

    from loraloop.store import Store, StoreError
    from training.curate import CurationError, CurationSettings, curate

    if adapter and "@" in adapter:
        adapter, _, pinned = adapter.partition("@")
        if not pinned.isdigit() or adapter_version is not None:
            raise click.UsageError("write the adapter as NAME@VERSION or use --adapter-version, not both")
        adapter_version = int(pinned)
    settings = CurationSettings.from_config(
        app.config.curation, format=dataset_format, adapter=adapter, adapter_version=adapter_version,
        since=since.replace(tzinfo=dt.UTC) if since else None,
        until=until.replace(tzinfo=dt.UTC) if until else None,
        min_raters=min_raters, min_score=min_score, min_wilson=min_wilson,
        include_self_votes=include_self_votes, near_duplicate_distance=near_duplicate_distance,
        max_pairs_per_prompt=max_pairs_per_prompt, link_images=link_images,
    )
    if not app.config.database_path.exists():
        raise click.ClickException(f"No database at {app.config.database_path} ({app.config.whereabouts()}): "
                                   "nothing has been rated yet; votes come from the Discord bot (`loraloop run`).")
    try:
        with Store.from_config(app.config) as store:
            report = curate(store, out, settings)
    except (CurationError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Curated a {settings.format} dataset in {out}: {report.summary()}.")
    click.echo(f"Dataset hash {report.dataset_hash}; details in {out / 'report.json'}")


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--set KEY=VALUE pairs, VALUE in TOML syntax (bare words are taken as strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[a-z_0-9]+", key.strip()):
            raise click.ClickException(f"--set {pair!r}: expected KEY=VALUE, e.g. --set rank=32")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def apply_overrides(settings: TrainingConfig, changes: dict[str, Any]) -> TrainingConfig:
    """[training] with `changes` applied, each checked against the key's type (an int is fine for a float)."""
    hints = typing.get_type_hints(TrainingConfig)
    for key, value in changes.items():
        if key not in hints:
            raise click.ClickException(f"--set {key}: unknown [training] key (see config.toml)")
        default = getattr(TrainingConfig(), key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            changes[key] = float(value)
        elif not fits_type(value, hints[key]):
            raise click.ClickException(f"--set {key}: expected {type(default).__name__}, got {value!r}")
    try:
        return dataclasses.replace(settings, **changes)
    except ValueError as exc:
        raise click.ClickException(f"[training] {exc}") from None


@click.command("train")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Adapter name (what `adapters publish` will call it).")
@click.option("--objective", type=click.Choice(["sft", "dpo", "kto"]), help="Overrides [training] objective.")
@click.option("--model", help="Base model: diffusers directory, hub id or 'tiny' (default: [service] model).")
@click.option("--output", type=click.Path(path_type=Path, file_okay=False),
              help="Run directory (default: DATA_DIR/runs/NAME-TIMESTAMP).")
@click.option("--resume", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Continue from a checkpoint directory, or a run directory's latest checkpoint.")
@click.option("--steps", type=click.IntRange(min=1), help="Overrides [training] max_steps.")
@click.option("--epochs", type=click.IntRange(min=0), help="Overrides [training] epochs.")
@click.option("--rank", type=click.IntRange(min=1), help="Overrides [training] rank.")
@click.option("--alpha", type=float, help="Overrides [training] alpha.")
@click.option("--lr", type=float, help="Overrides [training] learning_rate.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Overrides [training] batch_size.")
@click.option("--class-prompt", help="DreamBooth prior preservation: the subject's class, e.g. \"a photo of a dog\".")
@click.option("--prior-images", type=click.IntRange(min=0),
              help="How many class images the base model draws for --class-prompt (cached by prompt and seed).")
@click.option("--service-url", help="The service that draws class images (default: [service] host and port); "
                                    "when it is down or runs another model they are drawn here.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any [training] key, VALUE in TOML syntax: --set targets='[\"attention\",\"proj\"]'.")
@pass_app
def train_command(app: AppContext, dataset: Path, name: str, objective: str | None, model: str | None,
                  output: Path | None, resume: Path | None, steps: int | None, epochs: int | None, rank: int | None,
                  alpha: float | None, lr: float | None, batch_size: int | None, class_prompt: str | None,
                  prior_images: int | None, service_url: str | None, overrides: tuple[str, ...]) -> None:
    """Train a LoRA adapter on DATASET (sft, dpo or kto) and write a run directory.

    \b
    Examples:
      loraloop train data/datasets/foxes --name foxes --steps 800
      loraloop train data/datasets/pairs --name house --objective dpo
      loraloop train data/datasets/foxes --name foxes --resume data/runs/foxes-20260101-120000
      loraloop train data/datasets/rex --name rex --class-prompt "a photo of a dog" --prior-images 100
    """
    from training.checkpoint import Interrupted
    from training.train import Job, TrainError, train, validate

    config = app.config
    flags = {"objective": objective, "max_steps": steps, "epochs": epochs, "rank": rank, "alpha": alpha,
             "learning_rate": lr, "batch_size": batch_size, "class_prompt": class_prompt, "prior_images": prior_images}
    changes = parse_overrides(overrides)
    changes.update({k: v for k, v in flags.items() if v is not None})
    settings = apply_overrides(config.training, changes)
    job = Job(dataset=dataset, name=name, model=model or config.service.model, settings=settings,
              data_dir=config.data_dir, output=output, resume=resume,
              service_url=service_url or f"http://{config.service.host}:{config.service.port}",
              service_token=Secrets.from_env().service_token)
    try:
        plan = validate(job)
        for note in plan.resume.notes if plan.resume else []:
            click.echo(f"resume: setting changed since the checkpoint: {note}", err=True)
        for warning in plan.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"training {name} ({settings.objective}) on {len(plan.train)} examples "
                   f"({len(plan.validation)} held out) for {plan.total_steps} steps -> {plan.run_dir}", err=True)
        report = train(plan)
    except (TrainError, Interrupted) as exc:
        raise click.ClickException(str(exc)) from None
    if report:
        val = report["final_val_loss"]
        if report["prior"]:
            prior = report["prior"]
            click.echo(f"class images of {prior['class_prompt']!r}: {prior['generated']} drawn "
                       f"({prior['source']}), {prior['reused']} from the cache", err=True)
        click.echo(f"adapter: {report['adapter']} (step {report['adapter_step']})")
        click.echo(f"final train loss {report['final_train_loss']:.4g}"
                   + (f", validation loss {val:.4g}" if val is not None else "")
                   + f"; report: {plan.run_dir / 'report.json'}")
        click.echo(f"publish it: loraloop adapters publish {plan.run_dir} --name {name}")


@click.command("compare")
@click.option("--adapters", "spec", required=True,
              help="Comma-separated columns: base, NAME (latest), NAME@N, or a run directory / .safetensors.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Text file, one prompt a line (# comments allowed).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the grid PNG.")
@click.option("--seed", default=0, show_default=True, help="Seed of the first prompt; row i uses seed + i.")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1), help="Inference steps.")
@click.option("--size", type=click.IntRange(min=8), help="Image side in pixels (default: the model's native).")
@click.option("--guidance", default=7.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--model", help="Base model (default: [service] model).")
@pass_app
def compare_command(app: AppContext, spec: str, prompts_file: Path, output: Path, seed: int, steps: int,
                    size: int | None, guidance: float, model: str | None) -> None:
    """Render a prompts file with each adapter side by side: a labelled row per prompt, one seed per row.

    \b
    Examples:
      loraloop compare --adapters base,foxes@1,foxes@2 --prompts prompts.txt -o grid.png
      loraloop compare --adapters foxes,data/runs/foxes-20260101-120000 --prompts prompts.txt -o new.png
    """
    from generation.pipeline import ModelLoadError, load_model
    from training.compare import CompareError, read_prompts, render_grid, resolve_columns

    config = app.config
    try:
        prompts = read_prompts(prompts_file)
        columns = resolve_columns(spec, config.adapters_dir)
    except CompareError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        loaded = load_model(model or config.service.model, config.service.device, config.data_dir)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"rendering {len(prompts)} prompt(s) x {len(columns)} adapter(s)", err=True)
    grid = render_grid(loaded.txt2img, columns, prompts, seed, steps, size or loaded.native_size, guidance)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    click.echo(f"wrote {output}")


@click.group("adapters")
def adapters() -> None:
    """Publish trained adapters to the generation service and list them."""


@adapters.command("publish")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Adapter name; the run becomes its next version (NAME@N).")
@click.option("--service-url", help="The running service to reload (default: [service] host and port).")
@pass_app
def publish_command(app: AppContext, run: Path, name: str, service_url: str | None) -> None:
    """Publish a training RUN as the next version of adapter NAME.

    \b
    Examples:
      loraloop adapters publish data/runs/foxes-20260101-120000 --name foxes
      loraloop adapters publish data/runs/foxes-20260101-120000/checkpoints/step-000400 --name foxes
    """
    from generation.client import ServiceError
    from loraloop.store import Store, StoreError
    from training.publish import PublishError, publish, tell_service

    config = app.config
    try:
        with Store.from_config(config) as store:
            published = publish(run, name, config.adapters_dir, store, config.a1111_adapters_dir)
    except (PublishError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"published {published.name}@{published.version} -> {published.path} "
               f"(sha256 {published.sha256[:12]}, training run {published.training_run_id})")
    if published.a1111_files:
        click.echo(f"for A1111, Forge and ComfyUI: {', '.join(str(p) for p in published.a1111_files)}")
    else:
        click.echo("no kohya copy beside the adapter (trained before loraloop wrote one), so no A1111 copy; "
                   "retrain to get one", err=True)
    if published.base_model and published.base_model != config.service.model:
        # A LoRA only means something on the model it was trained on; say so, but it may be deliberate.
        click.echo(f"warning: {published.name}@{published.version} was trained on {published.base_model}, "
                   f"but [service] model is {config.service.model}", err=True)
    url = service_url or f"http://{config.service.host}:{config.service.port}"
    try:
        click.echo(asyncio.run(tell_service(url, Secrets.from_env().service_token, published)))
    except ServiceError as exc:
        raise click.ClickException(f"published, but the service at {url} refused to reload ({exc}); "
                                   "restart it to load the new version") from None


@adapters.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per adapter version.")
@pass_app
def list_command(app: AppContext, as_json: bool) -> None:
    """List the adapters in the service's adapters directory, with how they were trained.

    \b
    Example:
      loraloop adapters list
    """
    from loraloop.store import Store, StoreError
    from training.publish import list_adapters

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
        click.echo(f"no adapters in {config.adapters_dir} ({config.whereabouts()}); "
                   "publish one with `loraloop adapters publish`")
        return
    for row in rows:
        loss = row.metrics.get("final_val_loss") or row.metrics.get("final_train_loss")
        click.echo(f"{row.label:<24} {'latest' if row.latest else '':<6} {row.sha256[:12]}  "
                   f"{row.published_at or 'not recorded':<25} "
                   f"{'run ' + str(row.training_run_id) if row.training_run_id else '':<8} "
                   f"{f'loss {loss:.4g}' if isinstance(loss, float) else ''}  {row.description}")


@click.command("loop")
@click.option("--once", is_flag=True, help="One pass (decide experiments, start due rounds), then exit.")
@click.option("--service-url",
              help="The running service to tell about new candidates (default: [service] host and port).")
@pass_app
def loop_command(app: AppContext, once: bool, service_url: str | None) -> None:
    """Run rounds by themselves: train candidates from new votes and let the A/B gate decide.

    Every [loop] poll_seconds: the rater model over all votes; each running experiment's verdict
    (promote or retire, recorded and announced by the bot); for each adapter with enough new
    weighted votes ([loop] min_new_votes) and no experiment running, a round: curate, train,
    publish the candidate, which the bot then serves to [loop] share of `/imagine style:NAME`.
    The first version of a style is still published by hand; the loop trains the ones after.

    \b
        loraloop loop                  # until Ctrl-C
        loraloop loop --once           # one pass
        loraloop db stats              # the running experiments and their verdicts
    """
    from loraloop.store import StoreError
    from training.loop import LoopRunner

    runner = LoopRunner(app.config, service_url, Secrets.from_env().service_token)
    try:
        if once:
            done = runner.step()
            for experiment, verdict in done.decisions:
                click.echo(f"{experiment.adapter} v{experiment.candidate_version}: {verdict.explain()}")
            for result in done.rounds:
                click.echo(f"{result.adapter}: " + (f"round failed: {result.error}" if result.error else
                           f"candidate v{result.candidate_version} on trial against v{result.control_version}"))
            if not done.decisions and not done.rounds:
                click.echo(f"nothing to do ({done.raters} raters weighed)")
            return
        runner.run_forever()
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("loop stopped", err=True)


commands = [dataset, train_command, compare_command, adapters, loop_command]
