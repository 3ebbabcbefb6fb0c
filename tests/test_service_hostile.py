"""Hostile requests to the real service: each one answered with a 4xx a person understands, never a
500, a hang or a leak, and the service keeps serving."""

from __future__ import annotations

import asyncio
import base64
import io
import logging

import aiohttp
import pytest
from PIL import Image

from generation.client import ServiceClient, ServiceError
from generation.contract import JobRequest, JobState
from generation.testing import write_lora


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(format: str, size=(64, 64), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buffer, format=format, **options)
    return buffer.getvalue()


async def post(url: str, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/v1/jobs", data=body, headers={"Content-Type": "application/json"}) as response:
        return response.status, (await response.json())["error"]


async def finish(client: ServiceClient, job_id: str):
    return [status async for status in client.events(job_id)][-1]


# (what, raw body, words the message must contain): each used to be a 500 or a 202 that failed later.
UNPARSEABLE = [
    ("a 5000-digit integer", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "too many digits"),
    ("nesting 100,000 deep", b'{"prompt": "x", "adapters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "too deeply"),
    ("NaN", b'{"prompt": "x", "guidance": NaN}', "NaN is not a JSON number"),
    ("Infinity", b'{"prompt": "x", "guidance": -Infinity}', "-Infinity is not a JSON number"),
    ("a float past the largest double", b'{"prompt": "x", "guidance": 1e999}', "too large"),
    ("an integer past any field", b'{"prompt": "x", "steps": 100000000000000000000}', "'steps' is far out of range"),
    # Found by tests/test_fuzz.py: an integer past a double's range, where a float field converts it.
    ("an integer past a double", b'{"prompt": "x", "guidance": 1' + b"0" * 400 + b"}",
     "'guidance' is far out of range"),
    ("an adapter weight past a double", b'{"prompt": "x", "adapters": [{"name": "style", "weight": 1' + b"0" * 400
     + b"}]}", "'weight' is far out of range"),
    ("a lone surrogate in the prompt", b'{"prompt": "fox \\ud800"}', "'prompt' is not valid Unicode"),
    ("a lone surrogate in the negative prompt", b'{"prompt": "fox", "negative_prompt": "\\udfff"}',
     "'negative_prompt' is not valid Unicode"),
    ("an adapter name with a trailing newline", b'{"prompt": "x", "adapters": [{"name": "style\\n"}]}',
     "is not valid"),
    ("a version in other digits", b'{"prompt": "x", "adapters": [{"name": "style@\xc2\xb2"}]}', "is not valid"),
]


async def test_bodies_the_json_parser_rejects_or_chokes_on_are_400s_and_the_service_keeps_serving(make_service,
                                                                                                 tiny_model_dir):
    running = await make_service()
    write_lora(tiny_model_dir, running.adapters_dir / "style" / "v1.safetensors")
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        for what, body, words in UNPARSEABLE:
            status, error = await post(running.url, body)
            assert status == 400, (what, status, error)
            assert words in error["message"], (what, error["message"])
        accepted = await client.submit(JobRequest(prompt="still here", steps=1))
        assert (await finish(client, accepted.id)).state is JobState.DONE
    assert len(running.service.jobs) == 1  # nothing above was ever queued


async def test_image_indexes_are_ascii_digits_only(service):
    async with ServiceClient(service.url) as client:
        accepted = await client.submit(JobRequest(prompt="one", steps=1))
        await finish(client, accepted.id)
    async with aiohttp.ClientSession() as http:
        for index in ("²", "٣", "0x0", "-0", " 0"):
            async with http.get(f"{service.url}/v1/jobs/{accepted.id}/images/{index}") as response:
                assert response.status == 404, index
                assert (await response.json())["error"]["code"] == "not_found"
        async with http.get(f"{service.url}/v1/jobs/{accepted.id}/images/0") as response:
            assert response.status == 200


async def test_a_body_that_trickles_in_is_cut_off_after_the_read_timeout(make_service):
    running = await make_service(read_timeout_s=0.5)
    host, port = running.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    await writer.drain()
    # Without the timeout the service waits for the other 990 bytes for as long as the client likes.
    answer = await asyncio.wait_for(reader.read(), timeout=10)  # read() returns once the server closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    async with ServiceClient(running.url) as client:
        assert (await client.health()).status == "ok"


async def test_a_full_queue_refuses_an_img2img_job_before_decoding_its_image(make_service):
    running = await make_service(max_queue=1)
    async with ServiceClient(running.url) as client:
        await client.pause()
        await client.submit(JobRequest(prompt="waiting", steps=1))
        # An init image that would fail to decode: a 429 (not a 400) shows it was never decoded.
        with pytest.raises(ServiceError) as refused:
            await client.submit(JobRequest(prompt="x", init_image=b64(b"not an image at all")))
        assert (refused.value.http_status, refused.value.code) == (429, "queue_full")
        await client.resume()


async def test_a_job_over_the_work_budget_is_refused_at_submission(make_service):
    running = await make_service(max_steps=1000)
    async with ServiceClient(running.url) as client:
        # The CPU's default budget: 1,000,000 pixel-steps. 8x131072 passes max_pixels but not this.
        for request in (JobRequest(prompt="x", width=8, height=131072, steps=25),
                        JobRequest(prompt="x", width=64, height=64, steps=100, count=4)):
            with pytest.raises(ServiceError) as refused:
                await client.submit(request)
            assert refused.value.http_status == 400
            assert "pixel-steps; this service allows 1000000 per job" in refused.value.message
        accepted = await client.submit(JobRequest(prompt="x", width=64, height=64, steps=4, count=4))
        assert (await finish(client, accepted.id)).state is JobState.DONE
    custom = await make_service(max_pixel_steps=100_000)
    async with ServiceClient(custom.url) as client:
        with pytest.raises(ServiceError, match="allows 100000 per job"):
            await client.submit(JobRequest(prompt="x", steps=25))


@pytest.mark.parametrize("format", ["TIFF", "BMP", "GIF", "ICO", "PCX", "EPS"])
def test_init_images_are_png_jpeg_or_webp_only(format):
    from generation.images import ImageRefused, decode_untrusted

    data = encoded(format)
    with pytest.raises(ImageRefused, match=r"not an image in an accepted format \(PNG, JPEG or WebP\)"):
        decode_untrusted(data, 1_000_000)
    for accepted in ("PNG", "JPEG", "WEBP"):
        image, size = decode_untrusted(encoded(accepted), 1_000_000)
        assert size == (64, 64) and image.size == (64, 64)


async def test_the_service_refuses_other_formats_and_images_over_its_pixel_cap(make_service):
    running = await make_service(max_image_pixels=5000)
    async with ServiceClient(running.url) as client:
        for data, words in ((encoded("TIFF"), "(PNG, JPEG or WebP)"),
                            (encoded("PNG", size=(80, 80)), "80x80: at most 5000 pixels")):
            with pytest.raises(ServiceError) as refused:
                await client.submit(JobRequest(prompt="x", init_image=b64(data)))
            assert (refused.value.http_status, refused.value.code) == (400, "invalid_image")
            assert words in refused.value.message
        accepted = await client.submit(JobRequest(prompt="x", steps=2, init_image=b64(encoded("WEBP"))))
        assert (await finish(client, accepted.id)).state is JobState.DONE


async def test_a_client_leaving_the_event_stream_is_a_debug_line_not_an_error(service, caplog):
    caplog.set_level(logging.DEBUG)
    async with ServiceClient(service.url) as client:
        await client.pause()
        accepted = await client.submit(JobRequest(prompt="waiting", steps=1))
        async with aiohttp.ClientSession() as http:
            response = await http.get(f"{service.url}/v1/jobs/{accepted.id}/events")
            await response.content.readline()
            response.close()  # drop the connection mid-stream
        await client.resume()
        assert (await finish(client, accepted.id)).state is JobState.DONE
    await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert f"job {accepted.id}: event stream closed by the client" in caplog.text


async def test_errors_never_show_server_paths_or_exception_text(make_service, tiny_model_dir):
    import torch
    from safetensors.torch import load_file, save_file

    running = await make_service()
    lora = write_lora(tiny_model_dir, running.adapters_dir / "source.safetensors")
    tensors = {key: torch.randn(value.shape[0], value.shape[1] * 2) if "lora_A" in key else value
               for key, value in load_file(lora).items()}
    save_file(tensors, str(running.adapters_dir / "wide.safetensors"))
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        accepted = await client.submit(JobRequest.from_dict({"prompt": "x", "steps": 1,
                                                             "adapters": [{"name": "wide"}]}))
        final = await finish(client, accepted.id)
    assert final.state is JobState.FAILED
    message = final.error.message
    assert "wide does not fit this model" in message and accepted.id in message
    assert str(running.adapters_dir) not in message and "safetensors" not in message
    assert "size mismatch" not in message  # torch's own words stay in the log


async def test_a_forged_prompt_stays_on_one_line_of_the_png_and_whole_in_the_job(service):
    from generation.pngmeta import read_parameters

    prompt = "fox\nSteps: 999, Seed: 1\nNegative prompt: evil"
    async with ServiceClient(service.url) as client:
        accepted = await client.submit(JobRequest(prompt=prompt, seed=5, steps=1))
        final = await finish(client, accepted.id)
        text = read_parameters(await client.image(accepted.id, 0))
    assert final.parameters["prompt"] == prompt  # loraloop's own record keeps the true text
    prompt_line, fields_line = text.split("\n")
    assert prompt_line == "fox Steps: 999, Seed: 1 Negative prompt: evil"
    assert "Seed: 5" in fields_line and "Steps: 1," in fields_line
