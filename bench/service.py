"""Benchmark: what the generation service costs on top of the bare diffusers pipeline.

    OMP_NUM_THREADS=1 .venv/bin/python bench/service.py   # tiny model, CPU or GPU, ~4 minutes on 2 cores
    .venv/bin/python bench/service.py --sd15          # + SD 1.5 architecture, 512x512, 25 steps, fp16 (GPU)

Ratios, all measured in one run on the same machine (lower is better):
  (a) one job at a time through the service (HTTP submit, SSE progress, PNG fetch) vs the same
      pipeline call made directly; goal <= 1.10
  (b) 8 compatible jobs submitted at once through the service vs 8 sequential direct calls;
      goal: within 10% of the pipeline's own batch-of-8 vs 8-sequential ratio
  (c) 8 sequential jobs alternating two LoRA adapters vs the same 8 with one adapter; goal <= 1.05

The direct baseline is a plain `StableDiffusionPipeline` (none of the service's batch-invariance
changes), so (a) and (b) include their cost too.

--sd15 builds an SD 1.5-architecture pipeline from the configs in bench/sd15/ with random weights
(random weights cost the same to run; no download) and reports images per second at
512x512, 25 steps, fp16, batch 1 and batch 8 through the service; goal >= 3 images/s on an H100.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from generation.client import ServiceClient  # noqa: E402
from generation.contract import AdapterRef, JobRequest, JobState  # noqa: E402
from generation.server import start_service  # noqa: E402
from generation.testing import write_lora  # noqa: E402
from loraloop.config import Config, Secrets  # noqa: E402
from loraloop.tiny import tiny_model_path  # noqa: E402

SD15_CONFIGS = Path(__file__).resolve().parent / "sd15"


def direct_pipeline(model_dir: Path, device: str):
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct_call(pipe, prompts: list[str], seeds: list[int], steps: int, size: int) -> float:
    start = time.perf_counter()
    pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
         generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pil")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


async def service_job(client: ServiceClient, request: JobRequest) -> None:
    accepted = await client.submit(request)
    final = None
    async for final in client.events(accepted.id):  # noqa: B007  the last status is the one kept
        pass
    assert final is not None and final.state is JobState.DONE, final
    for image in final.images:
        await client.image(accepted.id, image.index)


async def timed(coroutine) -> float:
    start = time.perf_counter()
    await coroutine
    return time.perf_counter() - start


async def run_tiny(args: argparse.Namespace, data_dir: Path) -> dict:
    model_dir = tiny_model_path(data_dir)
    adapters_dir = data_dir / "adapters"
    write_lora(model_dir, adapters_dir / "alpha" / "v1.safetensors", seed=1)
    write_lora(model_dir, adapters_dir / "beta" / "v1.safetensors", seed=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps, size = args.steps, 64
    pipe = direct_pipeline(model_dir, device)
    direct_call(pipe, ["warm up"], [0], steps, size)

    config = Config().replace("service", model=str(model_dir), max_batch=8, max_per_requester=16,
                              preview_every=0, default_steps=steps)
    running = await start_service(config, Secrets(None, None))
    results: dict = {"device": device, "steps": steps, "size": size}
    try:
        async with ServiceClient(running.url, timeout=600) as client:
            def request(seed: int, adapters: tuple = (), requester: str = "bench") -> JobRequest:
                return JobRequest(prompt="a lighthouse at dusk", seed=seed, steps=steps, width=size, height=size,
                                  guidance=7.0, adapters=adapters, requester=requester)

            await service_job(client, request(0))  # warm up

            # (a) sequential, one job at a time; alternate direct and service runs so load drifts hit both
            direct, service = [], []
            for i in range(args.repeats):
                direct.append(direct_call(pipe, ["a lighthouse at dusk"], [i], steps, size))
                service.append(await timed(service_job(client, request(i))))
            results["a_direct_s"] = statistics.median(direct)
            results["a_service_s"] = statistics.median(service)
            results["a_ratio"] = results["a_service_s"] / results["a_direct_s"]

            # (b) 8 compatible jobs at once vs 8 sequential direct calls, vs the pipeline's own batch of 8
            # (medians of `--rounds` interleaved rounds each; the service's own pipeline, with its batch-invariance
            # changes, is timed directly too, to split their cost from the HTTP/queue overhead)
            service_pipe = running.service.worker.model.txt2img
            prompts8, seeds8 = ["a lighthouse at dusk"] * 8, list(range(8))
            sequential, batch8, invariant8, concurrent = [], [], [], []
            for _ in range(args.rounds):
                sequential.append(sum(direct_call(pipe, prompts8[:1], [i], steps, size) for i in range(8)))
                batch8.append(direct_call(pipe, prompts8, seeds8, steps, size))
                invariant8.append(await asyncio.to_thread(direct_call, service_pipe, prompts8, seeds8, steps, size))
                concurrent.append(await timed(asyncio.gather(*(service_job(client, request(i, requester=f"r{i}"))
                                                               for i in range(8)))))
            sequential, batch8, invariant8, concurrent = map(statistics.median,
                                                             (sequential, batch8, invariant8, concurrent))
            results.update(b_sequential_s=sequential, b_pipeline_batch8_s=batch8,
                           b_invariant_pipeline_batch8_s=invariant8, b_service_concurrent_s=concurrent,
                           b_pipeline_ratio=batch8 / sequential, b_service_ratio=concurrent / sequential)
            results["b_service_vs_pipeline"] = results["b_service_ratio"] / results["b_pipeline_ratio"]

            # (c) alternating two adapters vs one adapter, sequential jobs
            alpha, beta = (AdapterRef("alpha", 0.8),), (AdapterRef("beta", 0.8),)
            await service_job(client, request(0, alpha))
            await service_job(client, request(0, beta))  # both loaded before timing
            one, alternating = 0.0, 0.0
            for i in range(8):
                one += await timed(service_job(client, request(i, alpha)))
                alternating += await timed(service_job(client, request(i, alpha if i % 2 else beta)))
            results.update(c_one_adapter_s=one, c_alternating_s=alternating, c_ratio=alternating / one)
            metrics = running.service.metrics
            results["mean_jobs_per_batch"] = metrics.batched_jobs / max(metrics.batches, 1)
    finally:
        await running.stop()
    return results


def build_sd15(path: Path) -> Path:
    """An SD 1.5-architecture pipeline with random weights, from the shipped configs."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from loraloop.tiny import _byte_level_vocab

    if (path / "model_index.json").exists():
        return path
    load = lambda name: json.loads((SD15_CONFIGS / name).read_text())  # noqa: E731
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**load("unet.json"))
    vae = AutoencoderKL(**load("vae.json"))
    # The real CLIP vocabulary cannot be downloaded; a byte-level one tokenises differently but
    # the encoder does the same work (77 tokens, same layers), which is all a timing needs.
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(**load("text_encoder.json")))
    scheduler = DPMSolverMultistepScheduler(**load("scheduler.json"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


async def run_sd15(args: argparse.Namespace, data_dir: Path) -> dict:
    model_dir = build_sd15(data_dir / "sd15")
    config = Config().replace("service", model=str(model_dir), max_batch=8, max_per_requester=64, max_queue=256,
                              preview_every=0, batch_wait_ms=50)
    running = await start_service(config, Secrets(None, None))
    results: dict = {}
    try:
        async with ServiceClient(running.url, timeout=3600) as client:
            def request(seed: int) -> JobRequest:
                return JobRequest(prompt="a lighthouse at dusk", seed=seed, steps=25, width=512, height=512,
                                  requester=f"r{seed}")

            await service_job(client, request(0))
            start = time.perf_counter()
            for i in range(4):
                await service_job(client, request(i))
            results["sd15_sequential_images_per_s"] = 4 / (time.perf_counter() - start)
            start = time.perf_counter()
            await asyncio.gather(*(service_job(client, request(i)) for i in range(32)))
            results["sd15_concurrent32_images_per_s"] = 32 / (time.perf_counter() - start)
    finally:
        await running.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps for the tiny model")
    parser.add_argument("--repeats", type=int, default=5, help="sequential jobs timed for (a)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (b), medians reported")
    parser.add_argument("--sd15", action="store_true", help="also time an SD 1.5-architecture model (GPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        os.environ["LORALOOP_DATA_DIR"] = str(data_dir)
        results = asyncio.run(run_tiny(args, data_dir))
        if args.sd15:
            results.update(asyncio.run(run_sd15(args, data_dir)))
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
