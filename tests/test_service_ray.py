"""The Ray backend: the same service front, batches run by worker actors on a real local Ray cluster.

Two CPU worker actors of one thread each, on the tiny model at 32x32 and two steps. The cluster is
the session's (conftest.py `ray_cluster`); the two-worker service is shared by this module's first
tests, and the failover test starts its own, since it kills workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from PIL import Image

from generation.client import ServiceClient
from generation.contract import AdapterRef, JobRequest, JobState, JobStatus
from generation.server import RunningService, start_service
from generation.testing import write_lora
from loraloop.config import Config, Secrets

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

SMALL = dict(steps=2, width=32, height=32)


def ray_config(model_dir: Path, data_dir: Path, **keys) -> Config:
    return Config().replace("service", model=str(model_dir), adapters_dir=str(data_dir / "adapters"), backend="ray",
                            ray_workers=2, ray_cpu_threads=1, default_steps=2, batch_wait_ms=20, **keys)


async def statuses(client: ServiceClient, job_id: str) -> list[JobStatus]:
    return [status async for status in client.events(job_id)]


async def pixels(client: ServiceClient, job_id: str) -> list[np.ndarray]:
    final = (await statuses(client, job_id))[-1]
    assert final.state is JobState.DONE, final.error
    return [np.asarray(Image.open(io.BytesIO(await client.image(job_id, i.index)))) for i in final.images]


async def eventually(check, timeout: float = 120.0) -> None:
    """Wait until `check()` holds: Ray restarts workers and streams events in its own time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "still not so"
        await asyncio.sleep(0.05)


async def settled(running: RunningService) -> None:
    """Every worker idle: a batch's last event (the adapters it holds, its count) comes just after its
    jobs' results, so a client can see a job done a moment before its worker is."""
    await eventually(lambda: not any(w.busy for w in running.service.workers()))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def two_workers(ray_cluster, tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ray-service")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALOOP_DATA_DIR", str(data_dir))
        running = await start_service(ray_config(tiny_model_dir, data_dir, max_steps=400, preview_every=1,
                                                 max_pixel_steps=10_000_000), Secrets(None, None))
        yield running
        await running.stop()


async def test_two_workers_share_sixteen_jobs_fairly_with_the_local_backends_pixels(two_workers, tiny_model_dir,
                                                                                     data_dir):
    requests = [JobRequest(prompt=f"{who} {turn}", seed=10 * turn + i, requester=who, **SMALL)
                for turn in range(4) for i, who in enumerate(("ann", "bob", "cy", "dee"))]
    async with ServiceClient(two_workers.url) as client:
        await client.pause()  # all sixteen queued before the first batch is taken
        ids = [(await client.submit(request)).id for request in requests]
        await client.resume()
        on_ray = [image for job_id in ids for image in await pixels(client, job_id)]
        finals = [await client.status(job_id) for job_id in ids]
        await settled(two_workers)
        health = await client.health()
    assert health.backend == "ray" and [w.name for w in health.workers] == ["ray-0", "ray-1"]
    assert all(worker.alive and worker.batches >= 1 for worker in health.workers)  # both did some
    first_turn, third_turn = finals[:4], finals[8:12]
    assert max(s.started_at for s in first_turn) < min(s.started_at for s in third_turn)

    # The workers run one torch thread each (ray_cpu_threads = 1); so does the local run here, as a
    # different thread count splits CPU sums differently and rounds them differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local = await start_service(Config().replace("service", model=str(tiny_model_dir)), Secrets(None, None))
    try:
        async with ServiceClient(local.url) as client:
            ids = [(await client.submit(request)).id for request in requests]
            on_local = [image for job_id in ids for image in await pixels(client, job_id)]
    finally:
        await local.stop()
        torch.set_num_threads(threads)
    assert len(on_ray) == len(on_local) == 16
    for remote, here in zip(on_ray, on_local, strict=True):
        assert np.array_equal(remote, here)


async def test_an_adapter_published_while_the_workers_run_is_used_by_both(two_workers, tiny_model_dir):
    write_lora(tiny_model_dir, two_workers.adapters_dir / "pixel" / "v1.safetensors", seed=3)
    # Four images fill a batch (max_batch 4): two such jobs are two batches, one for each idle worker.
    styled = JobRequest(prompt="a fox", seed=7, count=4, adapters=(AdapterRef("pixel", 1.0),), **SMALL)
    async with ServiceClient(two_workers.url) as client:
        assert [a.name for a in await client.reload_adapters()] == ["pixel"]
        await client.pause()
        ids = [(await client.submit(dataclasses.replace(styled, requester=who))).id
               for who in ("ann", "bob")]
        await client.resume()
        first, second = [await pixels(client, job_id) for job_id in ids]
        plain = await pixels(client, (await client.submit(JobRequest(prompt="a fox", seed=7, count=4, **SMALL))).id)
        await settled(two_workers)
        health = await client.health()
    assert all("pixel@1" in worker.adapters for worker in health.workers)
    for a, b, base in zip(first, second, plain, strict=True):
        assert np.array_equal(a, b) and not np.array_equal(a, base)


async def test_a_batch_goes_to_the_idle_worker_that_already_holds_its_adapter(two_workers, tiny_model_dir):
    write_lora(tiny_model_dir, two_workers.adapters_dir / "ink" / "v1.safetensors", seed=4)
    ink = JobRequest(prompt="ink", seed=1, adapters=(AdapterRef("ink", 1.0),), **SMALL)
    workers = two_workers.service.backend.workers
    async with ServiceClient(two_workers.url) as client:
        await client.reload_adapters()
        # ray-0 busy with a long job, so the first ink job loads it on ray-1.
        long = await client.submit(JobRequest(prompt="long", steps=400, width=32, height=32, requester="ann"))
        await eventually(lambda: long.id in workers[0].job_ids)
        await pixels(client, (await client.submit(dataclasses.replace(ink, requester="bob"))).id)
        await client.cancel(long.id)
        await settled(two_workers)
        assert [w.name for w in (await client.health()).workers if "ink@1" in w.adapters] == ["ray-1"]
        before = [w.state.batches for w in workers]
        # Both idle now: the lower number would win a tie, the adapter wins first.
        await pixels(client, (await client.submit(dataclasses.replace(ink, requester="cy"))).id)
        await settled(two_workers)
    assert [w.state.batches - b for w, b in zip(workers, before, strict=True)] == [0, 1]


async def test_metrics_show_every_worker_alive_with_its_batches_and_adapters(two_workers):
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    await settled(two_workers)
    async with aiohttp.ClientSession() as session, session.get(f"{two_workers.url}/metrics") as response:
        text = await response.text()
    samples = {(s.name, s.labels.get("worker")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for worker in ("ray-0", "ray-1"):
        assert samples[("loraloop_worker_alive", worker)] == 1
        assert samples[("loraloop_worker_busy", worker)] == 0
        assert samples[("loraloop_worker_batches_total", worker)] >= 1
        assert samples[("loraloop_worker_adapters", worker)] >= 1  # pixel, from the test before
    assert samples[("loraloop_worker_losses_total", None)] == 0


async def test_progress_and_previews_stream_from_the_actor_and_a_cancel_stops_it(two_workers):
    metrics = two_workers.service.metrics
    async with ServiceClient(two_workers.url) as client:
        accepted = await client.submit(JobRequest(prompt="long", steps=400, width=32, height=32))
        async for status in client.events(accepted.id):
            if status.state is JobState.RUNNING and status.step >= 1 and status.preview:
                steps_at_cancel = metrics.step_count
                assert (await client.cancel(accepted.id)).state is JobState.CANCELLED
                break
        await settled(two_workers)
        # Steps already streaming when the cancel arrived still land; the rest of the 400 never run.
        assert metrics.step_count - steps_at_cancel < 400 - 1
        after = await client.submit(JobRequest(prompt="next", **SMALL))
        assert (await statuses(client, after.id))[-1].state is JobState.DONE


async def test_a_worker_lost_mid_batch_has_its_job_finish_elsewhere_and_a_job_lost_twice_fails(
        ray_cluster, tiny_model_dir, data_dir):
    from generation.ray_workers import LOST_TWICE

    running: RunningService = await start_service(
        ray_config(tiny_model_dir, data_dir, max_batch=1, max_steps=400, preview_every=0), Secrets(None, None))
    service, backend = running.service, running.service.backend
    try:
        async with ServiceClient(running.url) as client:
            await client.pause()
            ids = [(await client.submit(JobRequest(prompt=who, seed=i, steps=60, width=32, height=32,
                                                   requester=who))).id for i, who in enumerate(("ann", "bob", "cy"))]
            streams = [asyncio.create_task(statuses(client, job_id)) for job_id in ids]
            await client.resume()

            def running_job(requeues: int) -> tuple[object, str] | None:
                for worker in backend.workers:
                    for job_id in worker.job_ids:
                        job = service.jobs[job_id]
                        if job.requeues == requeues and job.state is JobState.RUNNING and job.step >= 1:
                            return worker, job_id
                return None

            await eventually(lambda: running_job(0) is not None)
            worker, victim = running_job(0)
            ray_cluster.kill(worker.handle, no_restart=False)
            # Back at the front of the queue, the victim runs on the other worker; lose that one too.
            await eventually(lambda: running_job(1) is not None and running_job(1)[1] == victim)
            worker, _ = running_job(1)
            ray_cluster.kill(worker.handle, no_restart=False)
            seen = dict(zip(ids, await asyncio.wait_for(asyncio.gather(*streams), 240), strict=True))
            # Ray restarts both; each joins again once its model has loaded.
            await eventually(lambda: all(w.alive for w in service.workers()), timeout=240)
            after = await client.submit(JobRequest(prompt="after", **SMALL))
            assert (await statuses(client, after.id))[-1].state is JobState.DONE
    finally:
        await running.stop()
    for job_id, stream in seen.items():
        assert [s.state for s in stream].count(stream[-1].state) == 1 and stream[-1].state.finished
        if job_id == victim:
            assert stream[-1].state is JobState.FAILED
            assert stream[-1].error.message == LOST_TWICE.format(job_id=victim)
        else:
            assert stream[-1].state is JobState.DONE and len(stream[-1].images) == 1
    assert service.metrics.worker_losses == 2
    assert service.metrics.images == 2 + 1  # the two survivors' and the one after, each once

