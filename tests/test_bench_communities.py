"""bench/loop.py --scenario communities in miniature: two groups with opposite tastes, one shared
adapter and each owner's personal one, through the real service, store, curation and the loop's
personal training. Only the plumbing is checked; whether personal styles please their owners is
the benchmark's question (bench/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "loop.py"


@pytest.fixture(scope="module")
def loop_bench():
    spec = importlib.util.spec_from_file_location("bench_loop_communities", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_loop_communities"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_loop_communities", None)


@pytest.mark.timeout(180)
async def test_each_owner_is_measured_on_the_base_the_shared_and_their_own_adapter(loop_bench, tiny_model_dir,
                                                                                  data_dir):
    settings = loop_bench.LoopSettings(train_prompts=3, images_per_prompt=2, eval_prompts=2, eval_seeds=1, steps=2,
                                       model=str(tiny_model_dir), training=loop_bench.Training(steps=2, batch_size=2,
                                                                                               rank=2))
    communities = loop_bench.Communities(members=2, owners=1, activity=1.0, min_votes=3)
    report = await loop_bench.run_communities(settings, data_dir, communities)

    assert report["images_rated"] == 6 and report["votes_recorded"] == 4 * 6, "every member votes on every image"
    owners = report["owners"]
    assert [(o["taste"], o["votes"]) for o in owners] == [("warm", 6), ("cool", 6)]
    for owner in owners:
        assert (data_dir / "adapters" / f"personal-{owner['user_id']}" / "v1.safetensors").is_file()
        for arm in ("base", "shared", "personal"):
            low, high = owner[arm]["ci95"]
            assert 0.0 <= low <= owner[arm]["like_rate"] <= high <= 1.0
    # Two members a side with opposite tastes may cancel out on every image: then nothing is published.
    assert report["shared"].get("published", {}).get("version", 1) == 1 or "error" in report["shared"]
    assert "| owner | taste |" in loop_bench.communities_table(report)
