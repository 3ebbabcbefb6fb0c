"""Benchmark: seconds per denoising step by image size, the figure behind the work budget.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.step_cost                    # tiny model, 64..512 px
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.step_cost --sizes 64x64 8x4096 --steps 2

[service] max_pixel_steps limits a job to width x height x steps x images; its CPU default
(generation.jobs.DEFAULT_PIXEL_STEPS) comes from these figures. Attention makes a step cost grow
faster than the pixel count, so the budget is set where the largest allowed job still ends in
minutes. Each size runs the service's own pipeline (generation.pipeline.load_model) once to warm
up, then `--steps` steps, with the VAE decode included, as the worker runs it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["64x64", "256x256", "512x512", "8x4096"],
                        help="WxH, multiples of 8")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from generation.pipeline import load_model
    from loraloop.tiny import tiny_model_path

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(str(tiny_model_path(Path(tmp))), args.device, Path(tmp))
        print(f"tiny model on {model.device}, {os.environ.get('OMP_NUM_THREADS', 'all')} thread(s), "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            model.txt2img(prompt=["warm up"], num_inference_steps=1, width=8, height=8, output_type="pil")
            start = time.perf_counter()
            model.txt2img(prompt=["a step"], num_inference_steps=args.steps, width=width, height=height,
                          output_type="pil")
            seconds = (time.perf_counter() - start) / args.steps
            print(f"{width}x{height}: {seconds:.2f} s per step ({width * height * args.steps} pixel-steps "
                  f"in {seconds * args.steps:.1f} s)")


if __name__ == "__main__":
    main()
