"""The `parameters` PNG chunk in the AUTOMATIC1111 format."""

from PIL import Image

from generation.pngmeta import ImageParameters, encode_png, read_parameters


def test_parameters_are_written_the_way_a1111_writes_them():
    parameters = ImageParameters(
        prompt="a red fox", negative_prompt="blurry", steps=25, guidance=7.0, seed=42, width=512, height=768,
        scheduler="euler_a", model="sd15", adapters=(("pixel@2", 0.8, "0123456789abcdef"),), strength=0.6,
    )
    assert parameters.to_a1111() == (
        "a red fox <lora:pixel@2:0.8>\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model: sd15, "
        'Denoising strength: 0.6, Lora hashes: "pixel@2: 0123456789ab"'
    )


def test_a_png_round_trips_its_parameters_and_has_no_negative_line_when_empty():
    parameters = ImageParameters("a cat", "", 4, 1.5, 7, 8, 8, "dpmpp_2m", "tiny")
    png = encode_png(Image.new("RGB", (8, 8)), parameters)
    assert read_parameters(png) == "a cat\nSteps: 4, Sampler: DPM++ 2M, CFG scale: 1.5, Seed: 7, Size: 8x8, Model: tiny"


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
