"""The charts people read (matplotlib, drawn on the server) and the run directories they are drawn from."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from PIL import Image

from console.charts import like_rate_chart, wilson_interval
from loraloop.store import AdapterStats
from training.images import figure_bytes, loss_curve, loss_figure, score_histogram
from training.runs import list_runs, read_run


def test_the_loss_curve_is_a_640_by_400_png_or_an_svg_by_its_suffix(tmp_path):
    train = [(step, 1.0 / step) for step in range(1, 30)]
    loss_curve(train, [(10, 0.2), (20, 0.1)], tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (640, 400)
    loss_curve(train, [], tmp_path / "loss.svg")
    assert ET.parse(tmp_path / "loss.svg").getroot().tag.endswith("svg")
    assert Image.open(tmp_path / "loss.png").size == (640, 400)


def test_a_run_without_steps_still_gets_a_chart_that_says_so(tmp_path):
    svg = figure_bytes(loss_figure([], []), "svg").decode()
    assert "no steps were trained" in svg


def test_the_score_histogram_counts_kept_and_dropped_images(tmp_path):
    score_histogram([1.0, 2.4, 30.0], [-1.0, 0.0], "sft: 3 kept, 2 dropped", tmp_path / "hist.svg")
    svg = (tmp_path / "hist.svg").read_text()
    assert "sft: 3 kept, 2 dropped" in svg


def test_the_like_rate_chart_names_each_version_with_its_votes():
    rows = [AdapterStats(None, None, images=4, votes=4, likes=1, dislikes=3),
            AdapterStats("fox", 1, images=3, votes=5, likes=4, dislikes=1),
            AdapterStats("fox", 2, images=2, votes=0, likes=0, dislikes=0)]
    svg = like_rate_chart(rows).decode()
    assert "base model" in svg and "fox v1" in svg and "5 votes" in svg
    assert "fox v2" not in svg  # no votes, no point to draw


def test_the_wilson_interval_holds_the_rate_and_narrows_with_votes():
    few, many = wilson_interval(3, 4), wilson_interval(300, 400)
    assert few[0] < 0.75 < few[1] and many[0] < 0.75 < many[1]
    assert many[1] - many[0] < few[1] - few[0]
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_run_directory_reads_back_its_losses_samples_and_published_run(tmp_path):
    run = tmp_path / "runs" / "fox-1"
    (run / "samples").mkdir(parents=True)
    (run / "adapter.safetensors").write_bytes(b"")
    for step in (10, 2):
        (run / "samples" / f"step-{step}.png").write_bytes(b"")
    (run / "report.json").write_text(json.dumps({
        "base_model": "tiny", "steps": 2, "final_train_loss": 0.5, "history": [{"step": 1, "loss": 0.7},
                                                                              {"step": 2, "loss": 0.5}],
        "validation": [{"step": 2, "val_loss": 0.6}], "settings": {"rank": 4}}))
    (run / "training_run_id").write_text("3")
    (tmp_path / "runs" / "not-a-run").mkdir()
    summary = read_run(run)
    assert summary is not None and summary.finished
    assert summary.train_points == [(1, 0.7), (2, 0.5)] and summary.validation_points == [(2, 0.6)]
    assert summary.samples == ["step-2.png", "step-10.png"] and summary.training_run_id == 3
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["fox-1"]
