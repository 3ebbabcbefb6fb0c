"""Benchmark `loraloop dataset import` and `caption` on synthetic photos, on this machine.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.dataset_import              # 200 photos, 512 px
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.dataset_import --count 500 --size 3000x2000

(Run as a module from the repository root: as a script, bench/training.py would shadow the
`training` package.)

Figures printed:
- local import: images per second for a folder of camera-sized JPEGs (decode, EXIF, crop,
  hashes, PNG write) at the training resolution, with one worker and with one per core;
- URL import: the same pictures served by an aiohttp server on 127.0.0.1 (download overhead);
- near-duplicate lookups: microseconds per lookup against 10,000 kept hashes, at the default
  distance (4 bits) and at wider ones (the time should not depend on it);
- captioning: images per second with the tiny random BLIP (pipeline overhead only; a real
  BLIP's speed depends on the GPU and cannot be measured offline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from aiohttp import web
from PIL import Image, ImageDraw

from training.caption import CaptionSettings, caption_dataset
from training.dataset import NearDuplicateIndex
from training.importer import ImportSettings, import_dataset


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A camera-sized picture: a gradient, shapes and a little noise (so JPEG has work to do)."""
    rng = random.Random(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3)) * np.array([rng.random() for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x0, y0, x0 + rng.randrange(50, width // 2), y0 + rng.randrange(50, height // 2)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_folder(folder: Path, port: int) -> threading.Event:
    """Serve `folder` on 127.0.0.1:port from a background thread until the event is set."""
    stop, ready = threading.Event(), threading.Event()

    async def main() -> None:
        app = web.Application()
        app.router.add_static("/", folder)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()
    ready.wait()
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", default="1600x1200", help="source photo size, WxH")
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    settings = ImportSettings(resolution=args.resolution, min_image_size=256)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "photos"
        src.mkdir()
        for i in range(args.count):
            photo(i, size).save(src / f"{i:05d}.jpg", quality=90)
            (src / f"{i:05d}.txt").write_text(f"photo number {i}")
        megabytes = sum(p.stat().st_size for p in src.glob("*.jpg")) / 1e6

        print(f"{args.count} {size[0]}x{size[1]} JPEGs ({megabytes:.0f} MB) -> {args.resolution}px PNGs; "
              f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for workers in (1, 0):
            start = time.perf_counter()
            report = import_dataset(src, tmp / f"local-{workers}", replace(settings, workers=workers), progress=False)
            local_s = time.perf_counter() - start
            label = "1 worker" if workers == 1 else f"{os.cpu_count()} workers"
            print(f"local import, {label}: {len(report.kept)} kept in {local_s:.1f} s "
                  f"= {args.count / local_s:.1f} images/s")

        port = free_port()
        stop = serve_folder(src, port)
        urls = tmp / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{i:05d}.jpg\n" for i in range(args.count)))
        start = time.perf_counter()
        # Loopback is refused unless allowed, as a person allows the picture server on their LAN.
        report = import_dataset(urls, tmp / "remote", replace(settings, allow_private_hosts=("127.0.0.1",)),
                                progress=False)
        remote_s = time.perf_counter() - start
        stop.set()
        print(f"URL import (loopback): {len(report.kept)} kept in {remote_s:.1f} s "
              f"= {args.count / remote_s:.1f} images/s")

        rng = np.random.default_rng(0)
        kept = [int(value) for value in rng.integers(0, 2**64, 10_000, dtype=np.uint64)]
        probes = [int(value) for value in rng.integers(0, 2**64, 1000, dtype=np.uint64)]
        for distance in (4, 16, 64):
            index: NearDuplicateIndex[str] = NearDuplicateIndex(max_distance=distance)
            for i, value in enumerate(kept):
                index.add(value, str(i))
            start = time.perf_counter()
            for value in probes:
                index.closest(value)
            per_lookup_us = (time.perf_counter() - start) / len(probes) * 1e6
            print(f"near-duplicate lookup against 10,000 kept images, distance {distance}: {per_lookup_us:.0f} us")

        from loraloop.tiny import tiny_blip_path

        start = time.perf_counter()
        report = caption_dataset(
            tmp / "remote",
            CaptionSettings(model=str(tiny_blip_path(tmp / "data")), batch_size=8, device="cpu"),
            overwrite=True,
            progress=False,
        )
        caption_s = time.perf_counter() - start
        print(f"captioning, tiny BLIP on CPU (model load included): {report.captioned} images in {caption_s:.1f} s "
              f"= {report.captioned / caption_s:.1f} images/s")


if __name__ == "__main__":
    main()
