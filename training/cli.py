"""Admin commands for datasets, training and adapters: `loraloop dataset ...`, `train`, `compare`, `adapters ...`."""

from __future__ import annotations

import click


@click.group()
def dataset() -> None:
    """Build training datasets: import pictures, caption them, curate rated images."""


commands = [dataset]
