"""Pictures a person looks at after training: labelled image grids (Pillow) and charts (matplotlib).

The charts are matplotlib figures built with its object API on the Agg canvas, never pyplot, so
they hold no global state and can be drawn from any thread (the web console draws the same
figures as SVG that `train` and `dataset curate` save as PNG).

    loss_curve(train_points, validation_points, run_dir / "loss.png")
    score_histogram(kept_scores, dropped_scores, "42 of 60 images kept", out / "score_histogram.png")
    svg = figure_bytes(loss_figure(train_points, validation_points), "svg")
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
SCORE_LIMIT = 10  # the histogram clips scores to +-10: beyond that the shape says nothing more


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, width: int) -> None:
    """Draw `text` clipped to roughly `width` pixels (the default bitmap font is ~6 px a character)."""
    limit = max(4, width // 6)
    draw.text(xy, text if len(text) <= limit else text[: limit - 1] + "…", fill=INK, font=ImageFont.load_default())


def labelled_grid(images: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
                  column_labels: Sequence[str]) -> Image.Image:
    """A grid, images[row][column], with a label left of each row and above each column."""
    cell = max(max(image.size) for row in images for image in row)
    label_width, label_height = 160, 24
    columns = max(len(row) for row in images)
    grid = Image.new("RGB", (label_width + columns * cell, label_height + len(images) * cell), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        _text(draw, (label_width + column * cell + 4, 6), label, cell - 8)
    for row, (label, row_images) in enumerate(zip(row_labels, images, strict=True)):
        top = label_height + row * cell
        _text(draw, (4, top + cell // 2 - 6), label, label_width - 8)
        for column, image in enumerate(row_images):
            grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + column * cell, top))
    return grid


def new_figure(size: tuple[int, int] = (640, 400)) -> Figure:
    """A figure of `size` pixels at 100 dpi, on the Agg canvas (no display, no pyplot)."""
    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_bytes(figure: Figure, fmt: str) -> bytes:
    """The figure as "png" or "svg" bytes."""
    buffer = io.BytesIO()
    # SVG text as text, not glyph outlines: a screen reader and a search can read the labels.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


def loss_figure(train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]],
                size: tuple[int, int] = (640, 400)) -> Figure:
    """Training loss (grey, with a smoothed line in blue) and validation loss (orange dots) against step."""
    figure = new_figure(size)
    axes = figure.add_subplot()
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    if not train and not validation:
        axes.set_title("no steps were trained")
        return figure
    axes.set_title("loss: train (grey, smoothed blue), validation (orange)")
    if train:
        steps = [s for s, _ in train]
        axes.plot(steps, [v for _, v in train], color="0.75", linewidth=1, label="train")
        # An exponential moving average, as TensorBoard smooths: the trend through noisy micro-batches.
        smoothed, average = [], train[0][1]
        for _, value in train:
            average = 0.9 * average + 0.1 * value
            smoothed.append(average)
        axes.plot(steps, smoothed, color="#1e5ac8", linewidth=2, label="train (smoothed)")
    if validation:
        axes.plot([s for s, _ in validation], [v for _, v in validation], "o", color="#e67814", label="validation")
    axes.legend(loc="upper right", fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def loss_curve(train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]], path: Path,
               size: tuple[int, int] = (640, 400)) -> Path:
    """Save `loss_figure` to `path` (PNG, or SVG by the suffix)."""
    path.write_bytes(figure_bytes(loss_figure(train, validation, size), path.suffix.lstrip(".") or "png"))
    return path


def score_histogram(kept_scores: Sequence[float], dropped_scores: Sequence[float], title: str, path: Path,
                    size: tuple[int, int] = (720, 360)) -> Path:
    """Net score (weighted likes - dislikes, rounded) per image, kept stacked on dropped, clipped to +-10."""
    bins = list(range(-SCORE_LIMIT, SCORE_LIMIT + 1))

    def counts(scores: Sequence[float]) -> list[int]:
        clipped = [max(-SCORE_LIMIT, min(SCORE_LIMIT, round(s))) for s in scores]
        return [clipped.count(b) for b in bins]

    kept, dropped = counts(kept_scores), counts(dropped_scores)
    figure = new_figure(size)
    axes = figure.add_subplot()
    axes.bar(bins, dropped, color="0.67", label="dropped")
    axes.bar(bins, kept, bottom=dropped, color="#2e8b57", label="kept")
    axes.set_xticks([-SCORE_LIMIT, -5, 0, 5, SCORE_LIMIT], [f"≤-{SCORE_LIMIT}", "-5", "0", "5", f"≥{SCORE_LIMIT}"])
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("weighted net score (likes - dislikes)")
    axes.set_ylabel("images")
    axes.set_title(title, fontsize="medium")
    axes.legend(loc="upper left", fontsize="small")
    path.write_bytes(figure_bytes(figure, path.suffix.lstrip(".") or "png"))
    return path
