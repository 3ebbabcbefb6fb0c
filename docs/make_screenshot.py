"""Render docs/screenshot.png: what a Discord channel shows after one real `/imagine`.

    OMP_NUM_THREADS=1 .venv/bin/python -m docs.make_screenshot            # ~30 s, offline
    .venv/bin/python -m docs.make_screenshot -o /tmp/shot.png --prompt "a lighthouse at dusk"

Nothing here is staged: `loraloop run`'s own code (`run_all`) starts the generation
service on the tiny model and the real discord.py bot against the fake Discord of the tests
(tests/fake_discord.py). Alice asks for two images, Bob and Carol vote, and this file then
draws the channel as the fake recorded it: authors, text, attachments, reactions and buttons,
in Discord's dark theme. The tiny model has random weights, so its images are noise.

The machine has no colour-emoji font, so emojis are drawn as plain symbols from DejaVu Sans
(see `EMOJI_STAND_INS`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fake Discord lives with the tests

from fake_discord import FakeDiscord  # noqa: E402

from loraloop.config import Secrets  # noqa: E402
from loraloop.context import AppContext  # noqa: E402
from loraloop.run import run_all  # noqa: E402
from loraloop.tiny import tiny_model_path  # noqa: E402

# Discord's dark theme.
BACKGROUND = (49, 51, 56)
TEXT = (219, 222, 225)
MUTED = (148, 155, 164)
BUTTON_GREY = (78, 80, 88)
BUTTON_RED = (218, 55, 60)
REACTION_BG = (43, 45, 49)
REACTION_MINE_BG = (55, 58, 99)
REACTION_MINE_BORDER = (88, 101, 242)
BOT_TAG = (88, 101, 242)
AVATAR_COLOURS = {"loraloop": (88, 101, 242), "alice": (235, 69, 158), "bob": (87, 242, 135),
                  "carol": (254, 231, 92)}
HEADER = (43, 45, 49)

EMOJI_STAND_INS = {"👍": "▲", "👎": "▼", "🚩": "⚑", "🔁": "↻", "🎨": "✎", "🗑️": "✕", "🗑": "✕",
                   "❌": "✕", "✅": "✓", "⏳": "…", "🔍": "⊕", "✨": "✦"}

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
WIDTH = 760
LEFT = 72  # where message text starts, right of the avatar
IMAGE_SIDE = 200


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(FONT_DIR / name), size)
    except OSError:
        return ImageFont.load_default(size)


def plain(text: str) -> str:
    for emoji, stand_in in EMOJI_STAND_INS.items():
        text = text.replace(emoji, stand_in)
    return text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def record_channel(prompt: str, workdir: Path) -> tuple[FakeDiscord, list[dict]]:
    """Run the product against the fake Discord; returns the fake and the channel's messages."""
    data_dir = workdir / "data"
    os.environ["LORALOOP_DATA_DIR"] = str(data_dir)
    model_dir = tiny_model_path(data_dir)
    config = workdir / "config.toml"
    config.write_text(f"""
[service]
model = "{model_dir}"
port = {free_port()}
default_steps = 8

[console]
port = {free_port()}

[bot]
base_size = 128
cooldown_seconds = 0.0
progress_interval = 0.0
""")
    fake = FakeDiscord()
    await fake.start()
    fake.point_discord_py_here()
    product = asyncio.create_task(run_all(AppContext(str(config)), Secrets("fake-token", None)))
    try:
        await fake.wait_for(lambda: fake.connected and fake.commands, timeout=90)
        interaction = await fake.slash("imagine", {"prompt": prompt, "count": 2, "seed": 42}, user=fake.alice)
        await fake.wait_for(lambda: len(fake.image_messages()) == 2, timeout=120)
        first, second = (int(m["id"]) for m in fake.image_messages())
        await fake.react(first, "👍", fake.bob)
        await fake.react(first, "👍", fake.carol)
        await fake.react(second, "👎", fake.carol)
        await fake.wait_for(lambda: (fake.original_message(interaction) or {}).get("content", "").startswith("✅"),
                            timeout=30)
        await asyncio.sleep(1.0)  # let the bot finish handling the reactions before it stops
        return fake, [fake._with_reactions(m) for m in fake.channel_messages()]
    finally:
        product.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await product
        await fake.stop()


def draw_rich_line(draw: ImageDraw.ImageDraw, xy: tuple[int, int], line: str) -> int:
    """One line of Discord Markdown (**bold** and `-# ` subtext only); returns its height."""
    x, y = xy
    if line.startswith("-# "):
        draw.text((x, y), plain(line[3:]), font=font(12), fill=MUTED)
        return 18
    for i, part in enumerate(re.split(r"\*\*", plain(line))):
        face = font(15, bold=i % 2 == 1)
        draw.text((x, y), part, font=face, fill=(242, 243, 245) if i % 2 else TEXT)
        x += draw.textlength(part, font=face)
    return 22


def avatar(draw: ImageDraw.ImageDraw, x: int, y: int, name: str) -> None:
    draw.ellipse((x, y, x + 40, y + 40), fill=AVATAR_COLOURS.get(name, (120, 120, 130)))
    letter = name[:1].upper()
    face = font(18, bold=True)
    width = draw.textlength(letter, font=face)
    draw.text((x + 20 - width / 2, y + 9), letter, font=face, fill=(30, 31, 34))


def message_height(message: dict) -> int:
    height = 26 + 22 * len(message["content"].splitlines())
    if message.get("interaction_metadata"):
        height += 22
    if message["attachments"]:
        height += IMAGE_SIDE + 8
    if message.get("reactions"):
        height += 34
    if message.get("components"):
        height += 42
    return height + 18


def draw_message(canvas: Image.Image, fake: FakeDiscord, message: dict, y: int) -> int:
    draw = ImageDraw.Draw(canvas)
    if message.get("interaction_metadata"):
        who = message["interaction_metadata"]["user"]["username"]
        draw.line((36, y + 10, 36, y + 4), fill=MUTED, width=2)
        draw.line((36, y + 4, LEFT - 8, y + 4), fill=MUTED, width=2)
        x = LEFT
        for text, colour in ((who, AVATAR_COLOURS.get(who, TEXT)), (" used ", MUTED), ("/imagine", (0, 168, 252))):
            draw.text((x, y - 4), text, font=font(13, bold=colour is not MUTED), fill=colour)
            x += draw.textlength(text, font=font(13, bold=colour is not MUTED))
        y += 22
    author = message["author"]["username"]
    avatar(draw, 16, y, author)
    draw.text((LEFT, y), author, font=font(15, bold=True), fill=(242, 243, 245))
    x = LEFT + draw.textlength(author, font=font(15, bold=True)) + 6
    if message["author"].get("bot"):
        draw.rounded_rectangle((x, y + 2, x + 34, y + 18), radius=3, fill=BOT_TAG)
        draw.text((x + 5, y + 3), "BOT", font=font(11, bold=True), fill=(255, 255, 255))
        x += 40
    sent = datetime.datetime.fromisoformat(message["timestamp"]).astimezone()
    draw.text((x, y + 3), f"Today at {sent:%H:%M}", font=font(12), fill=MUTED)
    y += 24
    for line in message["content"].splitlines():
        y += draw_rich_line(draw, (LEFT, y), line)
    for attachment in message["attachments"]:
        picture = Image.open(io.BytesIO(fake.attachment_bytes(attachment))).convert("RGB")
        picture = picture.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.NEAREST)
        mask = Image.new("L", picture.size, 0)
        ImageDraw.Draw(mask).rounded_rectangle((0, 0, *picture.size), radius=8, fill=255)
        canvas.paste(picture, (LEFT, y + 4), mask)
        y += IMAGE_SIDE + 8
    if message.get("reactions"):
        x = LEFT
        viewer = int(fake.bob["id"])  # the picture is Bob's view: his own reactions are highlighted
        for reaction in message["reactions"]:
            mine = viewer in fake.reactions[int(message["id"])][reaction["emoji"]["name"]]
            label = f"{plain(reaction['emoji']['name'])}  {reaction['count']}"
            width = draw.textlength(label, font=font(14)) + 20
            draw.rounded_rectangle((x, y + 4, x + width, y + 30), radius=8,
                                   fill=REACTION_MINE_BG if mine else REACTION_BG,
                                   outline=REACTION_MINE_BORDER if mine else REACTION_BG)
            draw.text((x + 10, y + 9), label, font=font(14), fill=TEXT)
            x += width + 6
        y += 34
    for row in message.get("components", []):
        x = LEFT
        for button in row["components"]:
            label = f"{plain(button['emoji']['name'])}  {button['label']}" if button.get("emoji") else button["label"]
            width = draw.textlength(label, font=font(14)) + 32
            draw.rounded_rectangle((x, y + 6, x + width, y + 38), radius=4,
                                   fill=BUTTON_RED if button["style"] == 4 else BUTTON_GREY)
            draw.text((x + 16, y + 13), label, font=font(14), fill=(255, 255, 255))
            x += width + 8
        y += 42
    return y + 18


def render(fake: FakeDiscord, messages: list[dict], channel_name: str) -> Image.Image:
    height = 52 + sum(message_height(m) for m in messages) + 12
    canvas = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, WIDTH, 44), fill=HEADER)
    draw.text((16, 10), "#", font=font(20), fill=MUTED)
    draw.text((38, 12), channel_name, font=font(16, bold=True), fill=(242, 243, 245))
    y = 60
    for message in messages:
        y = draw_message(canvas, fake, message, y)
    return canvas.crop((0, 0, WIDTH, min(height, y + 4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--prompt", default="a red fox in the snow")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraloop-screenshot-") as workdir:
        fake, messages = asyncio.run(record_channel(args.prompt, Path(workdir)))
        channel_name = fake.channels[fake.channel_id]["name"]
        image = render(fake, messages, channel_name)
    # A palette keeps the PNG small; the screenshot has few colours apart from the images.
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size // 1024} KB, {image.width}x{image.height})")


if __name__ == "__main__":
    main()
