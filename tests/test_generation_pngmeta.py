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
