"""bench/loop.py in miniature: simulated raters drive the real service, store, curation, training and publish.

Only the plumbing is checked here (votes land in the store, a dataset is curated, the adapter is
published and the after-images are made with it, the report has its fields); whether the like
rate rises is the benchmark's question, never a test's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from loraloop.store import Store

BENCH = Path(__file__).resolve().parent.parent / "bench" / "loop.py"


@pytest.fixture(scope="module")
def loop_bench():
    spec = importlib.util.spec_from_file_location("bench_loop", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_loop"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_loop", None)


@pytest.mark.timeout(120)
async def test_one_round_records_votes_curates_trains_publishes_and_renders_with_the_new_version(
        loop_bench, tiny_model_dir, data_dir):
    settings = loop_bench.LoopSettings(
        objective="sft", filters="none", rounds=1, train_prompts=3, images_per_prompt=2, eval_prompts=2,
        eval_seeds=1, steps=2, model=str(tiny_model_dir),
        training=loop_bench.Training(steps=2, batch_size=2, rank=2),
    )
    report, measured = await loop_bench.run_loop(settings, data_dir)

    (round_one,) = report["rounds"]
    assert round_one["images_rated"] == 6
    with Store(data_dir / "loraloop.db", data_dir) as store:
        assert store.counts()["ratings"] == round_one["votes_recorded"] > 0
        assert [(a.name, a.version) for a in store.adapters()] == [("loop", 1)]
    dataset = data_dir / "datasets" / "round-1"
    kept = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert len(kept) == round_one["dataset"]["kept"] >= 1
    assert 0 < round_one["dataset"]["votes_used"] <= round_one["votes_recorded"]
    assert round_one["published"]["version"] == 1
    assert (data_dir / "adapters" / "loop" / "v1.safetensors").is_file()

    # The same fresh prompts and seeds before and after, the after-images made with loop@1.
    assert list(measured) == ["base", "loop@1"]
    assert [(i.prompt, i.seed) for i in measured["base"]] == [(i.prompt, i.seed) for i in measured["loop@1"]]
    assert {i.adapter_version for i in measured["loop@1"]} == {1}
    for measurement in (report["base"], round_one["after"]):
        low, high = measurement["ci95"]
        assert 0.0 <= low <= measurement["like_rate"] <= high <= 1.0
        assert measurement["images"] == 2
    assert round_one["train_seconds"] > 0
    assert round_one["delta_points"] == pytest.approx(
        100 * (round_one["after"]["like_rate"] - report["base"]["like_rate"]), abs=0.1)
    assert "loop@1" in round_one["service"]


def test_the_brigade_votes_against_the_taste_and_random_raters_ignore_it(loop_bench):
    scenario = loop_bench.Scenario(raters=200, activity=0.05, flip=0.0, random_share=0.3, brigade=5)
    panel = loop_bench.Panel(scenario, "warm", seed=1)
    panel.calibrate([float(v) for v in range(-50, 51)])
    honest = [r for r in panel.raters if r.honest and not r.random]
    brigade = [r for r in panel.raters if not r.honest]
    random_raters = [r for r in panel.raters if r.random]
    assert len(random_raters) == 60 and len(brigade) == 5
    assert all(r.activity == pytest.approx(10 * honest[0].activity) for r in brigade)
    warm = 100.0  # two spreads above the median: far beyond any rater's personal offset
    assert all(panel.verdict(r, warm) == 1 for r in honest)
    assert all(panel.verdict(r, warm) == -1 for r in brigade)
    random_likes = sum(panel.verdict(r, warm) == 1 for r in random_raters for _ in range(20))
    assert 0.35 < random_likes / (20 * len(random_raters)) < 0.65


def test_the_wilson_interval_holds_the_rate_and_narrows_with_more_images(loop_bench):
    small = loop_bench.wilson_interval(6, 10)
    large = loop_bench.wilson_interval(600, 1000)
    assert small[0] < 0.6 < small[1] and large[0] < 0.6 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
