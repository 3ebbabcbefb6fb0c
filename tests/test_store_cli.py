"""`loraloop db`: the database's path and its figures, through the real CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from loraloop.cli import cli
from loraloop.store import MIGRATION_NAMES, Store


def test_db_path_prints_the_configured_database_and_says_where_it_looked(data_dir):
    result = CliRunner().invoke(cli, ["db", "path"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(data_dir.resolve() / "loraloop.db")  # what "$(loraloop db path)" gets
    assert f"data dir {data_dir.resolve()}" in result.stderr and "config " in result.stderr


def test_every_nothing_here_message_names_the_config_and_data_dir_in_use(data_dir, tmp_path):
    for command in (["db", "stats"], ["adapters", "list"], ["dataset", "curate", str(tmp_path / "out")]):
        result = CliRunner().invoke(cli, command)
        assert f"data dir {data_dir.resolve()}" in result.output, (command, result.output)


def test_db_stats_counts_rows_and_reports_each_adapter_version(data_dir):
    with Store(data_dir / "loraloop.db", data_dir) as store:
        generation_id = store.record_generation(job_id="j", requester_id=1, prompt="a fox",
                                                adapters=[{"name": "pixel", "version": 2}])
        image_id = store.add_image(generation_id, index=0, seed=1, width=8, height=8, png=b"png")
        store.set_vote(image_id, 10, 1, "👍")
        store.set_vote(image_id, 11, -1, "👎")

    result = CliRunner().invoke(cli, ["db", "stats"])
    assert result.exit_code == 0, result.output
    assert "pixel v2" in result.output and "50%" in result.output

    report = json.loads(CliRunner().invoke(cli, ["db", "stats", "--json"]).output)
    assert report["counts"]["ratings"] == 2
    assert report["schema"][-1] == MIGRATION_NAMES[-1]
    assert report["adapters"] == [{"adapter": "pixel", "version": 2, "images": 1, "votes": 2,
                                   "likes": 1, "like_rate": 0.5}]


def test_db_stats_without_a_database_says_so_and_creates_nothing(data_dir):
    result = CliRunner().invoke(cli, ["db", "stats"])
    assert result.exit_code == 1
    assert "No database at" in result.output
    assert not (data_dir / "loraloop.db").exists()
