"""Benchmark the web console's store queries on a large server's worth of data.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.console                       # 20,000 images, 100,000 votes
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.console --images 2000 --votes 10000

Figures printed (milliseconds per call, the median of --repeat calls): a gallery page (the newest
page, one adapter version, a score filter), the moderation queue, rate-a-batch's next image for
one rater, and the votes behind one like-rate point. The database is built with bench/store.py's
`build_world` (not timed); a page is one of these calls plus rendering.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.store import build_world
from loraloop.store import Store


def median_ms(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db", Path(tmp) / "data")
        build_world(store, args.images, args.votes, prompts=max(1, args.images // 10))
        rater = store.web_user("bench")
        calls = {
            "gallery, newest page of 48": lambda: store.listed_images(limit=48),
            "gallery, pixel v2, score >= 2": lambda: store.listed_images(adapter="pixel", adapter_version=2,
                                                                         min_score=2, limit=48),
            "gallery, 10th page": lambda: store.listed_images(limit=48, offset=9 * 48),
            "moderation queue": lambda: store.listed_images(flagged=True, limit=48),
            "rate-a-batch, next image": lambda: store.unrated_images(rater, limit=1),
            "votes behind pixel v1's like rate": lambda: store.adapter_votes("pixel", 1),
            "adapter_stats (the chart)": store.adapter_stats,
        }
        print(f"{args.images} images, {args.votes} votes")
        for label, call in calls.items():
            print(f"{label:<38} {median_ms(call, args.repeat):8.1f} ms")
        store.close()


if __name__ == "__main__":
    main()
