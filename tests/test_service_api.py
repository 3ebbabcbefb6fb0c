"""The generation service end to end: a real aiohttp server on loopback, the tiny model, the client."""

from __future__ import annotations

import asyncio
import base64
import io
import socket

import aiohttp
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from generation.client import ServiceClient, ServiceError
from generation.contract import SAMPLERS, JobRequest, JobState
from generation.pngmeta import read_parameters
from loraloop.cli import cli
from loraloop.config import Secrets


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
    for seed, png in zip((7, 8), pngs, strict=True):
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


async def test_stopping_the_service_ends_open_event_streams_with_a_failure_at_once(service):
    async with ServiceClient(service.url) as client:
        await client.pause()
        accepted = await client.submit(JobRequest(prompt="never runs", steps=2))
        stream = client.events(accepted.id)
        first = await anext(stream)
        assert first.state is JobState.QUEUED
        started = asyncio.get_running_loop().time()
        await service.stop()
        final = [s async for s in stream][-1]
    assert asyncio.get_running_loop().time() - started < 10, "no handler waits out the shutdown timeout"
    assert final.state is JobState.FAILED and "stopped" in final.error.message


def png_b64(size=(64, 64), colour=(20, 120, 220)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_img2img_starts_from_the_init_image_and_batches_like_txt2img(make_service):
    running = await make_service(batch_wait_ms=100)
    blue, red = png_b64(), png_b64((96, 32), (220, 40, 20))  # any size: resized to the request's
    async with ServiceClient(running.url) as client:
        statuses, (from_blue,) = await run_job(client, seed=3, steps=4, init_image=blue, strength=0.5)
        assert statuses[-1].total_steps == 2  # img2img runs strength x steps
        assert statuses[-1].parameters["mode"] == "img2img"
        assert "Denoising strength: 0.5" in read_parameters(from_blue)
        _, (from_red,) = await run_job(client, seed=3, steps=4, init_image=red, strength=0.5)
        _, (plain,) = await run_job(client, seed=3, steps=4)
        await client.pause()
        ids = [(await client.submit(JobRequest(prompt="a red fox", seed=3, steps=4, init_image=image,
                                               strength=0.5, requester=who))).id
               for image, who in ((blue, "a"), (red, "b"))]
        await client.resume()
        batched = []
        for job_id in ids:
            [s async for s in client.events(job_id)]
            batched.append(await client.image(job_id, 0))
    assert running.service.metrics.batched_jobs - running.service.metrics.batches == 1
    assert not np.array_equal(pixels(from_blue), pixels(from_red))
    assert not np.array_equal(pixels(from_blue), pixels(plain))
    assert np.array_equal(pixels(batched[0]), pixels(from_blue))
    assert np.array_equal(pixels(batched[1]), pixels(from_red))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
async def test_every_scheduler_renders_and_is_named_in_the_parameters(service, sampler):
    async with ServiceClient(service.url) as client:
        _, (png,) = await run_job(client, seed=1, steps=2, scheduler=sampler.name, guidance=1.0)
    schedule = f", Schedule type: {sampler.a1111_schedule}," if sampler.a1111_schedule else ","
    assert f"Sampler: {sampler.a1111_sampler}{schedule}" in read_parameters(png)


async def test_a1111_sampler_names_are_accepted_and_mean_what_they_mean_in_a1111(service):
    async with ServiceClient(service.url) as client:
        named = {}
        for name in ("DPM++ 2M Karras", "DPM++ 2M", "dpm++ 2m sgm uniform", "Euler a"):
            statuses, _ = await run_job(client, seed=1, steps=2, scheduler=name, guidance=1.0)
            named[name] = statuses[-1].parameters["scheduler"]
    # A1111 1.9+ reads "DPM++ 2M" alone as its default schedule, Karras.
    assert named == {"DPM++ 2M Karras": "dpmpp_2m_karras", "DPM++ 2M": "dpmpp_2m_karras",
                     "dpm++ 2m sgm uniform": "dpmpp_2m", "Euler a": "euler_a"}


async def test_metrics_count_jobs_images_and_step_latency(service):
    async with ServiceClient(service.url) as client:
        await run_job(client, steps=3, count=2)
    async with aiohttp.ClientSession() as http, http.get(f"{service.url}/metrics") as response:
        text = await response.text()
    assert response.content_type == "text/plain"
    assert 'loraloop_jobs_total{outcome="done"} 1' in text
    assert "loraloop_images_total 2" in text
    assert "loraloop_queue_depth 0" in text
    assert "loraloop_step_seconds_count 3" in text


async def test_prometheus_scrapes_metrics_with_its_own_token_which_opens_nothing_else(make_service):
    from prometheus_client.parser import text_string_to_metric_families

    running = await make_service(token="gpu", metrics_token="scrape")
    async with aiohttp.ClientSession() as http:
        async def status(path: str, token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.get(f"{running.url}{path}", headers=headers) as response:
                return response.status

        assert (await status("/metrics", "gpu"), await status("/metrics", None)) == (200, 401)
        assert await status("/v1/adapters", "scrape") == 401
        async with http.get(f"{running.url}/metrics", headers={"Authorization": "Bearer scrape"}) as response:
            assert response.status == 200
            text = await response.text()
    # Parsed by the Prometheus client's own parser, as a scrape would be.
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {"loraloop_queue_depth", "loraloop_jobs", "loraloop_step_seconds"} <= set(families)
    assert families["loraloop_step_seconds"].type == "histogram"


async def test_imagine_saves_the_images_of_a_running_service(service, tmp_path):
    runner = CliRunner()
    output = tmp_path / "fox.png"
    result = await asyncio.to_thread(
        runner.invoke, cli,
        ["imagine", "a red fox", "--url", service.url, "--steps", "2", "--seed", "4", "--count", "2",
         "-o", str(output)],
    )
    assert result.exit_code == 0, result.output
    for path in (tmp_path / "fox-1.png", tmp_path / "fox-2.png"):
        assert "Seed: " in read_parameters(path.read_bytes())
    assert "Seed: 5," in read_parameters((tmp_path / "fox-2.png").read_bytes())
    # Not a terminal: a line per change of state, never a progress bar's redraws.
    assert "\r" not in result.output and "%|" not in result.output
    assert len(result.output.splitlines()) <= 5, result.output
    assert "generating (2 steps)" in result.output


@pytest.mark.parametrize("command", ["serve", "run"])
def test_a_port_in_use_is_reported_before_the_model_loads(tmp_path, monkeypatch, command):
    monkeypatch.setenv("DISCORD_TOKEN", "not-used")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model that does not exist: reaching it would be a model error, not a port error.
        result = CliRunner().invoke(cli, [command, "--port", str(port), "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in result.output and "--port" in result.output


async def test_imagine_says_when_the_service_is_not_running(tmp_path):
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["imagine", "a fox", "--url", "http://127.0.0.1:9", "-o", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1
    assert "can't be reached" in result.output and "loraloop serve" in result.output


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("weights.ckpt", "pickle checkpoints can run code"),
        ("missing-dir", "Cannot load model"),
        ("missing.safetensors", "no such checkpoint file"),
    ],
)
def test_serve_explains_a_model_it_cannot_load(data_dir, tmp_path, model, words):
    (tmp_path / "weights.ckpt").write_bytes(b"\x80\x04 pretend pickle")
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / model), "--port", "8799"])
    assert result.exit_code == 1, result.output
    assert words in result.output


async def test_loraloop_serve_runs_the_service_until_interrupted(tiny_model_dir, data_dir, monkeypatch):
    import os
    import signal
    import socket
    import stat
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # As in the Docker image: no token set, a token file named; the first start writes it.
    token_file = data_dir / "service_token"
    env = {k: v for k, v in os.environ.items() if k != "LORALOOP_SERVICE_TOKEN"}
    env["LORALOOP_SERVICE_TOKEN_FILE"] = str(token_file)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from loraloop.cli import main; main()", "serve", "--model", str(tiny_model_dir),
        "--port", str(port), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with ServiceClient(f"http://127.0.0.1:{port}") as anonymous:
            for _ in range(240):
                try:
                    health = await anonymous.health()  # /healthz needs no token
                    break
                except ServiceError:
                    await asyncio.sleep(0.25)
            else:
                pytest.fail("loraloop serve did not answer within a minute")
            assert health.model == str(tiny_model_dir)
            with pytest.raises(ServiceError) as refused:
                await anonymous.submit(JobRequest(prompt="x"))
            assert refused.value.http_status == 401
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        # Any client with the same environment (the bot in compose) reads the token from the file.
        monkeypatch.delenv("LORALOOP_SERVICE_TOKEN", raising=False)
        monkeypatch.setenv("LORALOOP_SERVICE_TOKEN_FILE", str(token_file))
        async with ServiceClient(f"http://127.0.0.1:{port}", token=Secrets.from_env().service_token) as client:
            _, (png,) = await run_job(client, steps=1, seed=3)
            assert "Seed: 3," in read_parameters(png)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()[-2000:]
    # Nothing an operator cannot act on: no torchvision notes, no load-time progress bars.
    assert b"torchvision" not in output and b"it/s]" not in output and b"FutureWarning" not in output, output.decode()


async def test_an_sdxl_model_serves_txt2img_and_img2img_and_batches_like_sd(make_service, tiny_sdxl_dir):
    running = await make_service(model=str(tiny_sdxl_dir), batch_wait_ms=100)
    async with ServiceClient(running.url) as client:
        alone = [(await run_job(client, seed=seed, steps=3))[1][0] for seed in (1, 2)]
        _, (varied,) = await run_job(client, seed=1, steps=3, init_image=png_b64(), strength=0.5)
        await client.pause()
        ids = [(await client.submit(JobRequest(prompt="a red fox", seed=seed, steps=3, requester=str(seed)))).id
               for seed in (1, 2)]
        await client.resume()
        together = []
        for job_id in ids:
            [s async for s in client.events(job_id)]
            together.append(await client.image(job_id, 0))
    assert running.service.worker.model.txt2img.__class__.__name__ == "StableDiffusionXLPipeline"
    assert running.service.metrics.batched_jobs - running.service.metrics.batches == 1  # the pair ran as one
    assert not np.array_equal(pixels(alone[0]), pixels(varied))
    for solo, batched in zip(alone, together, strict=True):
        assert np.array_equal(pixels(solo), pixels(batched))
