"""The A/B gate on synthetic votes where the answer is known, and experiments in a real SQLite store."""

from __future__ import annotations

import random

import pytest

from loraloop.experiments import (
    BETTER,
    BUDGET,
    CANDIDATE,
    CONTROL,
    PROMOTE,
    RETIRE,
    WORSE,
    Arm,
    GateSettings,
    Serving,
    arm_tallies,
    choose_arm,
    evaluate,
    experiment_verdict,
    probability_better,
    serving,
)
from loraloop.raters import RaterSettings
from loraloop.store import Store, StoreError


def test_the_probability_of_being_better_matches_sampling_from_the_posteriors():
    rng = random.Random(0)
    for (likes_a, dislikes_a), (likes_b, dislikes_b) in [((60, 40), (50, 50)), ((3.2, 1.1), (2.0, 2.5)),
                                                         ((900.5, 1000.2), (980, 920)), ((0, 0), (0, 0))]:
        sampled = sum(rng.betavariate(1 + likes_a, 1 + dislikes_a) > rng.betavariate(1 + likes_b, 1 + dislikes_b)
                      for _ in range(40_000)) / 40_000
        computed = probability_better(Arm(1, likes_a, dislikes_a), Arm(1, likes_b, dislikes_b))
        assert computed == pytest.approx(sampled, abs=0.01)
    assert probability_better(Arm(1, 5, 5), Arm(1, 5, 5)) == pytest.approx(0.5)
    assert probability_better(Arm(1, 50_000, 40_000), Arm(1, 49_000, 41_000)) > 0.999


def test_the_gate_waits_for_votes_then_promotes_retires_or_runs_out_of_budget():
    settings = GateSettings(confidence=0.95, min_votes=30, vote_budget=100)
    assert evaluate(Arm(10, 2, 8), Arm(10, 10, 0), settings).decision is None  # too few votes yet
    promoted = evaluate(Arm(40, 16, 24), Arm(40, 30, 10), settings)
    assert (promoted.decision, promoted.reason) == (PROMOTE, BETTER) and promoted.p_better > 0.95
    worse = evaluate(Arm(40, 30, 10), Arm(40, 16, 24), settings)
    assert (worse.decision, worse.reason) == (RETIRE, WORSE)
    spent = evaluate(Arm(100, 50, 50), Arm(100, 51, 49), settings)
    assert (spent.decision, spent.reason) == (RETIRE, BUDGET)
    assert "undecided" in evaluate(Arm(50, 25, 25), Arm(50, 26, 24), settings).explain()
    assert set(promoted.to_dict()) == {"decision", "reason", "p_better", "evidence_better", "evidence_worse",
                                       "control", "candidate", "settings"}
    assert promoted.evidence_better >= settings.evidence == pytest.approx(19)


def simulate_experiment(rng: random.Random, control_rate: float, candidate_rate: float, settings: GateSettings,
                        check_every: int = 5) -> tuple[str, int]:
    """Votes arriving one at a time, half on each arm, the gate looking every few votes, until it
    decides. Returns (decision, candidate votes used)."""
    control = candidate = (0, 0)  # likes, dislikes
    while True:
        for _ in range(check_every):
            if rng.random() < 0.5:
                liked = rng.random() < candidate_rate
                candidate = (candidate[0] + liked, candidate[1] + (not liked))
            else:
                liked = rng.random() < control_rate
                control = (control[0] + liked, control[1] + (not liked))
        verdict = evaluate(Arm(sum(control), *control), Arm(sum(candidate), *candidate), settings)
        if verdict.decision is not None:
            return verdict.decision, sum(candidate)


@pytest.mark.parametrize(("candidate_rate", "expected"), [(0.70, PROMOTE), (0.40, RETIRE)])
def test_a_clearly_better_candidate_is_promoted_and_a_worse_one_never_is(candidate_rate, expected):
    rng = random.Random(1)
    settings = GateSettings()  # the shipped defaults
    outcomes = [simulate_experiment(rng, 0.5, candidate_rate, settings) for _ in range(40)]
    decisions = [d for d, _ in outcomes]
    if expected == PROMOTE:
        assert decisions.count(PROMOTE) >= 38
        assert max(votes for d, votes in outcomes if d == PROMOTE) < settings.vote_budget
    else:
        assert decisions.count(PROMOTE) == 0


def test_two_equal_versions_rarely_end_in_a_promotion_however_often_the_gate_looks():
    rng = random.Random(2)
    decisions = [simulate_experiment(rng, 0.5, 0.5, GateSettings(), check_every=2)[0] for _ in range(40)]
    # The evidence for "better" reaches 19:1 with probability at most 1/19 when the arms are equal.
    assert decisions.count(PROMOTE) <= 4


def test_arm_tallies_weigh_each_vote_by_its_rater_and_cap_any_one_rater():
    weights = {1: 1.0, 2: 0.5, 3: 0.0}
    rows = [(CONTROL, 1, 3, 1), (CONTROL, 2, 0, 2), (CANDIDATE, 3, 10, 0), (CANDIDATE, 1, 1, 0)]
    control, candidate = arm_tallies(rows, weights.__getitem__, max_share=1.0, images={CONTROL: 4})
    assert (control.votes, control.likes, control.dislikes, control.images) == (6, 3.0, 2.0, 4)
    assert (candidate.votes, candidate.likes, candidate.dislikes) == (11, 1.0, 0.0)
    # 21 raters, one of them casting as many votes as all the others: held to 10% of the arm.
    rows = [(CANDIDATE, u, 1, 0) for u in range(20)] + [(CANDIDATE, 99, 0, 20)]
    _, capped = arm_tallies(rows, lambda user: 1.0, max_share=0.1)
    assert capped.dislikes / (capped.likes + capped.dislikes) == pytest.approx(0.1)


def test_each_request_draws_its_arm_and_outside_experiments_gets_the_default():
    during = Serving("fox", 3, experiment_id=7, candidate_version=4, share=0.25)
    rng = random.Random(3)
    arms = [choose_arm(during, rng.random()) for _ in range(4000)]
    assert set(arms) == {(4, CANDIDATE), (3, CONTROL)}
    assert arms.count((4, CANDIDATE)) / len(arms) == pytest.approx(0.25, abs=0.03)
    assert choose_arm(Serving("fox", 3), 0.0) == (3, None)


# --- in the store ---------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "loraloop.db", tmp_path) as opened:
        yield opened


def publish(store: Store, version: int, experiment: dict | None = None) -> None:
    store.record_adapter(name="fox", version=version, file_sha256=f"sha{version}", experiment=experiment)


def arm_image(store: Store, n: int, experiment_id: int, arm: str, votes: list[tuple[int, int]]) -> None:
    generation = store.record_generation(job_id=f"job-{n}", prompt="a fox", requester_id=1,
                                         experiment_id=experiment_id, arm=arm)
    image = store.add_image(generation, index=0, seed=n, width=8, height=8, png=b"png-%d" % n)
    for user, value in votes:
        store.set_vote(image, user, value, "x")


def test_a_candidate_is_never_the_default_until_promoted_and_a_retired_one_never_again(store):
    publish(store, 1)
    publish(store, 2)
    assert store.default_version("fox") == 2
    publish(store, 3, {"control_version": 2, "share": 0.5, "settings": {"confidence": 0.95}})
    experiment = store.running_experiment("fox")
    assert (experiment.control_version, experiment.candidate_version, experiment.share) == (2, 3, 0.5)
    assert store.default_version("fox") == 2
    assert serving(store, "fox").candidate_version == 3

    assert store.decide_experiment(experiment.id, decision="retire", reason="worse", decided_by="gate",
                                   figures={"p_better": 0.01})
    assert not store.decide_experiment(experiment.id, decision="promote", reason="admin", decided_by="admin:9",
                                       figures={}), "decided once only"
    assert store.default_version("fox") == 2 and store.running_experiment("fox") is None
    publish(store, 4, {"control_version": 2, "share": 0.5})
    store.decide_experiment(store.running_experiment("fox").id, decision="promote", reason="better",
                            decided_by="gate", figures={"p_better": 0.97})
    assert store.default_version("fox") == 4
    assert [(d.decision, d.decided_by) for d in store.experiment_decisions("fox")] == [
        ("retire", "gate"), ("promote", "gate")]


def test_one_experiment_at_a_time_and_a_refused_candidate_is_not_recorded_at_all(store):
    publish(store, 1)
    publish(store, 2, {"control_version": 1, "share": 0.5})
    with pytest.raises(StoreError, match="already has an experiment running"):
        publish(store, 3, {"control_version": 1, "share": 0.5})
    assert [a.version for a in store.adapters("fox")] == [1, 2]


def test_a_restart_finds_the_experiment_where_it_was(tmp_path):
    with Store(tmp_path / "loraloop.db", tmp_path) as first:
        publish(first, 1)
        publish(first, 2, {"control_version": 1, "share": 0.3})
        arm_image(first, 1, first.running_experiment("fox").id, CANDIDATE, [(10, 1)])
    with Store(tmp_path / "loraloop.db", tmp_path) as again:
        experiment = again.running_experiment("fox")
        assert experiment.share == 0.3
        assert again.experiment_votes(experiment.id) == [(CANDIDATE, 10, 1, 0)]


def test_the_verdict_counts_each_arms_votes_with_the_stored_rater_weights(store):
    publish(store, 1)
    publish(store, 2, {"control_version": 1, "share": 0.5})
    experiment = store.running_experiment("fox")
    for n in range(40):
        arm_image(store, n, experiment.id, CONTROL, [(10 + n % 5, 1 if n % 2 else -1)])
        arm_image(store, 100 + n, experiment.id, CANDIDATE, [(10 + n % 5, 1), (99, -1)])
    store.set_vote(1, 1, 1, "x")  # the requester's own vote never counts
    # Rater 99 dislikes every candidate image, but the loop has found them worthless.
    store.save_rater_weights([(99, 0.0, 40, 0.0)] + [(10 + u, 0.8, 16, 0.9) for u in range(5)])
    verdict = experiment_verdict(store, experiment, GateSettings(min_votes=30), RaterSettings())
    assert verdict.candidate.votes == 80 and verdict.candidate.images == 40
    assert verdict.candidate.like_rate == 1.0 and verdict.control.like_rate == pytest.approx(0.5)
    assert verdict.decision == PROMOTE
