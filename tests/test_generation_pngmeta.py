"""The `parameters` PNG chunk, read back the way AUTOMATIC1111 reads it.

`parse_a1111` follows A1111's documented infotext layout (modules/infotext_utils.py,
`parse_generation_parameters`): the prompt lines, then an optional "Negative prompt:" line, then a
last line of `Key: value` pairs separated by commas, where a value holding commas is quoted.
"""

import json
import re

from PIL import Image

from generation.contract import SAMPLERS
from generation.pngmeta import ImageParameters, encode_png, read_parameters

# One `Key: value` pair of the last line: a quoted value may hold commas and colons.
_PAIR = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        fields[key] = json.loads(value) if value.startswith('"') else value.strip()
    return fields


def lora_hashes(fields: dict[str, str]) -> dict[str, str]:
    """A1111's `Lora hashes` field, "name: hash, name: hash", as a dict."""
    return dict(pair.split(": ") for pair in fields["Lora hashes"].split(", "))


def test_parameters_are_written_the_way_a1111_writes_them():
    parameters = ImageParameters(
        prompt="a red fox", negative_prompt="blurry", steps=25, guidance=7.0, seed=42, width=512, height=768,
        scheduler="euler_a", model="sd15", adapters=(("pixel@2", 0.8, "0123456789abcdef"),), strength=0.6,
        model_hash="6ce0161689",
    )
    assert parameters.to_a1111() == (
        "a red fox <lora:pixel@2:0.8>\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 42, Size: 512x768, "
        'Model hash: 6ce0161689, Model: sd15, Denoising strength: 0.6, Lora hashes: "pixel@2: 0123456789ab"'
    )


def test_a_png_round_trips_its_parameters_and_has_no_negative_line_when_empty():
    parameters = ImageParameters("a cat", "", 4, 1.5, 7, 8, 8, "ddim", "tiny")
    png = encode_png(Image.new("RGB", (8, 8)), parameters)
    assert read_parameters(png) == "a cat\nSteps: 4, Sampler: DDIM, CFG scale: 1.5, Seed: 7, Size: 8x8, Model: tiny"


def test_every_scheduler_names_its_a1111_sampler_and_schedule_type():
    for sampler in SAMPLERS:
        png = encode_png(Image.new("RGB", (8, 8)), ImageParameters("a cat", "", 4, 7.0, 1, 8, 8, sampler.name, "m"))
        fields = parse_a1111(read_parameters(png) or "")
        assert fields["Sampler"] == sampler.a1111_sampler
        # A1111 reads a missing schedule type as the sampler's default ("Automatic"): say it whenever it has one.
        assert fields.get("Schedule type", "") == sampler.a1111_schedule
    assert {s.a1111_schedule for s in SAMPLERS if s.a1111_sampler == "DPM++ 2M"} == {"SGM Uniform", "Karras"}


def test_several_lora_hashes_survive_a1111s_parser():
    parameters = ImageParameters("a castle", "", 20, 7.0, 3, 64, 64, "dpmpp_2m_karras", "tiny",
                                 adapters=(("pixel", 0.8, "a" * 64), ("ink@2", -0.5, "b" * 64)))
    fields = parse_a1111(parameters.to_a1111())
    assert fields["Prompt"] == "a castle <lora:pixel:0.8> <lora:ink@2:-0.5>"
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert lora_hashes(fields) == {"pixel": "a" * 12, "ink@2": "b" * 12}



def a1111_fields(text: str) -> tuple[list[str], dict[str, str]]:
    """The lines A1111 reads as prompt and negative prompt, and the fields of its last line, as it parses them."""
    *text_lines, last = text.split("\n")
    fields = dict(part.split(": ", 1) for part in last.split(", ") if ": " in part)
    return text_lines, fields


def test_line_breaks_and_control_characters_in_prompts_cannot_forge_fields():
    forged = "fox\nSteps: 999, Seed: 1\nNegative prompt: evil"
    for breaker in ("\n", "\r", "\r\n", "\x85", "\u2028", "\u2029", "\x0b", "\x1b"):
        prompt = forged.replace("\n", breaker)
        parameters = ImageParameters(prompt, f"blur{breaker}Seed: 3", 4, 7.0, 42, 64, 64, "ddim", "tiny")
        text = read_parameters(encode_png(Image.new("RGB", (8, 8)), parameters))
        lines, fields = a1111_fields(text)
        assert len(lines) == 2, repr(breaker)  # the prompt, and the one negative prompt line
        assert lines[0].startswith("fox ") and "Steps: 999" in lines[0]
        assert " ".join(lines[1].split()) == "Negative prompt: blur Seed: 3"
        assert (fields["Steps"], fields["Seed"]) == ("4", "42")
