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


def test_db_raters_lists_people_by_name_with_votes_agreement_and_weight(data_dir):
    with Store(data_dir / "loraloop.db", data_dir) as store:
        for n in range(12):
            generation_id = store.record_generation(job_id=f"j{n}", requester_id=1, prompt="a fox",
                                                    adapters=[{"name": "pixel", "version": 1}])
            image_id = store.add_image(generation_id, index=0, seed=n, width=8, height=8, png=b"png%d" % n)
            liked = n % 2 == 0
            for voter in (10, 11, 12):
                store.set_vote(image_id, voter, 1 if liked else -1, "x", name=f"fan{voter}" if voter != 12 else None)
            store.set_vote(image_id, 13, -1 if liked else 1, "x", name="contrarian")

    result = CliRunner().invoke(cli, ["db", "raters"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[2:]}
    assert set(lines) == {"fan10", "fan11", "12", "contrarian"}  # no name stored: the id
    assert "against the consensus" in lines["contrarian"]

    rows = {row["user_id"]: row for row in json.loads(CliRunner().invoke(cli, ["db", "raters", "--json"]).output)}
    assert rows[13]["weight"] == 0.0 and rows[13]["agreement"] == 0.0 and rows[13]["name"] == "contrarian"
    assert rows[10]["weight"] > 0.5 and rows[10]["agreement"] == 1.0 and rows[10]["votes"] == 12
    assert rows[12]["name"] is None
    assert CliRunner().invoke(cli, ["db", "raters", "--adapter", "other"]).output.startswith("No votes yet")


def test_db_stats_shows_running_experiments_with_the_gates_verdict(data_dir):
    with Store(data_dir / "loraloop.db", data_dir) as store:
        store.record_adapter(name="pixel", version=1, file_sha256="a")
        store.record_adapter(name="pixel", version=2, file_sha256="b", experiment={"control_version": 1, "share": 0.5})
        experiment = store.running_experiment("pixel")
        generation_id = store.record_generation(job_id="j", requester_id=1, prompt="a fox",
                                                adapters=[{"name": "pixel", "version": 2}],
                                                experiment_id=experiment.id, arm="candidate")
        image_id = store.add_image(generation_id, index=0, seed=1, width=8, height=8, png=b"png")
        store.set_vote(image_id, 10, 1, "👍")

    result = CliRunner().invoke(cli, ["db", "stats"])
    assert result.exit_code == 0, result.output
    assert "Running experiments" in result.output
    assert "pixel: candidate v2 100% liked (1 votes on 1 images), 50% of requests, vs control v1" in result.output
    assert "collecting votes" in result.output
    report = json.loads(CliRunner().invoke(cli, ["db", "stats", "--json"]).output)
    (running,) = report["experiments"]
    assert running["verdict"]["candidate"]["votes"] == 1 and running["verdict"]["decision"] is None
