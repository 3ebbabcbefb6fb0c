"""Benchmark the feedback store and curation on this machine.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.store                    # the issue's sizes
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.store --images 2000 --votes 10000 --callers 16

(`-m` from the repository root, so `training` is the package, not a bench script's name.)

Figures printed:
- votes/s from concurrent asyncio callers through AsyncStore (goal: >= 2,000/s), each vote its
  own committed transaction, as the bot records them;
- curation time for --images images with --votes votes (goal: < 10 s), cold (perceptual hashes
  computed from the files) and warm (hashes cached in the store by the first run), for sft
  and dpo. dpo's first run hashes the images sft dropped for their score; dpo writes its
  Parquet file with the images inside, whose size is printed;
- how long the trainer takes to read the dpo dataset back (training.data.load_dataset: every
  row checked, each image written once to an empty image cache, the dataset hash).

The database and images are built through the Store API in a temporary directory (not timed).
Images are distinct 64x64 PNGs (the tiny model's size; real 512 px images cost more to decode
on the cold run only).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from loraloop.store import AsyncStore, Store
from training.curate import CurationSettings, curate
from training.data import load_dataset
from training.dataset import PARQUET_FILE


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))).save(buffer, format="PNG")
    return buffer.getvalue()


async def vote_burst(db_path: Path, data_dir: Path, image_ids: list[int], votes: int,
                     callers: int) -> float:
    """Votes per second with `callers` coroutines each voting in turn, like reaction events."""
    store = await AsyncStore.open(db_path, data_dir)
    queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
    rng = random.Random(1)
    for n in range(votes):
        queue.put_nowait((rng.choice(image_ids), 10_000 + n, rng.choice((1, -1))))

    async def caller() -> None:
        while not queue.empty():
            image_id, user_id, value = queue.get_nowait()
            await store.set_vote(image_id, user_id, value, "👍" if value > 0 else "👎")

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - started
    await store.close()
    return votes / elapsed


def build_world(store: Store, images: int, votes: int, prompts: int) -> None:
    rng = random.Random(0)
    users = list(range(1, 501))
    quality = {}
    for n in range(images):
        generation_id = store.record_generation(
            job_id=f"bench-{n}", requester_id=rng.choice(users), prompt=f"prompt number {n % prompts}",
            adapters=[{"name": "pixel", "version": 1 + n % 3}],
        )
        image_id = store.add_image(generation_id, index=0, seed=n, width=64, height=64, png=png(n))
        quality[image_id] = rng.random()
    image_ids = list(quality)
    placed = 0
    while placed < votes:
        image_id = rng.choice(image_ids)
        value = 1 if rng.random() < quality[image_id] else -1
        if store.set_vote(image_id, rng.choice(users), value, "x"):
            placed += 1
    for image_id in rng.sample(image_ids, images // 100):
        store.flag(image_id, 1, "artifact")
    store.opt_out(users[0])


def timed_curation(store: Store, out: Path, settings: CurationSettings) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (all threads; on a shared machine wall time also counts the
    waits for a core) and the report's summary."""
    started, cpu = time.perf_counter(), time.process_time()
    report = curate(store, out, settings)
    return time.perf_counter() - started, time.process_time() - cpu, report.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, help="distinct prompts, for dpo pairs (default: images / 10)")
    parser.add_argument("--burst", type=int, default=20_000, help="votes in the async burst")
    parser.add_argument("--callers", type=int, default=64, help="concurrent asyncio callers")
    args = parser.parse_args()
    args.prompts = args.prompts or max(1, args.images // 10)

    with tempfile.TemporaryDirectory(prefix="loraloop-bench-") as tmp:
        root = Path(tmp)
        data_dir, db_path = root / "data", root / "data" / "loraloop.db"

        started = time.perf_counter()
        with Store(db_path, data_dir) as store:
            build_world(store, args.images, args.votes, args.prompts)
        print(f"setup: {args.images:,} images and {args.votes:,} votes through the Store API "
              f"in {time.perf_counter() - started:.1f} s")

        # A separate copy for the burst, so curation below sees exactly --votes votes.
        burst_db = root / "burst.db"
        with Store(burst_db, data_dir) as store:
            generation_id = store.record_generation(job_id="burst", prompt="burst")
            burst_images = [store.add_image(generation_id, index=i, seed=i, width=64, height=64,
                                            png=png(10_000_000 + i)) for i in range(200)]
        rate = asyncio.run(vote_burst(burst_db, data_dir, burst_images, args.burst, args.callers))
        print(f"votes: {rate:,.0f}/s from {args.callers} concurrent asyncio callers "
              f"({args.burst:,} votes, one transaction each)")

        with Store(db_path, data_dir) as store:
            for label, settings in [("sft cold", CurationSettings(format="sft")),
                                    ("sft warm", CurationSettings(format="sft")),
                                    ("dpo first", CurationSettings(format="dpo")),
                                    ("dpo warm", CurationSettings(format="dpo")),
                                    ("kto warm", CurationSettings(format="kto"))]:
                out = root / label.replace(" ", "-")
                seconds, cpu, summary = timed_curation(store, out, settings)
                parquet = out / PARQUET_FILE
                size = f", {parquet.stat().st_size / 1e6:.0f} MB Parquet" if parquet.is_file() else ""
                print(f"curate {label}: {seconds:.2f} s wall, {cpu:.2f} s CPU ({summary}{size})")

        started, cpu = time.perf_counter(), time.process_time()
        pairs = load_dataset(root / "dpo-warm", "dpo", image_cache=root / "image-cache")
        print(f"read dpo for training: {time.perf_counter() - started:.2f} s wall, "
              f"{time.process_time() - cpu:.2f} s CPU ({len(pairs.examples):,} pairs)")


if __name__ == "__main__":
    main()
