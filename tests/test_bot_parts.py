"""The bot's pure helpers: sizes per aspect, fitting images under Discord's upload limit, requests."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot.imagine import Spec, fit_for_discord
from bot.reactions import Meaning, meanings
from generation.contract import AdapterRef, size_for


def test_aspects_keep_the_short_side_and_round_the_long_one_to_a_multiple_of_8():
    assert size_for("1:1", 512) == (512, 512)
    assert size_for("2:3", 512) == (512, 768)
    assert size_for("3:2", 512) == (768, 512)
    assert size_for("16:9", 512) == (912, 512)
    assert size_for("9:16", 64) == (64, 112)


def noisy_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    info = PngInfo()
    info.add_text("parameters", "a fox\nSteps: 4, Seed: 1")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def test_an_image_under_the_limit_is_posted_unchanged():
    png = noisy_png(32)
    (file,) = fit_for_discord(png, len(png), "job-0")
    assert file.filename == "job-0.png" and file.fp.read() == png


def test_an_image_over_the_limit_is_re_encoded_under_it_never_dropped():
    png = noisy_png(256)  # noise does not compress: about 200 KB
    limit = 40_000
    (file,) = fit_for_discord(png, limit, "job-0")
    data = file.fp.read()
    assert len(data) <= limit
    with Image.open(io.BytesIO(data)) as image:
        assert image.width >= 64, "re-encoding keeps a usable image"


def test_a_spec_becomes_a_request_with_the_style_the_init_image_and_the_requester():
    spec = Spec(prompt="a fox", styles=(AdapterRef("pixel", 0.8),), width=64, height=96, init_image=b"PNG",
                strength=0.4, count=2)
    request = spec.request(requester=42)
    assert request.adapters[0].name == "pixel" and request.adapters[0].weight == 0.8
    assert base64.b64decode(request.init_image) == b"PNG" and request.strength == 0.4
    assert request.requester == "discord:42" and (request.width, request.height, request.count) == (64, 96, 2)
    assert Spec(prompt="a fox", strength=0.4).request(1).strength is None, "no strength without an image"


def test_one_table_maps_emojis_to_votes_and_the_flag():
    table = meanings({"👍": 1, "👎": -1}, "🚩")
    assert table == {"👍": Meaning(vote=1), "👎": Meaning(vote=-1), "🚩": Meaning(flag="nsfw")}
