"""Benchmark: what the generation service costs on top of the bare diffusers pipeline.

    OMP_NUM_THREADS=1 .venv/bin/python bench/service.py     # (a)-(c), tiny model, CPU or GPU, ~4 min on 2 cores
    .venv/bin/python bench/service.py --sd15                # the GPU fast path, SD 1.5 architecture (a GPU)
    OMP_NUM_THREADS=1 .venv/bin/python bench/service.py --backend ray   # (r1)-(r3) below, a local Ray cluster
    OMP_NUM_THREADS=1 .venv/bin/python bench/service.py --sd15 --tiny --device cpu   # the same, tiny, on a CPU

Ratios, all measured in one run on the same machine (lower is better):
  (a) one job at a time through the service (HTTP submit, SSE progress, PNG fetch) vs the same
      pipeline call made directly; goal <= 1.10
  (b) 8 compatible jobs submitted at once through the service vs 8 sequential direct calls;
      goal: within 10% of the pipeline's own batch-of-8 vs 8-sequential ratio
  (c) 8 sequential jobs alternating two LoRA adapters vs the same 8 with one adapter; goal <= 1.05

--backend ray (run_ray's docstring): (r1) images/s with 2 Ray workers vs 1, goal >= 1.7; (r2) time per
job with 1 Ray worker vs the local backend, goal <= 1.10; (r3) seconds from killing a worker mid-job to
that job running on the other worker. Each worker is a one-thread CPU actor on the tiny model.

The direct baseline is a plain `StableDiffusionPipeline` (none of the service's batch-invariance
changes), so (a) and (b) include their cost too.

--sd15: the GPU fast path ([service] dtype, channels_last, compile, lora_hotswap, warm-up) against
raw diffusers set up the same way in the same run (`enable_lora_hotswap`, the first adapter loaded,
`unet.compile`, later adapters loaded with `hotswap=True`), on an SD 1.5-architecture pipeline built
from the configs in bench/sd15/ with random weights (the same work as the real weights; nothing to
download), 512x512, 25 steps, guidance 7, fp16. It prints images/s at batch 1 and batch 8 for both
(the service's through HTTP: one job of count 1 or 8, PNGs fetched), the adapter-swap time in ms
(raw: `load_lora_weights(..., hotswap=True)`; service: the slot's own swap time) and the UNet graphs
compiled after warm-up (a recompile shows there). Goals on an H100/H200: >= 3 images/s at batch 8,
swap < 50 ms with no recompile, service >= 1.0x raw. --tiny swaps in the tiny model at 64x64 and
4 steps, to check the whole command on a CPU (compiling on the CPU takes minutes; --no-compile
skips it). --swaps-only times the swaps alone (no images), which at SD 1.5 scale a CPU can do.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
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
from loraloop.config import COMPILE_MODES, SERVICE_DTYPES, Config, Secrets  # noqa: E402
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


async def run_ray(args: argparse.Namespace, data_dir: Path) -> dict:
    """--backend ray: the Ray backend against itself and against the local backend, in one run.

    (r1) throughput of 2 workers vs 1 (a burst of jobs from 8 requesters; images/s); goal >= 1.7
    (r2) time per job, one job at a time: Ray with 1 worker vs the local backend; goal <= 1.10
    (r3) failover: from killing the worker that runs a job to that job running on the other worker
    Every worker is a CPU actor with one torch thread; the local backend runs with one thread too.
    """
    import ray

    model_dir = tiny_model_path(data_dir)
    steps, size, burst = args.steps, 64, args.burst
    torch.set_num_threads(1)  # the local backend's thread, like each Ray worker's
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level=logging.WARNING)
    base = dict(model=str(model_dir), max_per_requester=64, max_queue=256, preview_every=0, default_steps=steps,
                max_steps=400, max_pixel_steps=100_000_000)

    def request(seed: int, requester: str = "bench", job_steps: int = steps) -> JobRequest:
        return JobRequest(prompt="a lighthouse at dusk", seed=seed, steps=job_steps, width=size, height=size,
                          guidance=7.0, requester=requester)

    async def serving(**keys):
        return await start_service(Config().replace("service", **{**base, **keys}), Secrets(None, None))

    results: dict = {"device": "cpu", "steps": steps, "size": size, "burst_jobs": burst}
    per_job: dict[str, list[float]] = {"local": [], "ray1": []}
    throughput: dict[int, list[float]] = {1: [], 2: []}
    for workers in (1, 2):
        running = await serving(backend="ray", ray_workers=workers, ray_cpu_threads=1)
        try:
            async with ServiceClient(running.url, timeout=600) as client:
                await service_job(client, request(0))  # warm up every worker's first call
                await asyncio.gather(*(service_job(client, request(i, f"w{i}")) for i in range(workers)))
                for _ in range(args.rounds):
                    seconds = await timed(asyncio.gather(*(service_job(client, request(i, f"r{i % 8}"))
                                                           for i in range(burst))))
                    throughput[workers].append(burst / seconds)
                if workers == 1:
                    per_job["ray1"] = [await timed(service_job(client, request(i))) for i in range(args.repeats)]
        finally:
            await running.stop()
    running = await serving()
    try:
        async with ServiceClient(running.url, timeout=600) as client:
            await service_job(client, request(0))
            per_job["local"] = [await timed(service_job(client, request(i))) for i in range(args.repeats)]
    finally:
        await running.stop()
    one, two = statistics.median(throughput[1]), statistics.median(throughput[2])
    local, ray1 = statistics.median(per_job["local"]), statistics.median(per_job["ray1"])
    results.update(r1_images_per_s_1_worker=one, r1_images_per_s_2_workers=two, r1_ratio=two / one,
                   r2_local_s_per_job=local, r2_ray_1_worker_s_per_job=ray1, r2_ratio=ray1 / local)

    # (r3) a long job on a worker, that worker killed: until the job is running on the other one.
    running = await serving(backend="ray", ray_workers=2, ray_cpu_threads=1, max_batch=1)
    service = running.service
    failovers = []
    try:
        async with ServiceClient(running.url, timeout=600) as client:
            for i in range(args.failovers):
                while not all(w.alive and not w.busy for w in service.workers()):
                    await asyncio.sleep(0.05)  # the worker killed last time is back
                accepted = await client.submit(request(i, job_steps=400))
                job = service.jobs[accepted.id]
                while not (job.state is JobState.RUNNING and job.step >= 1):
                    await asyncio.sleep(0.005)
                (victim,) = [w for w in service.backend.workers if accepted.id in w.job_ids]
                start = time.perf_counter()
                ray.kill(victim.handle, no_restart=False)
                while not (job.requeues == 1 and job.state is JobState.RUNNING):
                    await asyncio.sleep(0.005)
                failovers.append(time.perf_counter() - start)
                await client.cancel(accepted.id)
    finally:
        await running.stop()
    results.update(r3_failover_s_median=statistics.median(failovers), r3_failover_s_max=max(failovers),
                   r3_failovers=len(failovers))
    ray.shutdown()
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


def fast_raw_pipeline(model_dir: Path, device: str, dtype, args: argparse.Namespace, first_adapter: Path):
    """Raw diffusers with the fast path done by hand, as diffusers' docs show it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.enable_lora_hotswap(target_rank=args.hotswap_rank)
    pipe.load_lora_weights(str(first_adapter), adapter_name="style")
    if args.compile:
        pipe.unet.compile(mode=args.compile_mode)
    return pipe


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def raw_call(pipe, batch: int, size: int, steps: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(prompt=["a lighthouse at dusk"] * batch, num_inference_steps=steps, guidance_scale=7.0, width=size,
             height=size, generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)], output_type="pil")
    synchronize()
    return time.perf_counter() - start


def raw_swap(pipe, adapter: Path) -> float:
    start = time.perf_counter()
    pipe.load_lora_weights(str(adapter), adapter_name="style", hotswap=True)
    synchronize()
    return time.perf_counter() - start


async def run_fast_path(args: argparse.Namespace, data_dir: Path) -> dict:
    from generation.pipeline import compiled_graph_count, pick_dtype

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--sd15 needs a CUDA GPU; `--sd15 --tiny --device cpu` checks the command on the CPU")
    if args.tiny:
        model_dir, size, steps = tiny_model_path(data_dir), 64, args.steps
    else:
        model_dir, size, steps = build_sd15(data_dir / "sd15"), 512, 25
    dtype = pick_dtype(args.dtype, device)
    adapters_dir = data_dir / "adapters"  # DATA_DIR/adapters: the service below serves the same two files
    alpha = write_lora(model_dir, adapters_dir / "alpha.safetensors", seed=1, rank=args.adapter_rank)
    beta = write_lora(model_dir, adapters_dir / "beta.safetensors", seed=2, rank=args.adapter_rank)
    results: dict = {"fast_path_device": device, "model": "tiny" if args.tiny else "sd15 architecture",
                     "size": size, "steps": steps, "dtype": str(dtype).removeprefix("torch."),
                     "compile": args.compile, "compile_mode": args.compile_mode,
                     "channels_last": args.channels_last, "hotswap_rank": args.hotswap_rank,
                     "adapter_rank": args.adapter_rank}

    # Raw diffusers first, then freed, so the two never share the GPU's memory or its clock.
    pipe = fast_raw_pipeline(model_dir, device, dtype, args, alpha)
    start = time.perf_counter()
    raw_call(pipe, 1, size, steps)
    raw_call(pipe, 8, size, steps)
    results["raw_warmup_s"] = time.perf_counter() - start
    graphs = compiled_graph_count()
    batch1 = statistics.median(raw_call(pipe, 1, size, steps) for _ in range(args.repeats))
    batch8 = statistics.median(raw_call(pipe, 8, size, steps) for _ in range(args.rounds))
    swaps = []
    for i in range(args.swaps):
        swaps.append(raw_swap(pipe, beta if i % 2 == 0 else alpha))
        raw_call(pipe, 1, size, steps)  # a recompile after a swap would happen here
    results.update(raw_batch1_images_per_s=1 / batch1, raw_batch8_images_per_s=8 / batch8,
                   raw_swap_ms=1000 * statistics.median(swaps),
                   raw_recompiles_after_warmup=compiled_graph_count() - graphs)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    config = Config().replace(
        "service", model=str(model_dir), device=device, dtype=args.dtype, channels_last=args.channels_last,
        compile=args.compile, compile_mode=args.compile_mode, lora_hotswap=True,
        lora_hotswap_rank=args.hotswap_rank, max_batch=8, max_count=8, max_per_requester=64, max_queue=256,
        preview_every=0, default_steps=steps, warmup_sizes=[[size, size]], warmup_batch_sizes=[1, 8])
    start = time.perf_counter()
    running = await start_service(config, Secrets(None, None))
    results["service_start_s"] = time.perf_counter() - start  # loading, the slot, and compiling the warm-up shapes
    try:
        async with ServiceClient(running.url, timeout=3600) as client:
            def request(count: int, adapter: str) -> JobRequest:
                return JobRequest(prompt="a lighthouse at dusk", seed=0, count=count, steps=steps, width=size,
                                  height=size, guidance=7.0, adapters=(AdapterRef(adapter, 1.0),))

            await service_job(client, request(1, "alpha"))  # the first adapter's file is read here
            await service_job(client, request(1, "beta"))
            graphs = compiled_graph_count()
            batch1 = statistics.median([await timed(service_job(client, request(1, "alpha")))
                                        for _ in range(args.repeats)])
            batch8 = statistics.median([await timed(service_job(client, request(8, "alpha")))
                                        for _ in range(args.rounds)])
            slot = running.service.worker.model.slot
            slot.swap_seconds.clear()
            for i in range(args.swaps):
                await service_job(client, request(1, "beta" if i % 2 == 0 else "alpha"))
            results.update(service_batch1_images_per_s=1 / batch1, service_batch8_images_per_s=8 / batch8,
                           service_swap_ms=1000 * statistics.median(slot.swap_seconds),
                           service_swaps=len(slot.swap_seconds),
                           service_recompiles_after_warmup=compiled_graph_count() - graphs)
    finally:
        await running.stop()
    results["batch1_service_vs_raw"] = results["service_batch1_images_per_s"] / results["raw_batch1_images_per_s"]
    results["batch8_service_vs_raw"] = results["service_batch8_images_per_s"] / results["raw_batch8_images_per_s"]
    results["goals_met"] = {
        "batch8 >= 3 images/s": results["service_batch8_images_per_s"] >= 3,
        "swap < 50 ms": results["service_swap_ms"] < 50,
        "no recompile after warm-up": results["service_recompiles_after_warmup"] == 0,
        "service >= 1.0x raw at batch 8": results["batch8_service_vs_raw"] >= 1.0,
    }
    return results


def run_swaps_only(args: argparse.Namespace, data_dir: Path) -> dict:
    """--swaps-only: adapter swaps alone, no image made. At SD 1.5 scale most of a swap is host-side
    Python (diffusers and peft walk the UNet's state dict), so even a CPU says something about it."""
    import dataclasses
    import hashlib

    from generation.adapters import AdapterFile
    from generation.jobs import AppliedAdapter
    from generation.pipeline import load_model, pick_dtype

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = tiny_model_path(data_dir) if args.tiny else build_sd15(data_dir / "sd15")
    files = [write_lora(model_dir, data_dir / f"{name}.safetensors", seed=seed, rank=args.adapter_rank)
             for seed, name in enumerate(("alpha", "beta"), start=1)]
    no_compile = argparse.Namespace(**{**vars(args), "compile": False})  # nothing runs the UNet here
    pipe = fast_raw_pipeline(model_dir, device, pick_dtype(args.dtype, device), no_compile, files[0])
    raw = [raw_swap(pipe, files[(i + 1) % 2]) for i in range(args.swaps)]
    del pipe
    gc.collect()
    settings = dataclasses.replace(Config().service, dtype=args.dtype, lora_hotswap=True,
                                   lora_hotswap_rank=args.hotswap_rank, channels_last=args.channels_last)
    model = load_model(str(model_dir), device, data_dir, settings)
    adapters = [AppliedAdapter(AdapterFile(path.stem, None, path, hashlib.sha256(path.read_bytes()).hexdigest()),
                               path.stem, 1.0) for path in files]
    for i in range(args.swaps + 2):  # the first two read and convert the files
        model.slot.apply([adapters[i % 2]])
    service = list(model.slot.swap_seconds)[2:]
    return {"swaps_device": device, "model": "tiny" if args.tiny else "sd15 architecture",
            "dtype": str(model.dtype).removeprefix("torch."), "hotswap_rank": args.hotswap_rank,
            "adapter_rank": args.adapter_rank, "swaps": args.swaps,
            "raw_swap_ms": 1000 * statistics.median(raw), "service_swap_ms": 1000 * statistics.median(service)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps for the tiny model")
    parser.add_argument("--repeats", type=int, default=5, help="jobs timed for (a), batch-1 calls (--sd15)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (b), batch-8 calls for --sd15; medians")
    parser.add_argument("--sd15", action="store_true", help="the GPU fast path against raw compiled diffusers")
    parser.add_argument("--backend", default="local", choices=("local", "ray"),
                        help="ray: (r1)-(r3), the Ray backend's throughput, overhead and failover")
    parser.add_argument("--burst", type=int, default=32, help="--backend ray: jobs submitted at once for (r1)")
    parser.add_argument("--failovers", type=int, default=3, help="--backend ray: workers killed for (r3)")
    parser.add_argument("--tiny", action="store_true", help="--sd15 on the tiny model at 64x64 (a CPU check)")
    parser.add_argument("--device", default="auto", help="--sd15: cuda, cuda:N or cpu (auto: cuda when present)")
    parser.add_argument("--dtype", default="auto", choices=SERVICE_DTYPES, help="--sd15: auto is fp16 on CUDA")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="--sd15 without torch.compile")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--hotswap-rank", type=int, default=64, help="--sd15: the slot's (and raw target_rank)")
    parser.add_argument("--adapter-rank", type=int, default=16, help="--sd15: rank of the two adapters swapped")
    parser.add_argument("--swaps", type=int, default=8, help="--sd15: adapter swaps timed, alternating two")
    parser.add_argument("--swaps-only", action="store_true", help="--sd15: time adapter swaps only (no images)")
    args = parser.parse_args()
    if (args.tiny or args.swaps_only) and not args.sd15:
        parser.error("--tiny and --swaps-only go with --sd15")
    if args.tiny and args.steps == parser.get_default("steps"):
        args.steps = 4
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        os.environ["LORALOOP_DATA_DIR"] = str(data_dir)
        if args.sd15 and args.swaps_only:
            results = run_swaps_only(args, data_dir)
        else:
            if args.backend == "ray":
                results = asyncio.run(run_ray(args, data_dir))
            else:
                results = asyncio.run(run_fast_path(args, data_dir) if args.sd15 else run_tiny(args, data_dir))
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    results["torch"] = torch.__version__
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=2))

if __name__ == "__main__":
    main()
