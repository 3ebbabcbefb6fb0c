"""Scheduling through the real service: batching, fairness, limits and cancellation."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from generation.client import ServiceClient, ServiceError
from generation.contract import JobRequest, JobState


async def finish(client: ServiceClient, job_id: str):
    return [status async for status in client.events(job_id)][-1]


async def images(client: ServiceClient, job_id: str) -> list[np.ndarray]:
    final = await finish(client, job_id)
    assert final.state is JobState.DONE, final.error
    return [np.asarray(Image.open(io.BytesIO(await client.image(job_id, i.index)))) for i in final.images]


JOBS = [("a lighthouse", 1, 1, "ann"), ("a teapot", 2, 2, "bob"), ("a lighthouse", 9, 1, "cy")]


async def test_a_batched_image_is_pixel_identical_to_the_same_image_alone(make_service):
    running = await make_service(max_batch=4, batch_wait_ms=100)
    metrics = running.service.metrics
    async with ServiceClient(running.url) as client:
        await client.pause()  # let all three queue up, so they run as one batch
        ids = [(await client.submit(JobRequest(prompt=p, seed=s, count=n, steps=4, requester=r))).id
               for p, s, n, r in JOBS]
        await client.resume()
        batched = [image for job_id in ids for image in await images(client, job_id)]
        assert (metrics.batches, metrics.batched_jobs) == (1, 3)
        alone = []
        for prompt, seed, count, _ in JOBS:
            for i in range(count):
                job = await client.submit(JobRequest(prompt=prompt, seed=seed + i, steps=4))
                alone.extend(await images(client, job.id))
        assert metrics.batches == 5
    assert len(batched) == len(alone) == 4
    for together, solo in zip(batched, alone, strict=True):
        assert np.array_equal(together, solo)


async def test_incompatible_jobs_are_not_batched_together(make_service):
    running = await make_service(max_batch=4, batch_wait_ms=50)
    async with ServiceClient(running.url) as client:
        await client.pause()
        ids = [(await client.submit(JobRequest(prompt="x", steps=steps, requester=r))).id
               for steps, r in [(2, "a"), (3, "b")]]
        await client.resume()
        for job_id in ids:
            assert (await finish(client, job_id)).state is JobState.DONE
    assert running.service.metrics.batches == 2


async def test_jobs_start_round_robin_across_requesters(make_service):
    running = await make_service(max_batch=1, batch_wait_ms=0)
    order = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]
    async with ServiceClient(running.url) as client:
        await client.pause()
        submitted = {}
        for name, requester in order:
            accepted = await client.submit(JobRequest(prompt=name, steps=1, requester=requester))
            submitted[accepted.id] = name
        assert (await client.status(next(iter(submitted)))).position == 0
        await client.resume()
        finals = [await finish(client, job_id) for job_id in submitted]
    started = sorted(finals, key=lambda status: status.started_at)
    assert [submitted[s.id] for s in started] == ["a1", "b1", "c1", "a2", "b2", "a3"]


async def test_a_full_queue_answers_429_and_a_busy_requester_too(make_service):
    running = await make_service(max_queue=2, max_per_requester=1)
    async with ServiceClient(running.url) as client:
        await client.pause()
        await client.submit(JobRequest(prompt="one", requester="a"))
        with pytest.raises(ServiceError) as busy:
            await client.submit(JobRequest(prompt="two", requester="a"))
        assert (busy.value.http_status, busy.value.code) == (429, "requester_limit")
        await client.submit(JobRequest(prompt="two", requester="b"))
        with pytest.raises(ServiceError) as full:
            await client.submit(JobRequest(prompt="three", requester="c"))
        assert (full.value.http_status, full.value.code) == (429, "queue_full")
        await client.resume()


async def test_cancelling_a_queued_job_removes_it(service):
    async with ServiceClient(service.url) as client:
        await client.pause()
        accepted = await client.submit(JobRequest(prompt="never"))
        assert (await client.cancel(accepted.id)).state is JobState.CANCELLED
        assert (await client.health()).queue_depth == 0
        await client.resume()
        assert (await finish(client, accepted.id)).state is JobState.CANCELLED


async def test_cancelling_a_running_job_stops_it_at_the_next_step(make_service):
    running = await make_service(max_steps=1000, preview_every=0, max_pixel_steps=10_000_000)
    async with ServiceClient(running.url) as client:
        accepted = await client.submit(JobRequest(prompt="long", steps=1000))
        async for status in client.events(accepted.id):
            if status.state is JobState.RUNNING and status.step >= 2:
                await client.cancel(accepted.id)
                break
        final = await asyncio.wait_for(finish(client, accepted.id), timeout=20)
        assert final.state is JobState.CANCELLED and final.step < 1000
        assert (await client.status(accepted.id)).state is JobState.CANCELLED
        after = await client.submit(JobRequest(prompt="next", steps=2))
        assert (await finish(client, after.id)).state is JobState.DONE
    assert running.service.metrics.outcomes["cancelled"] == 1


async def test_finished_jobs_beyond_keep_finished_expire(make_service):
    running = await make_service(keep_finished=1)
    async with ServiceClient(running.url) as client:
        first = await client.submit(JobRequest(prompt="old", steps=1))
        [s async for s in client.events(first.id)]
        second = await client.submit(JobRequest(prompt="new", steps=1))
        [s async for s in client.events(second.id)]
        third = await client.submit(JobRequest(prompt="newer", steps=1))
        with pytest.raises(ServiceError) as expired:
            await client.status(first.id)
        assert expired.value.http_status == 404 and "expired" in expired.value.message
        assert (await client.status(second.id)).state is JobState.DONE
        [s async for s in client.events(third.id)]


async def test_the_event_stream_counts_down_a_queued_jobs_position(make_service, monkeypatch):
    from generation import server

    monkeypatch.setattr(server, "KEEPALIVE_SECONDS", 0.05)  # keep-alive comments must not upset the client
    running = await make_service(max_batch=1, batch_wait_ms=0)
    async with ServiceClient(running.url) as client:
        await client.pause()
        ahead = [(await client.submit(JobRequest(prompt="first", steps=2, requester=r))).id for r in ("a", "b")]
        mine = await client.submit(JobRequest(prompt="mine", steps=2, requester="c"))
        assert mine.position == 2

        async def watch():
            return [status async for status in client.events(mine.id)]

        watching = asyncio.create_task(watch())
        await asyncio.sleep(0.3)  # a few keep-alives while paused
        await client.resume()
        statuses = await watching
        for job_id in ahead:
            await finish(client, job_id)
    positions = [s.position for s in statuses if s.state is JobState.QUEUED]
    assert positions[0] == 2 and positions[-1] == 0 and positions == sorted(positions, reverse=True)
    assert statuses[-1].state is JobState.DONE


async def test_cancelling_one_job_of_a_running_batch_lets_the_others_finish(make_service):
    running = await make_service(batch_wait_ms=100)
    async with ServiceClient(running.url) as client:
        await client.pause()
        doomed, kept = [(await client.submit(JobRequest(prompt="pair", steps=40, seed=s, requester=r))).id
                        for s, r in ((1, "a"), (2, "b"))]
        await client.resume()
        async for status in client.events(doomed):
            if status.state is JobState.RUNNING:
                assert (await client.cancel(doomed)).state is JobState.CANCELLED
                break
        assert (await finish(client, kept)).state is JobState.DONE
        assert (await client.status(doomed)).state is JobState.CANCELLED
    assert running.service.metrics.batches == 1


async def test_a_cancelled_job_stops_at_the_next_step_even_across_its_chunks(make_service):
    # Four images, one per pipeline call: the old interrupt flag ended only the running call,
    # then ran a step and a VAE decode of each of the other three.
    running = await make_service(max_batch=1, max_steps=200, preview_every=0, max_pixel_steps=10_000_000)
    async with ServiceClient(running.url) as client:
        accepted = await client.submit(JobRequest(prompt="long", steps=200, count=4))
        async for status in client.events(accepted.id):
            if status.state is JobState.RUNNING and status.step >= 1:
                await client.cancel(accepted.id)
                break
        steps_at_cancel = running.service.metrics.step_count
        after = await client.submit(JobRequest(prompt="next", steps=1))
        assert (await asyncio.wait_for(finish(client, after.id), timeout=20)).state is JobState.DONE
    # The step under way when the cancel arrived may finish; no other step of the job runs.
    assert running.service.metrics.step_count - steps_at_cancel <= 2
