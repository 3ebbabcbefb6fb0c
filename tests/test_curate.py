"""Curation: votes in a real SQLite store turned into sft, kto and dpo datasets on disk."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from loraloop.cli import cli
from loraloop.store import Store
from training.curate import CurationError, CurationSettings, curate, wilson_lower_bound
from training.dataset import DPO, NearDuplicateIndex, dataset_hash, perceptual_hash, read_parquet

REQUESTER = 1
START = dt.datetime(2026, 11, 2, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        return self.now


def png(seed: int, nudge: int = 0) -> bytes:
    """A distinct 64x64 picture per seed; `nudge` brightens it a little (a near-duplicate)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)).astype(np.int16) + nudge
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class World:
    """A store with helpers to make rated images in one line each."""

    def __init__(self, root: Path) -> None:
        self.clock = Clock()
        self.store = Store(root / "loraloop.db", root, clock=self.clock)
        self._jobs = 0

    def image(self, votes: list[int] = (), *, prompt: str = "a red fox", seed: int | None = None,
              data: bytes | None = None, requester: int = REQUESTER, adapters=()) -> int:
        self._jobs += 1
        generation = self.store.record_generation(job_id=f"job-{self._jobs}", prompt=prompt,
                                                  requester_id=requester, adapters=adapters)
        image_id = self.store.add_image(generation, index=0, seed=self._jobs, width=64, height=64,
                                        png=data or png(seed if seed is not None else self._jobs))
        for voter, value in enumerate(votes, start=100):
            self.store.set_vote(image_id, voter, value, "👍" if value > 0 else "👎")
        return image_id


@pytest.fixture
def world(tmp_path):
    world = World(tmp_path / "data")
    yield world
    world.store.close()


def read_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def load_with_hugging_face(folder: Path) -> list[dict]:
    """The dataset as `datasets.load_dataset(folder)` reads it, no arguments: what other tools see."""
    import datasets

    return list(datasets.load_dataset(str(folder), split="train", cache_dir=str(folder.parent / ".hf-cache")))


def kept_ids(folder: Path) -> list[int]:
    return sorted(row["image_id"] for row in json.loads((folder / "report.json").read_text())["kept"])


def dropped(folder: Path) -> dict[int, str]:
    report = json.loads((folder / "report.json").read_text())
    return {row["image_id"]: row["reason"] for row in report["dropped"]}


# --- scores ---------------------------------------------------------------------------------


def test_the_wilson_bound_trusts_many_votes_more_than_few():
    assert wilson_lower_bound(0, 0, 1.96) == 0.0
    assert wilson_lower_bound(3, 3, 1.96) < wilson_lower_bound(30, 32, 1.96)
    assert wilson_lower_bound(5, 10, 1.96) < 0.5 < wilson_lower_bound(90, 100, 1.96)
    assert 0.0 <= wilson_lower_bound(1, 1, 1.96) <= 1.0


def test_the_perceptual_hash_is_the_same_as_imagehash_phash():
    import imagehash

    for seed in range(20):
        with Image.open(io.BytesIO(png(seed))) as image:
            assert perceptual_hash(image) == int(str(imagehash.phash(image)), 16)


def test_the_near_duplicate_index_finds_hashes_within_the_distance_only():
    index = NearDuplicateIndex(max_distance=4)
    index.add(0xFFFF_0000_FFFF_0000, image_id=7)
    assert index.find(0xFFFF_0000_FFFF_000F) == 7  # 4 bits apart
    assert index.find(0xFFFF_0000_FFFF_001F) is None  # 5 bits apart
    assert index.find(0x0000_FFFF_0000_FFFF) is None


# --- sft ------------------------------------------------------------------------------------


def test_sft_keeps_liked_images_and_says_why_each_other_image_was_dropped(world, tmp_path):
    liked = world.image([1, 1, 1])
    mixed = world.image([1, -1, -1])
    lonely = world.image([1])
    flagged = world.image([1, 1, 1])
    world.store.flag(flagged, 100, "nsfw")
    private = world.image([1, 1, 1], requester=55)
    world.store.opt_out(55)

    out = tmp_path / "sft"
    report = curate(world.store, out, CurationSettings(format="sft", min_raters=2))

    assert kept_ids(out) == [liked]
    assert dropped(out) == {mixed: "score_below_minimum", lonely: "too_few_raters",
                            flagged: "flagged", private: "requester_opted_out"}
    sha = world.store.image(liked).sha256
    assert read_lines(out) == [{"file_name": f"{sha[:16]}.png", "text": "a red fox", "weight": 1.0}]
    assert (out / f"{sha[:16]}.png").read_bytes() == world.store.image_path(world.store.image(liked)).read_bytes()
    assert report.considered == 5
    assert json.loads((out / "report.json").read_text())["dropped_by_reason"]["flagged"] == 1


def test_the_dataset_hash_names_the_content_and_is_written_down(world, tmp_path):
    world.image([1, 1])
    world.image([1, 1, 1], prompt="a blue bird")
    first = curate(world.store, tmp_path / "one", CurationSettings())
    second = curate(world.store, tmp_path / "two", CurationSettings())
    assert first.dataset_hash == second.dataset_hash == dataset_hash(tmp_path / "one")
    assert (tmp_path / "one" / "dataset_hash").read_text().strip() == first.dataset_hash
    assert json.loads((tmp_path / "one" / "report.json").read_text())["dataset_hash"] == first.dataset_hash
    with Image.open(tmp_path / "one" / "score_histogram.png") as histogram:
        assert histogram.format == "PNG" and histogram.width > 100
    # Any change to an image changes the hash (a copy, so the store's original is untouched).
    curate(world.store, tmp_path / "three", CurationSettings(link_images=False))
    image = next((tmp_path / "three").glob("*.png"))
    image.write_bytes(png(999))
    assert dataset_hash(tmp_path / "three") != first.dataset_hash


def test_images_are_hard_linked_from_the_store_or_copied_when_asked(world, tmp_path):
    image_id = world.image([1, 1])
    stored = world.store.image_path(world.store.image(image_id))
    curate(world.store, tmp_path / "linked", CurationSettings())
    curate(world.store, tmp_path / "copied", CurationSettings(link_images=False))
    name = world.store.image(image_id).sha256[:16] + ".png"
    assert (tmp_path / "linked" / name).stat().st_ino == stored.stat().st_ino
    assert (tmp_path / "copied" / name).stat().st_ino != stored.stat().st_ino
    assert (tmp_path / "copied" / name).read_bytes() == stored.read_bytes()


def test_self_votes_are_left_out_unless_asked_for(world, tmp_path):
    image_id = world.image([1])
    world.store.set_vote(image_id, REQUESTER, 1, "👍")
    with pytest.raises(CurationError, match="too_few_raters"):
        curate(world.store, tmp_path / "without", CurationSettings(min_raters=2))
    curate(world.store, tmp_path / "with", CurationSettings(min_raters=2, include_self_votes=True))
    assert kept_ids(tmp_path / "with") == [image_id]


def test_an_image_deleted_in_discord_leaves_the_dataset_but_keeps_its_votes(world, tmp_path):
    kept = world.image([1, 1, 1])
    deleted = world.image([1, 1, 1])
    assert world.store.mark_image_deleted(deleted, REQUESTER)
    assert not world.store.mark_image_deleted(deleted, REQUESTER), "deleting twice changes nothing"
    curate(world.store, tmp_path / "out", CurationSettings())
    assert kept_ids(tmp_path / "out") == [kept]
    assert dropped(tmp_path / "out") == {deleted: "deleted_in_discord"}
    assert len(world.store.votes_for(deleted)) == 3
    assert [t.image_id for t in world.store.top_images(limit=5)] == [kept]


def test_votes_of_opted_out_users_do_not_count(world, tmp_path):
    image_id = world.image([1, 1])
    world.store.opt_out(101)
    with pytest.raises(CurationError, match="1 too_few_raters"):
        curate(world.store, tmp_path / "out", CurationSettings(min_raters=2))
    world.store.opt_in(101)
    curate(world.store, tmp_path / "out", CurationSettings(min_raters=2))
    assert kept_ids(tmp_path / "out") == [image_id]


def test_the_wilson_threshold_wants_enough_votes_to_be_sure(world, tmp_path):
    # Weighted: a vote counts its rater's weight, and raters the model knows little about weigh
    # about 0.4, so it takes more of them to be sure.
    few = world.image([1, 1])
    many = world.image([1] * 30)
    curate(world.store, tmp_path / "out", CurationSettings(min_wilson=0.6))
    assert kept_ids(tmp_path / "out") == [many]
    assert dropped(tmp_path / "out") == {few: "wilson_below_minimum"}


def test_exact_and_near_duplicates_collapse_onto_the_best_rated_copy(world, tmp_path):
    best = world.image([1, 1, 1], seed=1)
    copy = world.image([1, 1], seed=1)  # the same bytes, another generation
    lookalike = world.image([1, 1], data=png(1, nudge=2))  # re-encoded a shade brighter
    other = world.image([1, 1], seed=2)
    assert world.store.image(lookalike).sha256 != world.store.image(best).sha256

    curate(world.store, tmp_path / "out", CurationSettings())
    assert kept_ids(tmp_path / "out") == [best, other]
    assert dropped(tmp_path / "out") == {copy: "duplicate", lookalike: "near_duplicate"}


def test_perceptual_hashes_are_computed_once_and_cached_in_the_store(world, tmp_path):
    world.image([1, 1])
    world.image([1, 1])
    assert curate(world.store, tmp_path / "one", CurationSettings()).phashes_computed == 2
    assert curate(world.store, tmp_path / "two", CurationSettings()).phashes_computed == 0


# --- filters --------------------------------------------------------------------------------


def test_adapter_version_and_date_range_select_images(world, tmp_path):
    old_v1 = world.image([1, 1], adapters=[{"name": "pixel", "version": 1}])
    world.clock.now = START + dt.timedelta(days=10)
    new_v2 = world.image([1, 1], adapters=[{"name": "pixel", "version": 2}])
    new_base = world.image([1, 1])

    curate(world.store, tmp_path / "v2", CurationSettings(adapter="pixel", adapter_version=2))
    assert kept_ids(tmp_path / "v2") == [new_v2]
    curate(world.store, tmp_path / "pixel", CurationSettings(adapter="pixel"))
    assert kept_ids(tmp_path / "pixel") == [old_v1, new_v2]
    curate(world.store, tmp_path / "recent",
           CurationSettings(since=START + dt.timedelta(days=5)))
    assert kept_ids(tmp_path / "recent") == [new_v2, new_base]
    curate(world.store, tmp_path / "early",
           CurationSettings(until=START + dt.timedelta(days=5)))
    assert kept_ids(tmp_path / "early") == [old_v1]


# --- kto and dpo ----------------------------------------------------------------------------


def test_kto_labels_liked_and_disliked_images_and_drops_the_unclear(world, tmp_path):
    liked = world.image([1, 1, 1])
    disliked = world.image([-1, -1])
    unclear = world.image([1, -1])
    out = tmp_path / "kto"
    curate(world.store, out, CurationSettings(format="kto"))
    labels = {row["file_name"]: row["label"] for row in read_lines(out)}
    sha = {i: world.store.image(i).sha256[:16] + ".png" for i in (liked, disliked)}
    assert labels == {sha[liked]: True, sha[disliked]: False}
    assert all(row["text"] == "a red fox" for row in read_lines(out))
    assert dropped(out) == {unclear: "no_clear_verdict"}


def test_dpo_pairs_images_of_one_prompt_and_drops_ties(world, tmp_path):
    good = world.image([1, 1, 1], prompt="a castle")
    bad = world.image([-1, -1], prompt="a castle")
    also_bad = world.image([-1, -1], prompt="a castle")
    alone = world.image([1, 1], prompt="a lighthouse")
    out = tmp_path / "dpo"
    report = curate(world.store, out, CurationSettings(format="dpo"))

    stored = {i: world.store.image_path(world.store.image(i)).read_bytes() for i in (good, bad, also_bad)}
    rows = load_with_hugging_face(out)
    # Pick-a-Pic's columns, the images as bytes (diffusers' DPO script opens them with Image.open(BytesIO)).
    assert sorted((r["jpg_0"], r["jpg_1"], r["label_0"]) for r in rows) == sorted([
        (stored[good], stored[bad], 1.0), (stored[good], stored[also_bad], 1.0)])
    assert all(r["caption"] == "a castle" for r in rows)
    assert all(Image.open(io.BytesIO(r["jpg_1"])).size == (64, 64) for r in rows)
    assert (report.pairs, report.tied_pairs_dropped) == (2, 1)
    assert dropped(out) == {alone: "no_pair_with_a_different_score"}
    assert report.dataset_hash == dataset_hash(out) == (out / "dataset_hash").read_text().strip()


def test_dpo_marks_the_second_image_when_it_is_preferred(world, tmp_path):
    worse = world.image([1, -1], prompt="a castle")
    better = world.image([1, 1], prompt="a castle")
    curate(world.store, tmp_path / "dpo", CurationSettings(format="dpo"))
    (row,) = load_with_hugging_face(tmp_path / "dpo")
    assert hashlib.sha256(row["jpg_0"]).hexdigest() == world.store.image(worse).sha256
    assert hashlib.sha256(row["jpg_1"]).hexdigest() == world.store.image(better).sha256
    assert row["label_0"] == 0.0


def test_sft_and_kto_datasets_load_in_hugging_face_datasets_as_they_are(world, tmp_path):
    world.image([1, 1, 1], prompt="a red fox", seed=1)
    world.image([-1, -1], prompt="a grey fox", seed=2)
    for dataset_format in ("sft", "kto"):
        curate(world.store, tmp_path / dataset_format, CurationSettings(format=dataset_format))
        rows = load_with_hugging_face(tmp_path / dataset_format)
        assert {r["text"] for r in rows} == ({"a red fox"} if dataset_format == "sft" else {"a red fox", "a grey fox"})
        assert all(r["image"].size == (64, 64) for r in rows)


# --- faults ---------------------------------------------------------------------------------


def test_missing_and_corrupt_files_are_skipped_and_reported(world, tmp_path):
    fine = world.image([1, 1], seed=1)
    missing = world.image([1, 1], seed=2)
    tampered = world.image([1, 1], seed=3)
    truncated = world.image([1, 1], data=png(4)[:60])
    world.store.image_path(world.store.image(missing)).unlink()
    world.store.image_path(world.store.image(tampered)).write_bytes(png(5))

    out = tmp_path / "out"
    curate(world.store, out, CurationSettings())
    assert kept_ids(out) == [fine]
    assert dropped(out) == {missing: "missing_file", tampered: "corrupt_file",
                            truncated: "corrupt_file"}


def test_an_empty_selection_is_an_error_and_writes_nothing(world, tmp_path):
    world.image([1])
    world.image([])
    out = tmp_path / "out"
    with pytest.raises(CurationError, match=r"all 2 were dropped \(2 too_few_raters\); lower --min-raters"):
        curate(world.store, out, CurationSettings(min_raters=2))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]


def test_an_empty_database_is_an_error(world, tmp_path):
    with pytest.raises(CurationError, match="No images in the database for adapter pixel"):
        curate(world.store, tmp_path / "out", CurationSettings(adapter="pixel"))


def test_a_folder_that_is_not_empty_is_never_overwritten(world, tmp_path):
    world.image([1, 1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CurationError, match="not empty"):
        curate(world.store, out, CurationSettings())
    assert (out / "precious.txt").read_text() == "keep me"


# --- the command ----------------------------------------------------------------------------


def test_the_curate_command_builds_a_dpo_dataset_from_the_configured_database(data_dir, tmp_path):
    world = World(data_dir)  # the database the command finds through $LORALOOP_DATA_DIR
    world.image([1, 1], prompt="a castle", adapters=[{"name": "pixel", "version": 3}])
    world.image([-1, -1], prompt="a castle", adapters=[{"name": "pixel", "version": 3}])
    world.store.close()

    out = tmp_path / "pairs"
    result = CliRunner().invoke(cli, ["dataset", "curate", str(out), "--format", "dpo",
                                      "--adapter", "pixel@3"])
    assert result.exit_code == 0, result.output
    assert "1 pairs" in result.output and "Dataset hash" in result.output
    assert len(load_with_hugging_face(out)) == 1
    assert json.loads((out / "report.json").read_text())["settings"]["adapter_version"] == 3


def test_the_curate_command_explains_an_empty_selection(data_dir, tmp_path):
    Store(data_dir / "loraloop.db", data_dir).close()
    result = CliRunner().invoke(cli, ["dataset", "curate", str(tmp_path / "out"), "--min-raters", "5"])
    assert result.exit_code == 1
    assert "No images in the database" in result.output


def test_the_curate_command_reads_dates_as_utc_and_rejects_a_bad_adapter_version(data_dir, tmp_path):
    world = World(data_dir)
    early = world.image([1, 1])
    world.clock.now = START + dt.timedelta(days=3)
    world.image([1, 1])
    world.store.close()

    out = tmp_path / "early"
    result = CliRunner().invoke(cli, ["dataset", "curate", str(out), "--until", "2026-11-04",
                                      "--copy-images"])
    assert result.exit_code == 0, result.output
    assert kept_ids(out) == [early]
    assert json.loads((out / "report.json").read_text())["settings"]["until"] == "2026-11-04T00:00:00+00:00"

    result = CliRunner().invoke(cli, ["dataset", "curate", str(tmp_path / "x"), "--adapter", "pixel@new"])
    assert result.exit_code == 2
    assert "NAME@VERSION" in result.output


# --- the rater model ------------------------------------------------------------------------


def test_a_brigade_voting_against_everyone_else_is_outweighed_and_named_in_the_report(world, tmp_path):
    # Ten people like the warm images and dislike the cold ones, one or two votes an image; two
    # accounts vote on every image, always against them: more brigade votes than honest ones.
    warm, cold = [], []
    for n in range(24):
        liked = n % 2 == 0
        image_id = world.image(seed=n)
        for voter in (100 + n % 10, 100 + (n + 3) % 10)[: 1 + (n // 2) % 2]:
            world.store.set_vote(image_id, voter, 1 if liked else -1, "x", name=f"person{voter}")
        for account in (900, 901):
            world.store.set_vote(image_id, account, -1 if liked else 1, "x", name=f"brigade{account}")
        (warm if liked else cold).append(image_id)

    out = tmp_path / "sft"
    report = curate(world.store, out, CurationSettings(format="sft"))
    assert kept_ids(out) == warm
    written = json.loads((out / "report.json").read_text())
    raters = {row["user_id"]: row for row in written["raters"]}
    assert raters[900]["weight"] == raters[901]["weight"] == 0.0
    assert "lockstep" in raters[900]["why"] and raters[900]["name"] == "brigade900"
    assert all(raters[100 + n]["weight"] > 0.2 for n in range(10))
    assert all(row["why"].startswith("liked: score") for row in written["kept"])
    assert set(dropped(out)) == set(cold)
    assert report.raters == written["raters"]

    # Counting every vote the same, the brigade would have won.
    plain = tmp_path / "plain"
    curate(world.store, plain, CurationSettings(format="sft", rater_model=False, max_rater_share=1.0))
    assert kept_ids(plain) and set(kept_ids(plain)) <= set(cold)


def test_rows_carry_loss_weights_that_favour_the_surest_examples(world, tmp_path):
    world.image([1, 1, 1, 1], prompt="a castle")
    world.image([1], prompt="a castle")
    world.image([-1, -1, -1], prompt="a castle")
    for fmt in ("sft", "kto", "dpo"):
        curate(world.store, tmp_path / fmt, CurationSettings(format=fmt))
        rows = [row.values for row in read_parquet(tmp_path / fmt, DPO)] if fmt == "dpo" else read_lines(tmp_path / fmt)
        weights = [row["weight"] for row in rows]
        assert sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-3), fmt
        assert max(weights) > min(weights) > 0, fmt
