"""Side-by-side comparison of adapters: `loraloop compare --adapters base,NAME@2,NAME@3 --prompts FILE -o grid.png`.

    loraloop compare --adapters base,foxes@1,foxes@2 --prompts prompts.txt -o grid.png
    loraloop compare --adapters base,foxes,data/runs/foxes-20260101-120000 --prompts prompts.txt -o new.png

One row per prompt, one column per adapter, labelled. Every cell of a row uses the same seed
(the prompt's), so the only difference along a row is the adapter. Adapters are named as the
service names them (generation/adapters.py resolves NAME and NAME@N in the adapters
directory); "base" means no adapter, and a path to a run directory or a .safetensors file
compares an adapter before it is published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

BASE = "base"


class CompareError(Exception):
    """Bad prompts or adapters; the message says what to fix."""


@dataclass(frozen=True)
class Column:
    label: str
    path: Path | None  # None: the base model


def read_prompts(path: Path) -> list[str]:
    """Prompts, one a line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CompareError(f"cannot read prompts file {path}: {exc.strerror}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CompareError(f"{path} has no prompts: write one prompt a line")
    return prompts


def resolve_columns(spec: str, adapters_dir: Path) -> list[Column]:
    """Parse "base,NAME@2,PATH" into columns, each adapter resolved now so a typo fails before any model loads."""
    from generation.adapters import AdapterDirectory
    from generation.contract import AdapterRef, InvalidRequest
    from training.publish import PublishError, find_adapter

    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise CompareError("--adapters is empty: give e.g. base,NAME@1,NAME@2")
    catalog = None
    columns = []
    for name in names:
        if name == BASE:
            columns.append(Column(BASE, None))
            continue
        candidate = Path(name).expanduser()
        if candidate.exists():
            try:
                columns.append(Column(candidate.name, find_adapter(candidate)))
            except PublishError as exc:
                raise CompareError(str(exc)) from None
            continue
        if catalog is None:
            catalog = AdapterDirectory(adapters_dir).scan()
        try:
            file = catalog.resolve(AdapterRef.from_dict({"name": name}))
        except InvalidRequest as exc:
            raise CompareError(str(exc)) from None
        columns.append(Column(file.label, file.path))
    return columns


def render_grid(pipe, columns: list[Column], prompts: list[str], seed: int, steps: int, size: int,
                guidance: float) -> Image.Image:
    """prompts x columns, the seed of row i being seed + i in every column."""
    import torch

    from training.images import labelled_grid

    rows: list[list[Image.Image]] = [[] for _ in prompts]
    for column in columns:
        pipe.unload_lora_weights()
        if column.path is not None:
            pipe.load_lora_weights(str(column.path.parent), weight_name=column.path.name)
        for index, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(seed + index)
            image = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                         generator=generator).images[0]
            rows[index].append(image)
    pipe.unload_lora_weights()
    return labelled_grid(rows, prompts, [column.label for column in columns])


def _compare_command():
    import click

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
    @click.pass_obj
    def compare_command(app, spec, prompts_file, output, seed, steps, size, guidance, model):
        """Render a prompts file with each adapter side by side: a labelled row per prompt, one seed per row.

        \b
        Examples:
          loraloop compare --adapters base,foxes@1,foxes@2 --prompts prompts.txt -o grid.png
          loraloop compare --adapters foxes,data/runs/foxes-20260101-120000 --prompts prompts.txt -o new.png
        """
        config = app.config
        try:
            prompts = read_prompts(prompts_file)
            columns = resolve_columns(spec, config.adapters_dir)
        except CompareError as exc:
            raise click.ClickException(str(exc)) from None
        from generation.pipeline import ModelLoadError, load_model

        try:
            loaded = load_model(model or config.service.model, config.service.device, config.data_dir)
        except ModelLoadError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"rendering {len(prompts)} prompt(s) x {len(columns)} adapter(s)", err=True)
        grid = render_grid(loaded.txt2img, columns, prompts, seed, steps, size or loaded.native_size, guidance)
        output.parent.mkdir(parents=True, exist_ok=True)
        grid.save(output)
        click.echo(f"wrote {output}")

    return compare_command


compare_command = _compare_command()
