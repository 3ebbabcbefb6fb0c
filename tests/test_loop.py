"""bench/loop.py in miniature: simulated raters drive the real service, store, curation, training and publish.

Only the plumbing is checked here (votes land in the store, a dataset is curated, the adapter is
published and the after-images are made with it, the report has its fields); whether the like
rate rises is the benchmark's question, never a test's.
"""

from __future__ import annotations

import dataclasses
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
        loop_bench, tiny_model_dir, data_dir, monkeypatch):
    settings = loop_bench.LoopSettings(
        objective="sft", rounds=1, train_prompts=3, images_per_prompt=2, eval_prompts=2,
        eval_seeds=1, steps=2, model=str(tiny_model_dir),
        training=loop_bench.Training(steps=2, batch_size=2, rank=2),
    )
    # Enough votes that the shipped curation defaults keep something of six images.
    busy = dataclasses.replace(loop_bench.SCENARIOS["clean"], activity=0.5)
    monkeypatch.setitem(loop_bench.SCENARIOS, "clean", busy)
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
    assert set(round_one["rater_weights"]) == {"honest"}
    assert 0.0 <= round_one["rater_weights"]["honest"]["min"] <= round_one["rater_weights"]["honest"]["max"] <= 1.0
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


def test_the_measure_is_the_expected_share_of_likes_and_ignores_the_brigade(loop_bench):
    panel = loop_bench.Panel(loop_bench.Scenario(raters=10, flip=0.1, random_share=0.2, brigade=2), "warm", seed=3)
    panel.calibrate([float(v) for v in range(-50, 51)])
    # Far above every taste holder's threshold: 8 like it with 90%, 2 random raters with 50%.
    assert panel.like_share(100.0) == pytest.approx((8 * 0.9 + 2 * 0.5) / 10)
    assert panel.like_share(100.0, taste_holders_only=True) == pytest.approx(0.9)
    assert panel.like_share(-100.0) == pytest.approx((8 * 0.1 + 2 * 0.5) / 10)
    assert panel.like_share(100.0) == panel.like_share(100.0), "the measure adds no noise"


def test_base_images_are_rendered_once_and_read_back_the_same(loop_bench, tmp_path):
    cache = loop_bench.BaseImages(tmp_path / "base")
    images = [loop_bench.Rendered("a fox", 0, 7, 32, 32, b"png-bytes", None, job_id="j1", parameters={"steps": 2})]
    assert cache.get("eval") is None
    cache.put("eval", images)
    assert cache.get("eval") == images


def test_a_results_file_keeps_every_cell_and_a_new_run_skips_them(loop_bench, tmp_path):
    results = loop_bench.Results(tmp_path / "results.json")
    results.add({"cell": "sft/clean/warm/1", "seconds": 1.0})
    results.add({"cell": "kto/clean/warm/1", "seconds": 2.0})
    assert set(loop_bench.Results(tmp_path / "results.json").reports) == {"sft/clean/warm/1", "kto/clean/warm/1"}
    grid = loop_bench.cells(["sft", "kto"], ["clean", "brigade"], ["warm"], [1, 2])
    assert len(grid) == 8 and len({s.cell() for s in grid}) == 8


def test_the_wilson_interval_holds_the_rate_and_narrows_with_more_images(loop_bench):
    small = loop_bench.wilson_interval(6, 10)
    large = loop_bench.wilson_interval(600, 1000)
    assert small[0] < 0.6 < small[1] and large[0] < 0.6 < large[1]
    assert large[1] - large[0] < small[1] - small[0]


# --- the loop that runs itself (training/loop.py) -------------------------------------------------


def loop_config(tiny_model_dir: Path, **loop_settings):
    from loraloop.config import Config

    config = Config().replace("service", model=str(tiny_model_dir), port=9)  # nothing listens there
    config = config.replace("training", resolution=32, rank=2, alpha=2.0, max_steps=2, batch_size=2,
                            validation_split=0.0, log_with="none", adam_8bit=False, checkpoint_every=1000)
    return config.replace("loop", **{"min_new_votes": 3.0, "min_votes": 6, "vote_budget": 60, **loop_settings})


def picture(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = __import__("random").Random(seed)
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(out, "PNG")
    return out.getvalue()


def rated(store: Store, n: int, version: int, votes: dict[int, int], experiment_id=None, arm=None) -> None:
    generation = store.record_generation(job_id=f"job-{n}", prompt=f"a fox {n}", requester_id=1,
                                         adapters=[{"name": "fox", "version": version}],
                                         experiment_id=experiment_id, arm=arm)
    image = store.add_image(generation, index=0, seed=n, width=32, height=32, png=picture(n))
    for user, value in votes.items():
        store.set_vote(image, user, value, "x")


def test_the_loop_trains_a_candidate_from_new_votes_and_the_gate_promotes_it(tiny_model_dir, data_dir):
    from generation.testing import write_lora
    from training.loop import LoopRunner

    config = loop_config(tiny_model_dir)
    write_lora(tiny_model_dir, config.adapters_dir / "fox" / "v1.safetensors")
    with Store.from_config(config) as store:
        store.record_adapter(name="fox", version=1, file_sha256="v1")
        for n in range(8):
            rated(store, n, 1, {10: 1 if n % 2 else -1, 11: 1 if n % 2 else -1})

    runner = LoopRunner(config)
    first = runner.step()
    (result,) = first.rounds
    assert result.error is None and (result.control_version, result.candidate_version) == (1, 2)
    assert (config.adapters_dir / "fox" / "v2.safetensors").is_file()
    with Store.from_config(config) as store:
        experiment = store.running_experiment("fox")
        assert (experiment.control_version, experiment.candidate_version) == (1, 2)
        assert store.default_version("fox") == 1, "a candidate is not the default"
        assert set(store.rater_weights()) == {10, 11}
    assert runner.step().rounds == [], "one experiment at a time: no new round while it runs"

    # The candidate's images are liked, the control's are not: the next pass promotes it.
    with Store.from_config(config) as store:
        for n in range(10, 30):
            arm, version = ("candidate", 2) if n % 2 else ("control", 1)
            rated(store, n, version, dict.fromkeys((10, 11, 12), 1 if arm == "candidate" else -1),
                  experiment_id=experiment.id, arm=arm)
    (decided,) = LoopRunner(config).step().decisions  # a fresh runner: nothing lives in memory
    assert decided[1].decision == "promote" and decided[1].reason == "better"
    with Store.from_config(config) as store:
        assert store.default_version("fox") == 2 and store.running_experiment("fox") is None
        (decision,) = store.experiment_decisions("fox")
        assert decision.decided_by == "gate" and decision.figures["candidate"]["like_rate"] == 1.0
        assert [a.kind for a in store.pending_announcements()] == ["started", "decided"]


def test_a_round_with_nothing_to_curate_waits_for_newer_votes(tiny_model_dir, data_dir):
    from training.loop import LoopRunner

    config = loop_config(tiny_model_dir)
    with Store.from_config(config) as store:
        store.record_adapter(name="fox", version=1, file_sha256="v1")
        for n in range(4):  # liked by nobody: an sft dataset would be empty
            rated(store, n, 1, {10: -1, 11: -1})
    runner = LoopRunner(config)
    (failed,) = runner.step().rounds
    assert failed.error and "No images left to curate" in failed.error
    assert runner.step().rounds == [], "the same votes do not start the same failing round again"


def test_loop_once_on_an_empty_store_says_there_is_nothing_to_do(data_dir):
    from click.testing import CliRunner

    from loraloop.cli import cli

    result = CliRunner().invoke(cli, ["loop", "--once"])
    assert result.exit_code == 0, result.output
    assert "nothing to do (0 raters weighed)" in result.output


async def test_loraloop_run_starts_the_loop_as_a_child_process_and_stops_it(tmp_path, data_dir):
    import asyncio

    from loraloop.context import AppContext
    from loraloop.run import start_loop, stop_loop

    config = tmp_path / "config.toml"
    config.write_text("[loop]\nstart_with_run = true\npoll_seconds = 0.2\n")
    process = await start_loop(AppContext(str(config)), "http://127.0.0.1:9")
    try:
        for _ in range(300):  # its first pass opens (and so creates) the configured database
            if (data_dir / "loraloop.db").exists() or process.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert process.returncode is None, "the loop should keep running until stopped"
        assert (data_dir / "loraloop.db").exists()
    finally:
        await stop_loop(process)
    assert process.returncode is not None
