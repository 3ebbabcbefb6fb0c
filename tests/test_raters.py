"""The rater model on synthetic votes where the right answer is known: who is reliable, who votes
at random, who votes against the taste, who brigades, and what that does to the images' verdicts."""

from __future__ import annotations

import random

import pytest

from loraloop.raters import CAPPED, LOCKSTEP, RaterSettings, cap_factors, estimate


def simulate(seed: int, *, images: int = 200, honest: int = 12, random_raters: int = 0,
             contrarians: int = 0, brigade: int = 0, activity: float = 0.3,
             brigade_activity: float = 0.9, flip: float = 0.05):
    """Votes on images whose true verdict is known. Honest raters see it (misjudging `flip` of
    the time), random raters toss a coin, contrarians and the brigade vote the opposite; the
    brigade's members vote on nearly every image and on the same side. Returns (truth, votes)."""
    rng = random.Random(seed)
    truth = {image: rng.random() < 0.5 for image in range(images)}
    votes = []
    for image, liked in truth.items():
        brigade_side = not liked if rng.random() > flip else liked  # one decision for the bloc
        for user in range(honest + random_raters + contrarians):
            if rng.random() >= activity:
                continue
            if user < honest:
                vote = liked if rng.random() > flip else not liked
            elif user < honest + random_raters:
                vote = rng.random() < 0.5
            else:
                vote = not liked if rng.random() > flip else liked
            votes.append((image, 1000 + user, 1 if vote else -1))
        for member in range(brigade):
            if rng.random() < brigade_activity:
                votes.append((image, 9000 + member, 1 if brigade_side else -1))
    return truth, votes


def accuracy(model, truth, votes, judged_by=lambda user: True) -> float:
    """How often the model's verdict is right, on the images someone `judged_by` voted on."""
    judged = {image for image, user, _ in votes if judged_by(user)}
    return sum((model.posterior[i] > 0.5) == truth[i] for i in judged) / len(judged)


def majority_accuracy(votes, truth) -> float:
    sums: dict[int, int] = {}
    for image, _, value in votes:
        sums[image] = sums.get(image, 0) + value
    decided = [i for i, total in sums.items() if total]
    return sum((sums[i] > 0) == truth[i] for i in decided) / len(decided)


def test_reliable_raters_outweigh_random_ones_and_contrarians_count_nothing():
    truth, votes = simulate(1, honest=10, random_raters=5, contrarians=3)
    model = estimate(votes, RaterSettings(max_share=1.0))
    honest = [model.weight(1000 + u) for u in range(10)]
    random_ = [model.weight(1010 + u) for u in range(5)]
    contrarian = [model.weight(1015 + u) for u in range(3)]
    assert max(random_) < 0.45 < 0.6 < min(honest)
    assert contrarian == [0.0, 0.0, 0.0]
    assert all(model.raters[1015 + u].agreement < 0.3 for u in range(3))
    assert accuracy(model, truth, votes) > 0.9


def test_a_rater_with_a_handful_of_votes_counts_little_either_way():
    truth, votes = simulate(2, honest=10)
    settings = RaterSettings(max_share=1.0)
    # A newcomer who votes twice, both times against the taste, and one who votes twice with it.
    for image in (0, 1):
        with_taste = 1 if truth[image] else -1
        votes += [(image, 5001, -with_taste), (image, 5002, with_taste)]
    model = estimate(votes, settings)
    for newcomer in (5001, 5002):
        assert model.weight(newcomer) == pytest.approx(settings.prior_weight, abs=0.25)
    assert model.weight(5001) < model.weight(5002)
    assert model.weight(424242) == settings.prior_weight  # never seen: the prior itself


def test_a_brigade_voting_the_opposite_ten_times_as_often_is_found_and_ignored():
    # 12 honest raters, each voting on 8% of images (most images get 0-3 honest votes), and two
    # accounts voting the opposite on 80% of them: more brigade votes than honest ones.
    truth, votes = simulate(3, honest=12, activity=0.08, brigade=2, brigade_activity=0.8)
    brigade_votes = sum(1 for _, user, _ in votes if user >= 9000)
    assert brigade_votes > len(votes) / 2
    assert majority_accuracy(votes, truth) < 0.5  # plain vote counting is fooled

    model = estimate(votes)
    for member, other in ((9000, 9001), (9001, 9000)):
        assert model.weight(member) == 0.0
        assert LOCKSTEP in model.raters[member].reasons
        assert model.raters[member].lockstep_with == (other,)
        assert "lockstep" in model.raters[member].explain()
    assert min(model.weight(1000 + u) for u in range(12)) > 0.3
    # Where an honest rater voted at all, their verdict wins (elsewhere only the brigade spoke).
    assert accuracy(model, truth, votes, judged_by=lambda user: user < 9000) > 0.9


def test_no_rater_holds_more_than_the_capped_share_of_the_weight():
    # One honest but hyperactive rater among thirty occasional ones.
    truth, votes = simulate(4, honest=30, activity=0.05)
    votes += [(image, 7777, 1 if liked else -1) for image, liked in truth.items()]
    model = estimate(votes, RaterSettings(max_share=0.1))
    totals = {}
    for _, user, _ in votes:
        totals[user] = totals.get(user, 0.0) + model.weight(user)
    assert totals[7777] / sum(totals.values()) == pytest.approx(0.1, abs=1e-6)
    assert CAPPED in model.raters[7777].reasons
    assert model.weight(7777) < min(model.weight(1000 + u) for u in range(30))


def test_the_cap_takes_from_the_largest_and_never_goes_below_twice_an_equal_share():
    totals = {1: 80.0, 2: 10.0, 3: 0.0, **{10 + i: 10.0 for i in range(18)}}
    factors = cap_factors(totals, 0.1)
    capped = {u: t * factors[u] for u, t in totals.items()}
    assert capped[1] / sum(capped.values()) == pytest.approx(0.1)
    assert factors[2] == factors[3] == factors[10] == 1.0
    # Among four raters a 10% cap cannot hold; no one keeps more than twice an equal share (50%).
    factors = cap_factors({1: 90.0, 2: 10.0, 3: 10.0, 4: 10.0}, 0.1)
    assert 90.0 * factors[1] / (90.0 * factors[1] + 30.0) == pytest.approx(0.5)
    assert cap_factors({1: 30.0, 2: 10.0}, 0.1) == {1: 1.0, 2: 1.0}  # two raters: 2/2, no cap
    assert cap_factors({1: 30.0, 2: 10.0, 3: 10.0}, 1.0) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_switched_off_every_vote_counts_one_but_the_cap_still_holds():
    votes = [(image, user, 1) for image in range(10) for user in range(12)]
    model = estimate(votes, RaterSettings(enabled=False))
    assert {round(w, 6) for w in model.weights().values()} == {1.0}
    assert model.tally([(1, 1), (2, -1), (3, 1)]) == (2.0, 1.0)
    assert model.posterior[0] > 0.9


def test_the_estimate_says_who_each_rater_is_in_plain_terms():
    _, votes = simulate(5, honest=6, contrarians=1)
    model = estimate(votes, RaterSettings(max_share=1.0))
    row = model.raters[1006].to_dict()
    assert row["weight"] == 0.0 and row["why"] == "no better than chance against the consensus"
    assert model.raters[1000].explain() == "reliable"
    assert set(row) >= {"user_id", "votes", "likes", "agreement", "sensitivity", "specificity", "weight", "why"}
