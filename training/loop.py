"""Rounds that run themselves: `loraloop loop` watches the store, trains candidates, and lets the A/B
gate decide (the command itself is in training/cli.py).

    loraloop loop                  # until Ctrl-C: a pass every [loop] poll_seconds
    loraloop loop --once           # one pass, then exit (cron, or to see what it would do)
    loraloop run                   # with [loop] start_with_run = true, the loop runs beside bot and service

One pass (`LoopRunner.step`), reading and writing only the store and the adapters directory, so a
restart at any point resumes where it was (an experiment starts in the same transaction that
records its candidate, and a decision is one transaction too):

1. the rater model over every vote (`loraloop.raters.estimate`); its weights are saved to the
   store, where the bot reads them for /stats and /admin overrides;
2. each running experiment: both arms' weighted votes (`Store.experiment_votes`,
   `experiments.arm_tallies`) and the gate's verdict (`experiments.evaluate`); a promotion or a
   retirement is recorded with its figures (`Store.decide_experiment`), and the bot announces it
   in the admin channel;
3. each adapter without a running experiment, once its images have `min_new_votes` weighted
   votes since its last round: curate its images (`training.curate`, `[curation]`), train a fresh
   adapter (`[training]`), publish it as a candidate (`publish(..., experiment=...)`), never as
   the new default, and ask the service to reload;
4. personal styles (loraloop/profiles.py): each one asked for with /profile train (and, with
   `personal_auto`, everyone past `personal_min_votes` without one) is trained from that person's
   votes alone, kto on their likes and dislikes, and published as `personal-<id>` (no A/B gate:
   it answers to one person, who can compare it with /imagine personal:true); the files of
   deleted profiles (/profile delete, /optout) are removed.

Floor: training/ (torch, through the trainer); the gate and the rater model are the floor's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loraloop.config import Config
from loraloop.experiments import GateSettings, Verdict, experiment_verdict
from loraloop.profiles import personal_adapter_name, personal_owner
from loraloop.raters import RaterModel, RaterSettings, estimate
from loraloop.store import Experiment, Store
from training.publish import refresh_a1111_alias

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """A round the loop ran: the candidate it published, or why it could not."""

    adapter: str
    candidate_version: int | None = None
    control_version: int | None = None
    dataset: Path | None = None
    run: Path | None = None
    error: str | None = None
    new_votes: float = 0.0


@dataclass
class Pass:
    """What one pass of the loop did."""

    decisions: list[tuple[Experiment, Verdict]]
    rounds: list[RoundResult]
    raters: int = 0
    personal: list[RoundResult] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # personal adapters whose files were removed


class LoopRunner:
    """The loop for one configuration; `step()` is one pass, `run_forever()` repeats it."""

    def __init__(self, config: Config, service_url: str | None = None, service_token: str | None = None) -> None:
        self.config = config
        self.settings = config.loop
        self.gate = GateSettings.from_config(config.loop)
        self.raters = RaterSettings.from_config(config.curation)
        self.service_url = service_url or f"http://{config.service.host}:{config.service.port}"
        self.service_token = service_token
        # Adapter -> when a round failed (nothing to curate, say): wait for newer votes than that.
        self._failed_at: dict[str, str] = {}

    def step(self) -> Pass:
        with Store.from_config(self.config) as store:
            model = estimate(store.rated_votes(), self.raters)
            store.save_rater_weights((r.user_id, r.weight, r.votes, r.agreement) for r in model.raters.values())
            done = Pass(decisions=self._decide(store, model), rounds=[], raters=len(model.raters))
            for name in self.settings.adapters or store.adapter_names():
                refresh_a1111_alias(store, name, self.config.a1111_adapters_dir)
                if personal_owner(name) is None and store.running_experiment(name) is None:
                    result = self._maybe_round(store, model, name)
                    if result is not None:
                        done.rounds.append(result)
            done.removed = self._remove_deleted_profiles(store)
            for user_id in self._personal_due(store):
                done.personal.append(self.train_personal(store, user_id))
        return done

    def run_forever(self) -> None:
        """Pass after pass, `poll_seconds` apart, until interrupted; a failed pass is logged and retried."""
        log.info("loop: watching the store every %g s (gate: %s)", self.settings.poll_seconds, asdict(self.gate))
        while True:
            started = time.monotonic()
            try:
                self.step()
            except Exception:  # the loop outlives one bad pass (a locked database, a full disk)
                log.exception("loop: pass failed; trying again in %g s", self.settings.poll_seconds)
            time.sleep(max(0.0, self.settings.poll_seconds - (time.monotonic() - started)))

    # --- the gate --------------------------------------------------------------------------

    def verdict(self, store: Store, experiment: Experiment, model: RaterModel | None = None) -> Verdict:
        """The gate's reading of an experiment now (weights: the model given, else the stored ones)."""
        return experiment_verdict(store, experiment, self.gate, self.raters, model)

    def _decide(self, store: Store, model: RaterModel) -> list[tuple[Experiment, Verdict]]:
        decided = []
        for experiment in store.experiments(status="running"):
            verdict = self.verdict(store, experiment, model)
            if verdict.decision is None:
                continue
            if store.decide_experiment(experiment.id, decision=verdict.decision, reason=verdict.reason,
                                       decided_by="gate", figures=verdict.to_dict()):
                log.info("loop: %s v%d %s: %s", experiment.adapter, experiment.candidate_version,
                         verdict.decision, verdict.explain())
                decided.append((experiment, verdict))
        return decided

    # --- rounds ----------------------------------------------------------------------------

    def _last_round_at(self, store: Store, name: str) -> str:
        """When NAME's last experiment was decided (or began, while it runs), else when its
        newest version was published: votes after that are new. Votes cast during an experiment
        decided the experiment; the next round waits for votes on the version that won."""
        experiments = store.experiments(adapter=name)
        if experiments:
            return experiments[0].decided_at or experiments[0].started_at
        versions = store.adapters(name)
        return versions[-1].created_at if versions else ""

    def _maybe_round(self, store: Store, model: RaterModel, name: str) -> RoundResult | None:
        control = store.default_version(name)
        if control is None:
            return None  # only hand-placed files: the first version is published by hand
        since = max(self._last_round_at(store, name), self._failed_at.get(name, ""))
        new_votes = sum(model.weight(user) * n for user, n in store.votes_since(name, since).items())
        if new_votes < self.settings.min_new_votes:
            return None
        log.info("loop: %s has %.1f new weighted votes since %s: training a candidate", name, new_votes, since)
        result = self.run_round(store, name, control, new_votes)
        if result.error is not None:
            self._failed_at[name] = store.now()
            log.warning("loop: %s: round failed: %s", name, result.error)
        return result

    def run_round(self, store: Store, name: str, control: int, new_votes: float = 0.0) -> RoundResult:
        """Curate NAME's votes, train a fresh adapter, publish it as a candidate against `control`."""
        from training.curate import CurationError
        from training.publish import PublishError, publish, tell_service
        from training.train import TrainError

        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        dataset = self.config.data_dir / "datasets" / f"{name}-loop-{stamp}"
        run = self.config.data_dir / "runs" / f"{name}-loop-{stamp}"
        try:
            self.curate(store, name, dataset)
            self.train(name, dataset, run)
            published = publish(run, name, self.config.adapters_dir, store, self.config.a1111_adapters_dir,
                                experiment={
                                    "control_version": control, "share": self.settings.share,
                                    "settings": {**asdict(self.gate),
                                                 "rater_prior_accuracy": self.raters.prior_accuracy,
                                                 "rater_prior_votes": self.raters.prior_votes,
                                                 "max_rater_share": self.raters.max_share},
                                })
        except (CurationError, TrainError, PublishError) as exc:
            return RoundResult(adapter=name, control_version=control, dataset=dataset, error=str(exc),
                               new_votes=new_votes)
        try:
            told = asyncio.run(tell_service(self.service_url, self.service_token, published))
        except Exception as exc:  # noqa: BLE001  the candidate is recorded; the service loads it at its next start
            told = f"could not tell the service ({exc})"
        log.info("loop: %s v%d is a candidate against v%d (%.0f%% of /imagine style:%s); %s", name,
                 published.version, control, 100 * self.settings.share, name, told)
        return RoundResult(adapter=name, candidate_version=published.version, control_version=control,
                           dataset=dataset, run=run, new_votes=new_votes)

    # --- personal styles -------------------------------------------------------------------

    def _personal_due(self, store: Store) -> list[int]:
        due = [p.user_id for p in store.profiles(status="requested")]
        if self.settings.personal_auto:
            known = {p.user_id for p in store.profiles()}
            due += [u for u in store.voters_with(self.settings.personal_min_votes) if u not in known]
        return due

    def train_personal(self, store: Store, user_id: int) -> RoundResult:
        """USER's personal style from their votes alone: kto on their likes and dislikes."""
        from training.curate import CurationError, CurationSettings, curate
        from training.publish import PublishError, publish, tell_service
        from training.train import Job, TrainError, train, validate

        name = personal_adapter_name(user_id)
        votes = store.user_votes(user_id)
        if votes < self.settings.personal_min_votes:
            error = f"{votes} votes; a personal style needs {self.settings.personal_min_votes}"
            store.set_profile(user_id, "failed", error=error)
            return RoundResult(adapter=name, error=error, new_votes=votes)
        store.set_profile(user_id, "training")
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        dataset = self.config.data_dir / "datasets" / f"{name}-{stamp}"
        run = self.config.data_dir / "runs" / f"{name}-{stamp}"
        # Their own images count (people rate what they asked for), and there is one rater: the
        # rater model's weight would scale every example alike, and loss weights are scaled to a
        # mean of 1 anyway, so it is off; one vote is enough to label an image.
        settings = CurationSettings.from_config(self.config.curation, format="kto", voter=user_id,
                                                include_self_votes=True, rater_model=False, min_raters=1)
        try:
            curate(store, dataset, settings)
            train(validate(Job(dataset=dataset, name=name, model=self.config.service.model,
                               settings=replace(self.config.training, objective="kto"),
                               data_dir=self.config.data_dir, output=run)))
            # No A1111 copy: that folder is shared, and a personal style is not.
            published = publish(run, name, self.config.adapters_dir, store)
        except (CurationError, TrainError, PublishError) as exc:
            store.set_profile(user_id, "failed", error=str(exc))
            log.warning("loop: personal style of %s failed: %s", user_id, exc)
            return RoundResult(adapter=name, dataset=dataset, error=str(exc), new_votes=votes)
        store.set_profile(user_id, "ready", version=published.version, votes=votes)
        try:
            told = asyncio.run(tell_service(self.service_url, self.service_token, published))
        except Exception as exc:  # noqa: BLE001  recorded; the service loads it at its next reload or start
            told = f"could not tell the service ({exc})"
        log.info("loop: personal style %s v%d from %d votes; %s", name, published.version, votes, told)
        return RoundResult(adapter=name, candidate_version=published.version, dataset=dataset, run=run,
                           new_votes=votes)

    def _remove_deleted_profiles(self, store: Store) -> list[str]:
        from training.publish import remove_adapter

        removed = [name for profile in store.profiles(status="deleted")
                   if remove_adapter(name := personal_adapter_name(profile.user_id), self.config.adapters_dir)]
        if removed:
            from generation.client import ServiceClient

            async def reload() -> None:
                async with ServiceClient(self.service_url, token=self.service_token) as client:
                    await client.reload_adapters()

            try:
                asyncio.run(reload())
            except Exception as exc:  # noqa: BLE001  the files are gone; the service forgets them at its next reload
                log.warning("loop: removed %s but could not tell the service (%s)", ", ".join(removed), exc)
            log.info("loop: removed the personal style(s) %s", ", ".join(removed))
        return removed

    def curate(self, store: Store, name: str, out: Path) -> None:
        """Every vote on NAME's images (all versions, both arms) into a dataset, as `[curation]` says."""
        from training.curate import CurationSettings, curate

        curate(store, out, CurationSettings.from_config(self.config.curation, adapter=name))

    def train(self, name: str, dataset: Path, run: Path) -> None:
        """A fresh adapter on the dataset, as `[training]` says (the same as `loraloop train`)."""
        from training.train import Job, train, validate

        train(validate(Job(dataset=dataset, name=name, model=self.config.service.model,
                           settings=self.config.training, data_dir=self.config.data_dir, output=run)))
