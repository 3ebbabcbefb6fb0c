"""Every kind of bad input gets a 4xx JSON error a person understands, and the service keeps serving."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import aiohttp
import pytest
from PIL import Image

from generation.client import ServiceClient, ServiceError
from generation.contract import JobRequest, JobState
from generation.testing import write_lora


def png_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header claims a huge size: decoding it would need tens of gigabytes."""
    data = bytearray(png_bytes((8, 8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD_IMAGE = b64(png_bytes())

# (what is wrong, JSON body, HTTP status, error code, words the message must contain)
BAD_JOBS = [
    ("missing prompt", {}, 400, "invalid_request", "'prompt' is required"),
    ("empty prompt", {"prompt": "   "}, 400, "invalid_request", "'prompt' is required"),
    ("prompt too long", {"prompt": "x" * 1001}, 400, "invalid_request", "limit is 1000"),
    ("negative prompt too long", {"prompt": "x", "negative_prompt": "y" * 1001}, 400, "invalid_request",
     "negative prompt is 1001 characters"),
    ("requester too long", {"prompt": "x", "requester": "r" * 201}, 400, "invalid_request", "at most 200"),
    ("prompt not a string", {"prompt": 5}, 400, "invalid_request", "must be a string"),
    ("unknown field", {"prompt": "x", "stpes": 3}, 400, "invalid_request", "Unknown field(s): stpes"),
    ("zero steps", {"prompt": "x", "steps": 0}, 400, "invalid_request", "'steps' must be between 1 and 80"),
    ("too many steps", {"prompt": "x", "steps": 81}, 400, "invalid_request", "'steps' must be between 1 and 80"),
    ("fractional steps", {"prompt": "x", "steps": 2.5}, 400, "invalid_request", "'steps' must be a whole number"),
    ("negative guidance", {"prompt": "x", "guidance": -1}, 400, "invalid_request", "'guidance' must be between"),
    ("huge guidance", {"prompt": "x", "guidance": 31}, 400, "invalid_request", "'guidance' must be between"),
    ("zero count", {"prompt": "x", "count": 0}, 400, "invalid_request", "'count' must be between 1 and 4"),
    ("big count", {"prompt": "x", "count": 5}, 400, "invalid_request", "'count' must be between 1 and 4"),
    ("bad seed", {"prompt": "x", "seed": -1}, 400, "invalid_request", "'seed' must be between"),
    ("width not /8", {"prompt": "x", "width": 65}, 400, "invalid_request", "multiple of 8"),
    ("height not /8", {"prompt": "x", "height": 100}, 400, "invalid_request", "multiple of 8"),
    ("too many pixels", {"prompt": "x", "width": 2048, "height": 2048}, 400, "invalid_request", "the limit is"),
    ("unknown scheduler", {"prompt": "x", "scheduler": "plms"}, 400, "unknown_scheduler", "dpmpp_2m"),
    ("unknown adapter", {"prompt": "x", "adapters": [{"name": "nope"}]}, 400, "unknown_adapter",
     "Available adapters: style"),
    ("adapter weight", {"prompt": "x", "adapters": [{"name": "style", "weight": 5}]}, 400, "invalid_request",
     "weight of adapter style"),
    ("adapter twice", {"prompt": "x", "adapters": [{"name": "style"}, {"name": "style@1"}]}, 400,
     "invalid_request", "once"),
    ("adapter not an object", {"prompt": "x", "adapters": ["style"]}, 400, "invalid_request", '{"name"'),
    ("strength too high", {"prompt": "x", "init_image": GOOD_IMAGE, "strength": 1.5}, 400, "invalid_request",
     "'strength' must be between 0 and 1"),
    ("strength runs no step", {"prompt": "x", "init_image": GOOD_IMAGE, "strength": 0.01, "steps": 4}, 400,
     "invalid_request", "runs no step"),
    ("strength without image", {"prompt": "x", "strength": 0.5}, 400, "invalid_request", "init_image"),
    ("init image not base64", {"prompt": "x", "init_image": "***"}, 400, "invalid_image", "not valid base64"),
    ("init image not an image", {"prompt": "x", "init_image": b64(b"hello, world")}, 400, "invalid_image",
     "not an image"),
    ("init image truncated", {"prompt": "x", "init_image": b64(png_bytes()[:-40])}, 400, "invalid_image",
     "truncated"),
    ("decompression bomb", {"prompt": "x", "init_image": b64(bomb_png())}, 400, "invalid_image", "at most"),
]


async def test_every_bad_job_gets_a_4xx_json_error_and_the_service_keeps_serving(make_service, tiny_model_dir):
    running = await make_service()
    write_lora(tiny_model_dir, running.adapters_dir / "style" / "v1.safetensors")
    async with aiohttp.ClientSession() as http, ServiceClient(running.url) as client:
        await client.reload_adapters()
        for what, body, status, code, words in BAD_JOBS:
            async with http.post(f"{running.url}/v1/jobs", json=body) as response:
                error = (await response.json())["error"]
                assert (response.status, error["code"]) == (status, code), (what, error)
                assert words in error["message"], (what, error["message"])
        accepted = await client.submit(JobRequest(prompt="still here", steps=2))
        final = [s async for s in client.events(accepted.id)][-1]
    assert final.state is JobState.DONE
    assert running.service.queue.depth() == 0 and len(running.service.jobs) == 1


async def test_malformed_bodies_get_json_errors(make_service):
    running = await make_service(max_body_bytes=4096)
    url = f"{running.url}/v1/jobs"
    cases = [
        ("broken JSON", dict(data=b'{"prompt": ', headers={"Content-Type": "application/json"}), 400,
         "invalid_request", "not valid JSON"),
        ("not an object", dict(json=["a prompt"]), 400, "invalid_request", "must be a JSON object"),
        ("wrong content type", dict(data=b"prompt=fox", headers={"Content-Type": "application/x-www-form-urlencoded"}),
         415, "unsupported_media_type", "application/json"),
        ("body too large", dict(json={"prompt": "x", "init_image": b64(b"\0" * 8000)}), 413, "payload_too_large",
         "4096-byte limit"),
    ]
    async with aiohttp.ClientSession() as http:
        for what, kwargs, status, code, words in cases:
            async with http.post(url, **kwargs) as response:
                error = (await response.json())["error"]
                assert (response.status, error["code"]) == (status, code), (what, error)
                assert words in error["message"], what
        async with http.get(f"{running.url}/v2/everything") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
        async with http.put(url) as response:
            assert response.status == 405 and "POST" in (await response.json())["error"]["message"]


async def test_unknown_jobs_and_images_are_404(service):
    async with ServiceClient(service.url) as client:
        for call in (client.status("nope"), client.cancel("nope"), client.image("nope", 0)):
            with pytest.raises(ServiceError) as missing:
                await call
            assert (missing.value.http_status, missing.value.code) == (404, "not_found")
        accepted = await client.submit(JobRequest(prompt="one image", steps=1))
        [s async for s in client.events(accepted.id)]
        with pytest.raises(ServiceError) as no_such_image:
            await client.image(accepted.id, 1)
        assert no_such_image.value.http_status == 404 and "images 0 to 0" in no_such_image.value.message


async def test_a_token_is_required_when_one_is_set(make_service):
    running = await make_service(token="s3cret")
    for token in (None, "wrong"):
        async with ServiceClient(running.url, token=token) as client:
            with pytest.raises(ServiceError) as refused:
                await client.submit(JobRequest(prompt="x"))
            assert (refused.value.http_status, refused.value.code) == (401, "unauthorized")
            with pytest.raises(ServiceError):
                await client.adapters()
            assert (await client.health()).status == "ok"  # probes need no token
    async with aiohttp.ClientSession() as http, http.get(f"{running.url}/metrics") as response:
        assert response.status == 401
    async with ServiceClient(running.url, token="s3cret") as client:
        accepted = await client.submit(JobRequest(prompt="x", steps=1))
        assert [s async for s in client.events(accepted.id)][-1].state is JobState.DONE
