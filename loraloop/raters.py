"""The rater model: how much each person's 👍/👎 should count, estimated from the votes themselves.

    model = estimate(votes, RaterSettings())         # votes: (image_id, user_id, +1 | -1)
    model.weight(user_id)                            # what one of their votes counts, 0 to 1
    likes, dislikes = model.tally(votes_on_one_image)  # weighted
    model.posterior[image_id]                        # P(the community likes this image)

Curation (`training/curate.py`), the A/B gate (`loraloop/experiments.py`), `loraloop db raters`
and the loop all use these weights, so a vote counts the same everywhere. Floor: imports only
the standard library and `loraloop.config`, so the bot and the floor's CLI can use it without
numpy or torch.

**The model** is Dawid and Skene's (A. P. Dawid, A. M. Skene, "Maximum likelihood estimation of
observer error-rates using the EM algorithm", Applied Statistics 28(1), 1979) for two classes:
each image is, unseen, to the community's taste or not (prior P(liked) = pi); each rater r has
a sensitivity a_r = P(👍 | liked) and a specificity b_r = P(👎 | not liked), and votes
independently given the image's class. EM alternates the posterior of each image's class
(E-step) and each rater's (a_r, b_r) and pi (M-step) until the posteriors settle. Two coins
rather than one accuracy, because "likes everything" (a = 1, b = 0) is a common way to be
uninformative. The assumptions: a rater's error rates are the same on every image they rate,
and raters err independently given the image (collusion breaks this; see lockstep below).

What this module adds to the textbook EM, each because of a failure it prevents:

- **A prior** (as in Raykar et al., "Learning from crowds", JMLR 11, 2010): a_r and b_r are
  posterior means under Beta(prior_accuracy * prior_votes, (1 - prior_accuracy) * prior_votes),
  so a rater with a handful of votes stays near the prior instead of being trusted or written
  off on two coincidences. A prior accuracy above one half also breaks EM's label-swap symmetry
  in favour of the solution in which most raters are better than chance.
- **Weights, not inversions.** A rater's weight is Youden's J = a_r + b_r - 1, clipped at 0:
  1 for a perfect rater, 0 for a random one or one who likes everything, and 0 (not negative)
  for one who votes against the consensus. Textbook DS would read an adversarial rater's votes
  upside down; that lets a determined account steer by design and punishes a genuine minority
  taste as if it were information, so such raters simply stop counting.
- **A cap on any one rater's share** of the weight in the votes being modelled
  (`max_share`), inside EM as well as in the final weights: a few very active accounts cannot
  set the consensus that everyone else is then judged against.
- **Lockstep blocs.** Two accounts who rated at least `LOCKSTEP_MIN_SHARED` images in common,
  agreed on at least `LOCKSTEP_AGREEMENT` of them and each agreed with everyone else's
  consensus on fewer than `LOCKSTEP_CONSENSUS` of their votes are one bloc voting against the
  community (a brigade, or alt accounts): every member's weight goes to 0, and EM runs again
  without them.

Weights are relative to the votes given: curation models the votes of the images it selects,
so a dataset's report explains itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loraloop.config import CurationConfig

# Lockstep: pairs need this many co-rated images before their agreement means anything ...
LOCKSTEP_MIN_SHARED = 8
# ... this much agreement with each other (independent 95%-accurate raters agree ~90%, but only
# when both are right; against the consensus that is rare) ...
LOCKSTEP_AGREEMENT = 0.85
# ... and less than this agreement with the consensus of everyone but the pair.
LOCKSTEP_CONSENSUS = 0.5
# EM stops when no rater's sensitivity or specificity moves more than this, or after MAX_ITERATIONS.
TOLERANCE = 1e-3
MAX_ITERATIONS = 50
# The class prior stays inside this range, so one lopsided selection cannot pin it at 0 or 1.
PI_RANGE = (0.05, 0.95)

# Why a rater's weight is what it is (RaterEstimate.reasons).
CAPPED = "capped"
LOCKSTEP = "lockstep"
AGAINST_CONSENSUS = "against_consensus"
FEW_VOTES = "few_votes"


@dataclass(frozen=True)
class RaterSettings:
    """How the model treats raters; the defaults are `[curation]`'s (see config.toml)."""

    # Off: every vote counts 1 (the cap still applies); for comparison and for tiny servers.
    enabled: bool = True
    prior_accuracy: float = 0.7
    prior_votes: float = 6.0
    # Largest share of the total weight one rater may hold; 1 turns the cap off.
    max_share: float = 0.1

    def __post_init__(self) -> None:
        if not 0.5 < self.prior_accuracy < 1:
            raise ValueError("prior_accuracy must be between 0.5 and 1")
        if self.prior_votes <= 0:
            raise ValueError("prior_votes must be positive")
        if not 0 < self.max_share <= 1:
            raise ValueError("max_share must be in (0, 1]")

    @classmethod
    def from_config(cls, curation: CurationConfig) -> RaterSettings:
        """The rater model as `[curation]` configures it."""
        return cls(enabled=curation.rater_model, prior_accuracy=curation.rater_prior_accuracy,
                   prior_votes=curation.rater_prior_votes, max_share=curation.max_rater_share)

    @property
    def prior_weight(self) -> float:
        """The weight of a rater the model has no votes from: Youden's J at the prior."""
        return 2 * self.prior_accuracy - 1 if self.enabled else 1.0


@dataclass(frozen=True)
class RaterEstimate:
    """One rater as the model sees them."""

    user_id: int
    votes: int
    likes: int
    # Share of their votes that agree with everyone else's consensus (None: nothing to compare).
    agreement: float | None
    sensitivity: float  # P(👍 | the community likes it)
    specificity: float  # P(👎 | it does not)
    reliability: float  # Youden's J, clipped at 0: what a vote would count before cap and lockstep
    weight: float  # what one of their votes counts, 0 to 1
    reasons: tuple[str, ...] = ()
    lockstep_with: tuple[int, ...] = ()

    def explain(self) -> str:
        """Why the weight is what it is, in a few words."""
        parts = []
        if LOCKSTEP in self.reasons:
            parts.append("votes in lockstep with " + ", ".join(str(u) for u in self.lockstep_with)
                         + " against the consensus")
        elif AGAINST_CONSENSUS in self.reasons:
            parts.append("no better than chance against the consensus")
        if CAPPED in self.reasons:
            parts.append("capped: too large a share of all the weight")
        if FEW_VOTES in self.reasons:
            parts.append("few votes: mostly the prior")
        return "; ".join(parts) or "reliable"

    def to_dict(self) -> dict[str, object]:
        return {"user_id": self.user_id, "votes": self.votes, "likes": self.likes,
                "agreement": None if self.agreement is None else round(self.agreement, 4),
                "sensitivity": round(self.sensitivity, 4), "specificity": round(self.specificity, 4),
                "reliability": round(self.reliability, 4), "weight": round(self.weight, 4),
                "why": self.explain(), "lockstep_with": list(self.lockstep_with)}


@dataclass
class RaterModel:
    """Estimated raters and image posteriors for one set of votes."""

    settings: RaterSettings
    raters: dict[int, RaterEstimate] = field(default_factory=dict)
    # Image id -> P(the community likes it), from every weighted vote on it.
    posterior: dict[int, float] = field(default_factory=dict)
    # P(an image is liked) before its votes are seen.
    liked_prior: float = 0.5
    iterations: int = 0

    def weight(self, user_id: int) -> float:
        """What one vote of `user_id` counts; a rater the model never saw counts as the prior says."""
        rater = self.raters.get(user_id)
        return rater.weight if rater is not None else self.settings.prior_weight

    def tally(self, votes: Iterable[tuple[int, int]]) -> tuple[float, float]:
        """Weighted (likes, dislikes) of (user_id, value) votes."""
        likes = dislikes = 0.0
        for user_id, value in votes:
            if value > 0:
                likes += self.weight(user_id)
            else:
                dislikes += self.weight(user_id)
        return likes, dislikes

    def weights(self) -> dict[int, float]:
        return {user_id: rater.weight for user_id, rater in self.raters.items()}


def cap_factors(totals: Mapping[int, float], max_share: float) -> dict[int, float]:
    """Per rater, the factor (0-1] that brings their share of the summed totals to at most
    `max_share`, taking the excess off the largest first (water-filling).

    Among few raters a small cap would force everyone to the same total (ten raters at 10%
    each), so the cap is never below twice an equal share (2/n of n raters with a positive
    total). Raters with a total of 0 keep factor 1.
    """
    factors = dict.fromkeys(totals, 1.0)
    positive = {u: t for u, t in totals.items() if t > 0}
    share = max(max_share, 2 / len(positive)) if positive else 1.0
    if share >= 1:
        return factors
    capped: set[int] = set()
    while True:
        # The capped raters hold `share` of the final total each; the others keep theirs.
        free = sum(t for u, t in positive.items() if u not in capped)
        total = free / (1 - share * len(capped))
        newly = {u for u, t in positive.items() if u not in capped and t > share * total * (1 + 1e-12)}
        if not newly:
            break
        capped |= newly
    for user_id in capped:
        factors[user_id] = share * total / positive[user_id]
    return factors


def estimate(votes: Iterable[tuple[int, int, int]], settings: RaterSettings | None = None) -> RaterModel:
    """The rater model of `votes`, (image_id, user_id, value) with value +1 or -1."""
    settings = settings or RaterSettings()
    data = _Votes.build(votes)
    model = RaterModel(settings=settings)
    if not data.users:
        return model
    if not settings.enabled:
        return _equal_weights(data, settings)
    state = _em(data, settings, excluded=set())
    blocs = _lockstep_blocs(data, _Consensus.of(data, state))
    if blocs:
        state = _em(data, settings, excluded=set(blocs))
    return _finish(data, settings, state, blocs)


# --- the data ---------------------------------------------------------------------------------


@dataclass
class _Votes:
    """Votes indexed both ways, by position: image k's votes and rater j's votes."""

    images: list[int]
    users: list[int]
    by_image: list[list[tuple[int, int]]]  # image k -> [(rater j, value)]
    by_user: list[list[tuple[int, int]]]  # rater j -> [(image k, value)]

    @classmethod
    def build(cls, votes: Iterable[tuple[int, int, int]]) -> _Votes:
        image_index: dict[int, int] = {}
        user_index: dict[int, int] = {}
        by_image: list[list[tuple[int, int]]] = []
        by_user: list[list[tuple[int, int]]] = []
        for image_id, user_id, value in votes:
            k = image_index.setdefault(image_id, len(image_index))
            if k == len(by_image):
                by_image.append([])
            j = user_index.setdefault(user_id, len(user_index))
            if j == len(by_user):
                by_user.append([])
            sign = 1 if value > 0 else -1
            by_image[k].append((j, sign))
            by_user[j].append((k, sign))
        return cls(images=list(image_index), users=list(user_index), by_image=by_image, by_user=by_user)


@dataclass
class _State:
    q: list[float]  # per image, P(liked)
    sensitivity: list[float]
    specificity: list[float]
    influence: list[float]  # per rater, multiplier on their log-likelihood ratios (cap, exclusion)
    pi: float
    iterations: int


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)
    return e / (1 + e)


def _em(data: _Votes, settings: RaterSettings, excluded: set[int]) -> _State:
    n_users, n_images = len(data.users), len(data.images)
    a0 = settings.prior_accuracy * settings.prior_votes
    # Flat per-vote columns: one pass over them per step is what EM costs.
    vote_image = [k for k, votes in enumerate(data.by_image) for _ in votes]
    vote_user = [j for votes in data.by_image for j, _ in votes]
    vote_liked = [value > 0 for votes in data.by_image for _, value in votes]
    counts = [len(votes) for votes in data.by_user]
    # Start from the capped share of likes, every vote counting 1: a consensus no single
    # hyperactive account can set.
    start = cap_factors({j: float(counts[j]) for j in range(n_users) if j not in excluded}, settings.max_share)
    likes, total = [0.0] * n_images, [0.0] * n_images
    for k, j, liked in zip(vote_image, vote_user, vote_liked, strict=True):
        f = start.get(j, 0.0)
        total[k] += f
        if liked:
            likes[k] += f
    q = [(0.5 + likes[k]) / (1 + total[k]) for k in range(n_images)]
    sensitivity = [settings.prior_accuracy] * n_users
    specificity = [settings.prior_accuracy] * n_users
    influence = [0.0] * n_users
    pi = 0.5
    iterations = 0
    while iterations < MAX_ITERATIONS:
        iterations += 1
        # M-step: each rater's two coins as posterior means under the Beta prior; the class prior.
        liked_mass, liked_yes, disliked_no = [0.0] * n_users, [0.0] * n_users, [0.0] * n_users
        for k, j, liked in zip(vote_image, vote_user, vote_liked, strict=True):
            qk = q[k]
            liked_mass[j] += qk
            if liked:
                liked_yes[j] += qk
            else:
                disliked_no[j] += 1 - qk
        previous = sensitivity[:], specificity[:]
        for j in range(n_users):
            sensitivity[j] = (a0 + liked_yes[j]) / (settings.prior_votes + liked_mass[j])
            specificity[j] = (a0 + disliked_no[j]) / (settings.prior_votes + counts[j] - liked_mass[j])
        pi = min(max(sum(q) / n_images, PI_RANGE[0]), PI_RANGE[1])
        reliability = [max(0.0, sensitivity[j] + specificity[j] - 1) for j in range(n_users)]
        caps = cap_factors({j: reliability[j] * counts[j] for j in range(n_users) if j not in excluded},
                           settings.max_share)
        influence = [0.0 if j in excluded or reliability[j] <= 0 else caps[j] for j in range(n_users)]
        like_ratio = [influence[j] * math.log(sensitivity[j] / (1 - specificity[j])) for j in range(n_users)]
        dislike_ratio = [influence[j] * math.log((1 - sensitivity[j]) / specificity[j]) for j in range(n_users)]
        # E-step: each image's posterior from the prior and its raters' likelihood ratios.
        log_odds = [_logit(pi)] * n_images
        for k, j, liked in zip(vote_image, vote_user, vote_liked, strict=True):
            log_odds[k] += like_ratio[j] if liked else dislike_ratio[j]
        q = [_sigmoid(x) for x in log_odds]
        moved = max(max(abs(a - b) for a, b in zip(sensitivity, previous[0], strict=True)),
                    max(abs(a - b) for a, b in zip(specificity, previous[1], strict=True)))
        if moved < TOLERANCE:
            break
    return _State(q=q, sensitivity=sensitivity, specificity=specificity, influence=influence, pi=pi,
                  iterations=iterations)


@dataclass
class _Consensus:
    """Each vote's contribution to its image's log-odds under one EM state, and their sums."""

    totals: list[float]  # image k -> summed vote log-odds (without the class prior)
    contributions: list[list[float]]  # rater j -> one per vote, in data.by_user[j]'s order

    @classmethod
    def of(cls, data: _Votes, state: _State) -> _Consensus:
        totals = [0.0] * len(data.images)
        contributions = []
        for j, rater_votes in enumerate(data.by_user):
            a, b, f = state.sensitivity[j], state.specificity[j], state.influence[j]
            like, dislike = (f * math.log(a / (1 - b)), f * math.log((1 - a) / b)) if f else (0.0, 0.0)
            mine = [like if value > 0 else dislike for _, value in rater_votes]
            for (k, _), c in zip(rater_votes, mine, strict=True):
                totals[k] += c
            contributions.append(mine)
        return cls(totals=totals, contributions=contributions)

    def agreement(self, data: _Votes, j: int, partner: int | None = None) -> tuple[int, int]:
        """(agreeing, compared): rater j's votes against the consensus of everyone but j (and
        `partner`), on the images where that consensus has a side."""
        partner_votes: dict[int, float] = {}
        if partner is not None:
            partner_votes = {k: c for (k, _), c in zip(data.by_user[partner], self.contributions[partner],
                                                       strict=True)}
        agree = compared = 0
        for (k, value), mine in zip(data.by_user[j], self.contributions[j], strict=True):
            others = self.totals[k] - mine - partner_votes.get(k, 0.0)
            if abs(others) < 1e-9:
                continue
            compared += 1
            agree += (others > 0) == (value > 0)
        return agree, compared


def _lockstep_blocs(data: _Votes, consensus: _Consensus) -> dict[int, tuple[int, ...]]:
    """Rater index -> the other members of their lockstep bloc, for every rater in one."""
    # Only raters who disagree with the rest often enough can be in a bloc: counting co-votes of
    # every pair would cost (votes per image)^2 per image. A partner's vote can lift a member's
    # leave-one-out agreement, hence the margin over LOCKSTEP_CONSENSUS.
    candidates = set()
    for j, rater_votes in enumerate(data.by_user):
        if len(rater_votes) < LOCKSTEP_MIN_SHARED:
            continue
        agree, compared = consensus.agreement(data, j)
        if compared and agree < (LOCKSTEP_CONSENSUS + 0.25) * compared:
            candidates.add(j)
    shared: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])  # (j1, j2) -> [same, shared]
    for votes in data.by_image:
        present = [(j, v) for j, v in votes if j in candidates]
        for x, (j1, v1) in enumerate(present):
            for j2, v2 in present[x + 1:]:
                counts = shared[(j1, j2) if j1 < j2 else (j2, j1)]
                counts[0] += v1 == v2
                counts[1] += 1
    partners: dict[int, set[int]] = defaultdict(set)
    for (j1, j2), (same, count) in shared.items():
        if count < LOCKSTEP_MIN_SHARED or same < LOCKSTEP_AGREEMENT * count:
            continue
        against = True
        for j, partner in ((j1, j2), (j2, j1)):
            agree, compared = consensus.agreement(data, j, partner)
            if compared < LOCKSTEP_MIN_SHARED or agree >= LOCKSTEP_CONSENSUS * compared:
                against = False
        if against:
            partners[j1].add(j2)
            partners[j2].add(j1)
    # Blocs are the connected groups of such pairs.
    blocs: dict[int, tuple[int, ...]] = {}
    for start in partners:
        if start in blocs:
            continue
        group, todo = {start}, [start]
        while todo:
            for other in partners[todo.pop()]:
                if other not in group:
                    group.add(other)
                    todo.append(other)
        for member in group:
            blocs[member] = tuple(sorted(data.users[o] for o in group if o != member))
    return blocs


def _finish(data: _Votes, settings: RaterSettings, state: _State,
            blocs: dict[int, tuple[int, ...]]) -> RaterModel:
    n_users = len(data.users)
    reliability = [max(0.0, state.sensitivity[j] + state.specificity[j] - 1) for j in range(n_users)]
    raw = [0.0 if j in blocs else reliability[j] for j in range(n_users)]
    caps = cap_factors({j: raw[j] * len(data.by_user[j]) for j in range(n_users)}, settings.max_share)
    consensus = _Consensus.of(data, state)
    model = RaterModel(settings=settings, liked_prior=state.pi, iterations=state.iterations)
    prior_log_odds = _logit(state.pi)
    for k, image_id in enumerate(data.images):
        model.posterior[image_id] = _sigmoid(prior_log_odds + consensus.totals[k])
    for j, user_id in enumerate(data.users):
        agree, compared = consensus.agreement(data, j)
        reasons = []
        if j in blocs:
            reasons.append(LOCKSTEP)
        elif reliability[j] <= 0:
            reasons.append(AGAINST_CONSENSUS)
        if caps[j] < 1 - 1e-9:
            reasons.append(CAPPED)
        if len(data.by_user[j]) < settings.prior_votes:
            reasons.append(FEW_VOTES)
        model.raters[user_id] = RaterEstimate(
            user_id=user_id, votes=len(data.by_user[j]), likes=sum(v > 0 for _, v in data.by_user[j]),
            agreement=agree / compared if compared else None,
            sensitivity=state.sensitivity[j], specificity=state.specificity[j], reliability=reliability[j],
            weight=raw[j] * caps[j], reasons=tuple(reasons), lockstep_with=blocs.get(j, ()),
        )
    return model


def _equal_weights(data: _Votes, settings: RaterSettings) -> RaterModel:
    """Every vote counts 1 (then the cap): the model switched off."""
    caps = cap_factors({j: float(len(votes)) for j, votes in enumerate(data.by_user)}, settings.max_share)
    model = RaterModel(settings=settings)
    for j, user_id in enumerate(data.users):
        votes = data.by_user[j]
        model.raters[user_id] = RaterEstimate(
            user_id=user_id, votes=len(votes), likes=sum(v > 0 for _, v in votes), agreement=None,
            sensitivity=1.0, specificity=1.0, reliability=1.0, weight=caps[j],
            reasons=(CAPPED,) if caps[j] < 1 - 1e-9 else ())
    for k, image_id in enumerate(data.images):
        likes, dislikes = model.tally((data.users[j], v) for j, v in data.by_image[k])
        model.posterior[image_id] = (0.5 + likes) / (1 + likes + dislikes)
    return model
