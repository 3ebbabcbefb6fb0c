"""The service's routes and checks beyond jobs: POST /v1/describe (the captioner) and the image
safety verdict. The real service on 127.0.0.1 with the tiny model, the tiny BLIP and a tiny
random safety checker, each saved with save_pretrained and loaded as users load theirs."""

from __future__ import annotations

import base64
import io

import aiohttp
import pytest
from PIL import Image

from loraloop.config import Config, Secrets

pytestmark = pytest.mark.timeout(120)


def png_base64(size: int = 40) -> str:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (120, 40, 200)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture
async def start(tiny_model_dir, data_dir):
    from generation.server import start_service

    started = []

    async def run(dataset: dict | None = None, **service):
        config = (Config().replace("service", model=str(tiny_model_dir), device="cpu", default_steps=2,
                                   batch_wait_ms=20, **service)
                  .replace("dataset", **(dataset or {})))
        running = await start_service(config, Secrets(discord_token=None, service_token=None))
        started.append(running)
        return running

    yield run
    for running in started:
        await running.stop()


async def post(url: str, body: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


async def test_describe_captions_an_image_with_the_configured_model(start, tiny_blip_dir):
    running = await start(dataset={"caption_model": str(tiny_blip_dir), "caption_device": "cpu"})
    status, body = await post(f"{running.url}/v1/describe", {"image": png_base64()})
    assert status == 200 and isinstance(body["caption"], str) and body["caption"].strip()


async def test_describe_refuses_bad_input_with_clear_errors(start, tiny_blip_dir):
    running = await start(dataset={"caption_model": str(tiny_blip_dir)}, max_image_pixels=1000)
    url = f"{running.url}/v1/describe"
    for body, code, words in (
        ({"image": "***"}, "invalid_image", "not valid base64"),
        ({"image": base64.b64encode(b"GIF89a...").decode()}, "invalid_image", "'image' is refused"),
        ({"image": png_base64(40)}, "invalid_image", "'image' is refused"),  # 1600 pixels: over 1000
        ({}, "invalid_request", "'image' is required"),
        ({"image": png_base64(), "prompt": "x"}, "invalid_request", "Unknown field"),
    ):
        status, answer = await post(url, body)
        assert (status, answer["error"]["code"]) == (400, code), body
        assert words in answer["error"]["message"]


async def test_describe_without_a_loadable_captioner_says_so(start, tmp_path):
    running = await start(dataset={"caption_model": str(tmp_path / "no-such-model")})
    status, answer = await post(f"{running.url}/v1/describe", {"image": png_base64()})
    assert status == 503 and answer["error"]["code"] == "captioner_unavailable"
    assert str(tmp_path) not in answer["error"]["message"], "no server path reaches the client"


# ---- the safety verdict -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_safety_dir(tmp_path_factory) -> str:
    from loraloop.tiny import tiny_safety_checker_path

    return str(tiny_safety_checker_path(tmp_path_factory.mktemp("tiny-safety-data")))


async def verdicts(running, count: int = 2) -> list:
    from generation.client import ServiceClient
    from generation.contract import JobRequest

    async with ServiceClient(running.url) as client:
        accepted = await client.submit(JobRequest(prompt="a fox", count=count, width=64, height=64, seed=3))
        async for status in client.events(accepted.id):
            if status.state.finished:
                assert status.state.value == "done", status.error
                return [image.nsfw for image in status.images]
    raise AssertionError("the event stream ended early")


async def test_each_image_carries_the_safety_checkers_verdict(start, tiny_safety_dir):
    assert await verdicts(await start()) == [None, None], "no checker configured: unchecked"
    assert await verdicts(await start(safety_checker=tiny_safety_dir)) == [False, False]
    # A stricter adjustment raises every concept's score: at 2, the tiny checker flags everything.
    assert await verdicts(await start(safety_checker=tiny_safety_dir, safety_adjustment=2.0)) == [True, True]


async def test_a_safety_checker_that_does_not_load_stops_the_service_at_start(start, tmp_path):
    from generation.safety import SafetyCheckerUnavailable

    with pytest.raises(SafetyCheckerUnavailable, match="cannot load the safety checker"):
        await start(safety_checker=str(tmp_path / "missing"))
