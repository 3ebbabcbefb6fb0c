"""Benchmark LoRA training on the tiny model: steps/s and peak memory with and without cached latents.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.training
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.training --steps 60 --resolution 64 --batch-size 4 --repeats 3

Each configuration runs in its own process, so its peak memory (max RSS on the CPU, peak
allocated on CUDA) is its own. Steps/s is timed from the end of the first step to the last, by
the clock and per CPU second of the process (with OMP_NUM_THREADS=1 the second is what a loaded
machine cannot inflate much): model loading and the one-off encoding of the cached run are
reported apart, as "setup". The runs alternate and each figure is the median of the repeats.

With `cache_latents` the loop reads VAE latent distributions and text embeddings encoded once.
What that saves is the encoding's share of an uncached step, which depends on the model: on the
project's tiny model (one layer per UNet block, a 2-layer text encoder) the VAE is a far larger
share of a step than on SD 1.5, so this ratio is not the one to quote against other trainers;
bench/reference.py measures loraloop against diffusers' own script on the same work.
(This benchmark used to print the best of the repeats, which on a loaded machine picks the luckiest
run of each kind; with uncached steps encoding one image per VAE call it claimed 2.16x.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and this file's name would then
# shadow the `training` package it benchmarks.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def child(args: argparse.Namespace) -> None:
    """One training run; prints a JSON line with its figures."""
    import torch
    from PIL import Image, ImageDraw

    from loraloop.config import TrainingConfig
    from loraloop.tiny import tiny_model_path
    from training.train import Job, train, validate

    root = Path(args.workdir)
    dataset = root / "dataset"
    if not dataset.exists():
        dataset.mkdir(parents=True)
        rows = []
        for i in range(args.images):
            image = Image.new("RGB", (args.resolution, args.resolution), (i * 7 % 255, 90, 200))
            box = [i % 20, 4, args.resolution // 2 + i % 20, args.resolution // 2]
            ImageDraw.Draw(image).rectangle(box, fill=(250, 200, 0))
            image.save(dataset / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a yellow block, picture {i}"}))
        (dataset / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    settings = TrainingConfig(resolution=args.resolution, batch_size=args.batch_size, max_steps=args.steps,
                              cache_latents=args.mode == "cached", validation_split=0.0, checkpoint_every=10**6,
                              log_with="none", seed=1)
    # A fresh cache directory per run: the cached figure includes encoding everything once.
    job = Job(dataset=dataset, name="bench", model="tiny", settings=settings, data_dir=root / f"data-{args.mode}",
              output=root / f"run-{args.mode}")
    # Build the tiny model outside the timed part.
    tiny_model_path(job.data_dir)
    stamps: list[float] = []
    cpu_stamps: list[float] = []

    def stamp(progress: object) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())

    started = time.perf_counter()
    train(validate(job), on_step=stamp)
    loop_steps = len(stamps) - 1
    figures = {
        "mode": args.mode,
        "steps_per_s": loop_steps / (stamps[-1] - stamps[0]),
        "steps_per_cpu_s": loop_steps / (cpu_stamps[-1] - cpu_stamps[0]),
        "setup_s": stamps[0] - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["cached", "uncached"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    runs: dict[str, list[dict]] = {"uncached": [], "cached": []}
    with tempfile.TemporaryDirectory() as workdir:
        # Alternating repeats, the median of each: on a shared machine the neighbours fall on both alike.
        for repeat in range(args.repeats):
            for mode in ("uncached", "cached"):
                command = [sys.executable, __file__, "--mode", mode, "--workdir", f"{workdir}/{repeat}",
                           "--steps", str(args.steps), "--resolution", str(args.resolution),
                           "--batch-size", str(args.batch_size), "--images", str(args.images)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs[mode].append(json.loads(output.strip().splitlines()[-1]))
    results: dict[str, dict[str, Any]] = {
        mode: {key: statistics.median(r[key] for r in each)
               for key in ("steps_per_s", "steps_per_cpu_s", "setup_s", "peak_rss_mb")} for mode, each in runs.items()}
    for mode, each in runs.items():  # None without CUDA
        results[mode]["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in each) if each[0]["peak_cuda_mb"] else None
    print(f"tiny model, {args.resolution}x{args.resolution}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.images} images, median of {args.repeats}, load average {os.getloadavg()[0]:.1f}\n")
    print("| latents | steps/s (each run) | steps/s | steps per CPU s | setup s | peak RSS MB | peak CUDA MB |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("uncached", "cached"):
        r = results[mode]
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        each_run = " ".join(f"{x['steps_per_s']:.2f}" for x in runs[mode])
        print(f"| {mode} | {each_run} | {r['steps_per_s']:.2f} | {r['steps_per_cpu_s']:.2f} | {r['setup_s']:.1f} "
              f"| {r['peak_rss_mb']:.0f} | {cuda} |")
    speedup = results["cached"]["steps_per_s"] / results["uncached"]["steps_per_s"]
    cpu_speedup = results["cached"]["steps_per_cpu_s"] / results["uncached"]["steps_per_cpu_s"]
    print(f"\ncached / uncached: {speedup:.2f}x by the clock, {cpu_speedup:.2f}x per CPU second")


if __name__ == "__main__":
    main()
