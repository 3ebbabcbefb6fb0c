"""Admin commands for datasets, training and adapters: `loraloop dataset ...`, `train`, `compare`, `adapters ...`."""

from __future__ import annotations

from pathlib import Path

import click

from loraloop.config import ConfigError
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
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
@pass_app
def import_(app: AppContext, src: Path, out: Path, source_format: str, resolution: int | None, min_size: int | None,
            image_column: str | None, caption_column: str | None, workers: int | None, no_progress: bool) -> None:
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
    """
    from training.dataset import DatasetError
    from training.importer import ImportSettings, import_dataset

    overrides = {k: v for k, v in {"min_image_size": min_size, "csv_image_column": image_column,
                                   "csv_caption_column": caption_column, "import_workers": workers}.items()
                 if v is not None}
    try:
        config = app.config.replace("dataset", **overrides) if overrides else app.config
        if resolution is not None:
            config = config.replace("training", resolution=resolution)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    settings = ImportSettings.from_config(config.dataset, config.training.resolution)
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
@click.option("--min-score", type=int, help="Net votes to keep an image ([curation] min_score).")
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
            adapter_version: int | None, since, until, min_raters: int | None, min_score: int | None,
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
        raise click.ClickException(f"No database at {app.config.database_path}: nothing has been rated yet.")
    try:
        with Store.from_config(app.config) as store:
            report = curate(store, out, settings)
    except (CurationError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Curated a {settings.format} dataset in {out}: {report.summary()}.")
    click.echo(f"Dataset hash {report.dataset_hash}; details in {out / 'report.json'}")


from training.compare import compare_command  # noqa: E402
from training.publish import adapters_command  # noqa: E402
from training.train import train_command  # noqa: E402  (kept with its registration)

commands = [dataset, train_command, compare_command, adapters_command]
