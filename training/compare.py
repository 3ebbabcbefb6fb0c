"""Side-by-side comparison of adapters: `loraloop compare --adapters base,NAME@2,NAME@3 --prompts FILE -o grid.png`.

    loraloop compare --adapters base,foxes@1,foxes@2 --prompts prompts.txt -o grid.png
    loraloop compare --adapters base,foxes,data/runs/foxes-20260101-120000 --prompts prompts.txt -o new.png

One row per prompt, one column per adapter, labelled. Every cell of a row uses the same seed
(the prompt's), so the only difference along a row is the adapter. Adapters are named as the
service names them (generation/adapters.py resolves NAME and NAME@N in the adapters
directory); "base" means no adapter, and a path to a run directory or a .safetensors file
compares an adapter before it is published. The command itself is in training/cli.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from generation.adapters import AdapterDirectory
from generation.contract import AdapterRef, InvalidRequest
from training.images import labelled_grid
from training.publish import PublishError, find_adapter

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
