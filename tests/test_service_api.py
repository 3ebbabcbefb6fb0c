"""The generation service end to end: a real aiohttp server on loopback, the tiny model, the client."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from generation.client import ServiceClient, ServiceError
from generation.contract import JobRequest, JobState
from generation.pngmeta import read_parameters


async def run_job(client: ServiceClient, **fields) -> tuple[list, list[bytes]]:
    accepted = await client.submit(JobRequest.from_dict({"prompt": "a red fox", **fields}))
    statuses = [s async for s in client.events(accepted.id)]
    final = statuses[-1]
    assert final.state is JobState.DONE, final.error
    pngs = [await client.image(accepted.id, image.index) for image in final.images]
    return statuses, pngs


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


async def test_a_job_streams_progress_and_its_pngs_carry_their_parameters(service):
    async with ServiceClient(service.url) as client:
        statuses, pngs = await run_job(client, seed=7, steps=5, count=2, negative_prompt="blurry")
    steps = [s.step for s in statuses if s.state is JobState.RUNNING]
    assert steps and steps == sorted(steps) and max(steps) == 5
    assert any(s.preview for s in statuses), "a preview every preview_every steps"
    assert len(pngs) == 2
    for seed, png in zip((7, 8), pngs):
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        text = read_parameters(png)
        assert text.startswith("a red fox\nNegative prompt: blurry\n")
        assert f"Seed: {seed}," in text and "Steps: 5," in text and "Size: 64x64" in text


async def test_the_same_seed_gives_identical_pixels(service):
    async with ServiceClient(service.url) as client:
        _, first = await run_job(client, seed=11, steps=3)
        _, again = await run_job(client, seed=11, steps=3)
        _, other = await run_job(client, seed=12, steps=3)
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other[0]))


async def test_health_reports_model_device_and_queue(service):
    async with ServiceClient(service.url) as client:
        health = await client.health()
    assert health.status == "ok" and health.device == "cpu" and health.queue_depth == 0


async def test_an_unreachable_service_is_a_clear_error():
    async with ServiceClient("http://127.0.0.1:9") as client:
        with pytest.raises(ServiceError) as error:
            await client.health()
    assert error.value.code == "unavailable" and "http://127.0.0.1:9" in error.value.message


async def test_a_paused_queue_accepts_jobs_but_starts_none_until_resumed(service):
    async with ServiceClient(service.url) as client:
        assert (await client.pause()).paused
        accepted = await client.submit(JobRequest(prompt="waits", steps=2))
        health = await client.health()
        assert health.paused and health.queue_depth == 1
        assert (await client.status(accepted.id)).state is JobState.QUEUED
        assert not (await client.resume()).paused
        final = [s async for s in client.events(accepted.id)][-1]
    assert final.state is JobState.DONE
