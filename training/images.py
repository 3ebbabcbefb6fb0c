"""Pictures a person looks at after training: labelled image grids and the loss curve, drawn with Pillow.

matplotlib is not a dependency, and a loss curve needs only lines, a frame and a few labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


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


def loss_curve(train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]], path: Path,
               size: tuple[int, int] = (640, 400)) -> Path:
    """Plot training loss (grey, with a smoothed line in blue) and validation loss (orange dots) against step."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    points = [*train, *validation]
    if not points:
        _text(draw, (left, height // 2), "no steps were trained", width)
        image.save(path)
        return path
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    low_step, high_step = min(steps), max(max(steps), min(steps) + 1)
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - low_step) / (high_step - low_step) * (width - left - right)
        y = top + (high - value) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline=INK)
    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        _, y = xy(low_step, value)
        _text(draw, (4, y - 6), f"{value:.4g}", left - 6)
    _text(draw, (left, height - bottom + 6), f"step {low_step}", 120)
    _text(draw, (width - right - 80, height - bottom + 6), f"step {high_step}", 80)
    _text(draw, (left, 8), "loss: train (grey, smoothed blue), validation (orange)", width - left)
    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train], fill=(190, 190, 190), width=1)
        smoothed, average = [], train[0][1]
        for step, value in train:
            average = 0.9 * average + 0.1 * value
            smoothed.append(xy(step, average))
        draw.line(smoothed, fill=(30, 90, 200), width=2)
    for step, value in validation:
        x, y = xy(step, value)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(230, 120, 20))
    image.save(path)
    return path
