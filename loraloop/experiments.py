"""The A/B gate: is a candidate adapter version liked more than the version it would replace?

    control, candidate = arm_tallies(rows, weights, max_share)      # weighted votes of each arm
    verdict = evaluate(control, candidate, GateSettings(...))        # promote, retire, or keep going
    version, arm = choose_arm(serving, random.random())              # what one /imagine gets

While an experiment runs, `/imagine style:NAME` is served the candidate with probability
`share` and the control (the version people get today) otherwise, decided per request; every
vote on those images counts for its arm, weighted by the rater model (`loraloop.raters`) with
the same cap on any one rater's share, so a brigade cannot carry an arm. The loop (training/
loop.py) checks running experiments and records decisions; the bot reads the same figures for
/stats and for an admin's override. Floor: the standard library only, so the bot uses it without
numpy or torch.

**The test** is Bayesian, on beta-binomial models of the two arms' like rates: a sequential
Bayes-factor test (the Bayesian form of Wald's sequential probability ratio test; see
F. D. Schönbrodt et al., "Sequential hypothesis testing with Bayes factors", Psychological
Methods 22(2), 2017). After L weighted likes and D weighted dislikes an arm's rate has the
posterior Beta(1 + L, 1 + D) (uniform prior), from which the gate reads P(candidate better) for
people; the decision rests on the Bayes factor of "the candidate's rate is above the control's"
(each arm its own uniform rate, restricted to that order) against "both arms share one rate",
and the same for "below". It promotes the candidate when the evidence for better reaches
`confidence / (1 - confidence)` to 1 (19:1 at 0.95), retires it when the evidence for worse does,
and retires it undecided when the candidate arm has used `vote_budget` votes; it decides nothing
before both arms have `min_votes` votes.

Why this and not the posterior probability alone, or a plain SPRT: checked after every vote, "P(better) >=
0.95" promotes an equal candidate in about a third of experiments (each look is another chance:
12 of 40 simulated equal experiments, looking every 10 votes up to 400), while a Bayes factor under "no difference" is a
martingale, so the chance it ever reaches 19:1 is at most 1/19 however often it is looked at
(Ville's inequality). Wald's SPRT has that property too but needs two fixed like rates to
compare (p0 against p1), and the control's rate is unknown and drifts with the server; the
beta-binomial models need no such choice and take fractional (weighted) counts as they are.
At the defaults, in the synthetic tests: a candidate 20 points better is promoted every time,
one 10 points worse never is, and two equal versions end in a promotion in a few percent of
experiments (the rest run out of budget).

The assumptions: votes are independent given the arm's rate (votes on one image are not quite,
so with many votes per image the posterior is narrower than it should be; on a server where
most images get one to three votes it hardly matters), and both arms are shown to the same people
at the same time (requests are randomised per request, so they are).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from loraloop.config import LoopConfig
from loraloop.raters import RaterModel, RaterSettings, cap_factors
from loraloop.store import Experiment, Store

CONTROL, CANDIDATE = "control", "candidate"
PROMOTE, RETIRE = "promote", "retire"
# Why a decision was taken.
BETTER, WORSE, BUDGET, ADMIN = "better", "worse", "vote_budget_spent", "admin"
# Grid points for the integral: the error is far below the third decimal of a probability.
GRID_POINTS = 500
# With every Beta parameter of both arms at least this, P(better) comes from the normal
# approximation of the posteriors (within 0.005 of the integral, and a thousand times faster).
NORMAL_FROM = 30.0


@dataclass(frozen=True)
class GateSettings:
    confidence: float = 0.95
    min_votes: int = 30
    vote_budget: int = 400

    @property
    def evidence(self) -> float:
        """The Bayes factor a decision needs: the odds the confidence stands for (0.95: 19 to 1)."""
        return self.confidence / (1 - self.confidence)

    @classmethod
    def from_config(cls, loop: LoopConfig) -> GateSettings:
        return cls(confidence=loop.confidence, min_votes=loop.min_votes, vote_budget=loop.vote_budget)


@dataclass(frozen=True)
class Arm:
    """One arm's votes: how many, and their weighted likes and dislikes."""

    votes: int = 0
    likes: float = 0.0
    dislikes: float = 0.0
    images: int = 0

    @property
    def like_rate(self) -> float | None:
        total = self.likes + self.dislikes
        return self.likes / total if total > 0 else None

    def to_dict(self) -> dict[str, object]:
        rate = self.like_rate
        return {"votes": self.votes, "images": self.images, "weighted_likes": round(self.likes, 3),
                "weighted_dislikes": round(self.dislikes, 3), "like_rate": None if rate is None else round(rate, 4)}


@dataclass(frozen=True)
class Verdict:
    """The gate's reading of an experiment: a decision (or None: keep collecting) and its figures."""

    decision: str | None
    reason: str
    p_better: float
    control: Arm
    candidate: Arm
    settings: GateSettings
    # Bayes factors: the votes' evidence that the candidate is better (worse) than the control,
    # against the two being equal. A decision needs settings.evidence.
    evidence_better: float = 1.0
    evidence_worse: float = 1.0

    def to_dict(self) -> dict[str, object]:
        return {"decision": self.decision, "reason": self.reason, "p_better": round(self.p_better, 4),
                "evidence_better": round(self.evidence_better, 3), "evidence_worse": round(self.evidence_worse, 3),
                "control": self.control.to_dict(), "candidate": self.candidate.to_dict(),
                "settings": asdict(self.settings)}

    def explain(self) -> str:
        """One line for /stats and the admin channel."""
        odds = (f"P(candidate better) {self.p_better:.2f}, evidence {self.evidence_better:.1f}:1 better, "
                f"{self.evidence_worse:.1f}:1 worse")
        if self.decision == PROMOTE:
            return f"{odds}: promoted ({self.reason.replace('_', ' ')})"
        if self.decision == RETIRE:
            return f"{odds}: retired ({self.reason.replace('_', ' ')})"
        needed = max(0, self.settings.min_votes - min(self.control.votes, self.candidate.votes))
        if needed:
            return f"{odds}: collecting votes ({needed} more per arm before any decision)"
        left = self.settings.vote_budget - self.candidate.votes
        return (f"{odds}: undecided (a decision needs {self.settings.evidence:.0f}:1; retired undecided "
                f"after {left} more candidate votes)")


def _beta_densities(logs: list[tuple[float, float]], a: float, b: float) -> list[float]:
    """The Beta(a, b) density at each grid point given as (log x, log(1 - x)), unnormalised (the
    caller normalises over its grid), relative to the peak so large counts cannot underflow."""
    mode = min(max((a - 1) / (a + b - 2), 1e-12), 1 - 1e-12) if a + b > 2 else 0.5
    peak = (a - 1) * math.log(mode) + (b - 1) * math.log1p(-mode)
    return [math.exp((a - 1) * lx + (b - 1) * l1x - peak) for lx, l1x in logs]


def probability_better(candidate: Arm, control: Arm) -> float:
    """P(candidate's like rate > control's), each rate Beta(1 + likes, 1 + dislikes)."""
    params = [(1 + candidate.likes, 1 + candidate.dislikes), (1 + control.likes, 1 + control.dislikes)]
    if min(min(p) for p in params) >= NORMAL_FROM:
        (a1, b1), (a2, b2) = params
        mean = a1 / (a1 + b1) - a2 / (a2 + b2)
        var = a1 * b1 / ((a1 + b1) ** 2 * (a1 + b1 + 1)) + a2 * b2 / ((a2 + b2) ** 2 * (a2 + b2 + 1))
        return 0.5 * math.erfc(-mean / math.sqrt(2 * var))
    # Integrate over where either posterior has mass (its mean +- 12 sd), not all of [0, 1]: a
    # lopsided arm's peak can be narrower than a grid over [0, 1] resolves.
    low, high = 1.0, 0.0
    for a, b in params:
        mean = a / (a + b)
        sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        low, high = min(low, mean - 12 * sd), max(high, mean + 12 * sd)
    low, high = max(low, 1e-12), min(high, 1 - 1e-12)
    step = (high - low) / GRID_POINTS
    logs = [(math.log(x), math.log1p(-x)) for x in (low + (i + 0.5) * step for i in range(GRID_POINTS))]
    f_candidate = _beta_densities(logs, *params[0])
    f_control = _beta_densities(logs, *params[1])
    # P(X > Y) = integral of f_X(x) F_Y(x) dx, with F_Y the running sum (midpoint rule); both
    # normalised over the grid, which also takes care of the tails left outside it.
    below = 0.0
    integral = 0.0
    for fx, fy in zip(f_candidate, f_control, strict=True):
        integral += fx * (below + fy / 2)
        below += fy
    return min(1.0, max(0.0, integral / (sum(f_candidate) * below)))


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def log_bayes_factors(candidate: Arm, control: Arm, p_better: float) -> tuple[float, float]:
    """log BF(better : same) and log BF(worse : same): how much more likely the votes are if the
    candidate's rate is above (below) the control's than if the two are equal.

    "Same": one rate, Beta(1, 1), for both arms; "different": a rate each, Beta(1, 1) each;
    "better": "different" restricted to candidate > control (prior density doubled there), so
    BF(better : same) = 2 P(better | votes) BF(different : same). Binomial coefficients cancel.
    """
    different = (_log_beta(1 + candidate.likes, 1 + candidate.dislikes)
                 + _log_beta(1 + control.likes, 1 + control.dislikes))
    same = _log_beta(1 + candidate.likes + control.likes, 1 + candidate.dislikes + control.dislikes)
    tiny = 1e-300
    return (math.log(2 * max(p_better, tiny)) + different - same,
            math.log(2 * max(1 - p_better, tiny)) + different - same)


def evaluate(control: Arm, candidate: Arm, settings: GateSettings) -> Verdict:
    """The gate's decision on the arms as they stand."""
    p = probability_better(candidate, control)
    better, worse = log_bayes_factors(candidate, control, p)
    threshold = math.log(settings.evidence)

    def verdict(decision: str | None, reason: str = "") -> Verdict:
        return Verdict(decision, reason, p, control, candidate, settings, math.exp(min(better, 700.0)),
                       math.exp(min(worse, 700.0)))

    if min(control.votes, candidate.votes) >= settings.min_votes:
        if better >= threshold:
            return verdict(PROMOTE, BETTER)
        if worse >= threshold:
            return verdict(RETIRE, WORSE)
    if candidate.votes >= settings.vote_budget:
        return verdict(RETIRE, BUDGET)
    return verdict(None)


def arm_tallies(rows: Iterable[tuple[str, int, int, int]], weight: Callable[[int], float], max_share: float,
                images: Mapping[str, int] | None = None) -> tuple[Arm, Arm]:
    """(control, candidate) from (arm, user_id, likes, dislikes) rows, one per arm and rater:
    each vote counts its rater's weight, and no rater holds more than `max_share` of an arm's
    weight (twice an equal share among few raters, as in curation)."""
    per_arm: dict[str, list[tuple[int, int, int]]] = {CONTROL: [], CANDIDATE: []}
    for arm, user_id, likes, dislikes in rows:
        if arm in per_arm:
            per_arm[arm].append((user_id, likes, dislikes))
    arms = []
    for name in (CONTROL, CANDIDATE):
        raters = per_arm[name]
        caps = cap_factors({u: weight(u) * (likes + dislikes) for u, likes, dislikes in raters}, max_share)
        arms.append(Arm(votes=sum(likes + dislikes for _, likes, dislikes in raters),
                        likes=sum(weight(u) * caps[u] * likes for u, likes, _ in raters),
                        dislikes=sum(weight(u) * caps[u] * dislikes for u, _, dislikes in raters),
                        images=(images or {}).get(name, 0)))
    return arms[0], arms[1]


def experiment_verdict(store: Store, experiment: Experiment, gate: GateSettings, raters: RaterSettings,
                       model: RaterModel | None = None) -> Verdict:
    """The gate's verdict on an experiment's votes now, weighted by `model`, else by the weights the
    loop last stored (a rater it has not seen counts as the prior says). From asyncio code run it
    on the store's thread: `await async_store.call(experiment_verdict, experiment, gate, raters)`."""
    if model is not None:
        weigh = model.weight
    else:
        stored = store.rater_weights()

        def weigh(user_id: int) -> float:
            return stored.get(user_id, raters.prior_weight)

    control, candidate = arm_tallies(store.experiment_votes(experiment.id), weigh, raters.max_share,
                                     store.experiment_images(experiment.id))
    return evaluate(control, candidate, gate)


def describe(experiment: Experiment, verdict: Verdict) -> str:
    """One line for /stats, `loraloop db stats` and the admin channel: both arms and the verdict."""
    def arm(version: int, tally: Arm) -> str:
        rate = "-" if tally.like_rate is None else f"{tally.like_rate:.0%}"
        return f"v{version} {rate} liked ({tally.votes} votes on {tally.images} images)"

    return (f"{experiment.adapter}: candidate {arm(experiment.candidate_version, verdict.candidate)}, "
            f"{experiment.share:.0%} of requests, vs control {arm(experiment.control_version, verdict.control)}; "
            f"{verdict.explain()}")


@dataclass(frozen=True)
class Serving:
    """What `/imagine style:NAME` is served now: the default version, and the running experiment."""

    name: str
    version: int | None  # the default (promoted or hand-published) version; None: only unrecorded files
    experiment_id: int | None = None
    candidate_version: int | None = None
    share: float = 0.0


def serving(store: Store, name: str) -> Serving:
    """What `/imagine style:NAME` is served now (run it on the store's thread from asyncio)."""
    experiment = store.running_experiment(name)
    if experiment is not None:
        return Serving(name, experiment.control_version, experiment.id, experiment.candidate_version,
                       experiment.share)
    return Serving(name, store.default_version(name))


def choose_arm(serving: Serving, draw: float) -> tuple[int | None, str | None]:
    """(version, arm) for one request, `draw` uniform in [0, 1): the candidate with probability
    `share` while an experiment runs, else the default (arm None outside experiments)."""
    if serving.experiment_id is None or serving.candidate_version is None:
        return serving.version, None
    if draw < serving.share:
        return serving.candidate_version, CANDIDATE
    return serving.version, CONTROL
