"""Prove the loop learns: simulated raters with a hidden taste drive the real product on the tiny model.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loop.py --diagnose                      # can the model show a taste?
    OMP_NUM_THREADS=1 .venv/bin/python bench/loop.py                                 # sft, kto, dpo; clean raters
    OMP_NUM_THREADS=1 .venv/bin/python bench/loop.py --pretrained-base /tmp/loraloop-loop-base \
        --grid bench/loop_grid.png
    OMP_NUM_THREADS=1 .venv/bin/python bench/loop.py --pretrained-base /tmp/loraloop-loop-base \
        --scenario brigade --filters strict --rounds 1 --json brigade.json

Everything a person would do goes through the product's own code: images are made by the real
generation service (`start_service`) through `ServiceClient`, recorded and voted on through the
same store calls the bot makes (`record_generation`, `add_image`, `set_image_message`, a vote
looked up by message id and `set_vote`), curated with `training.curate.curate`, trained with
`training.train`, published with `training.publish` and used by name (`loop@N`) for the next
images. Only the people are simulated.

The raters (`Panel`) share one hidden, measurable taste (`TASTES`: warm = mean red minus mean
blue, cool, bright, dark). Each calibrates once on the first images shown to them: an image is
to their taste when it scores above the median of those, give or take a personal offset. Clean
raters still misjudge now and then (`flip`); the noisy scenario makes 30% of the raters vote at
random; the brigade adds a few raters with the opposite taste who vote on ten times as many
images. The calibration stays fixed afterwards, so "better liked" can be measured at all (raters
who re-centred on every batch would like half of anything).

A round: generate images from the newest version (the base model first), everyone votes, curate
all votes so far in the objective's format, train a fresh adapter, publish it as the next
version of `loop`. The measure: fresh prompts and seeds never used in training, rendered by the
base model and by each version, every honest rater voting on every one; the like rate with a
95% Wilson interval that counts images, not votes (votes on one image are not independent).

The random tiny model cannot show a taste (`--diagnose`: its images differ by a fraction of an
8-bit level, and its random VAE does not give back what it encodes), so `--pretrained-base`
first teaches it to draw smooth colour fields (`pretrain_base`, a few minutes once, cached).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Run as a script, this file's folder comes first on sys.path; keep it from shadowing packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("bench.loop")

ADAPTER = "loop"
EMOJI = {1: "👍", -1: "👎"}
OBJECTIVES = ("sft", "kto", "dpo")
# Words the prompts are made of: what they say matters little to a random-weight model, but
# training and measuring must use different prompts, so the adapter cannot just memorise them.
SUBJECTS = ("fox", "lighthouse", "teapot", "mountain", "bicycle", "owl", "harbour", "cactus", "violin",
            "castle", "jellyfish", "tram", "orchard", "robot", "glacier", "lantern")
STYLES = ("at dawn", "in the rain", "oil painting", "pixel art", "macro photo", "at night",
          "watercolour", "isometric")


# --- a base model with something to like -------------------------------------------------------


def colour_fields(count: int, size: int, generator) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1], (count, 3, size, size): varied in hue and brightness."""
    import torch
    import torch.nn.functional as F

    coarse = torch.rand((count, 3, 4, 4), generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


def pretrain_base(tiny: Path, out: Path, size: int, vae_steps: int = 150, unet_steps: int = 300,
                  seed: int = 0) -> Path:
    """The tiny model taught to autoencode and draw smooth colour fields: a stand-in for real weights.

    The random tiny model draws the same flat grey for every prompt and seed (`--diagnose`: the
    warmth of its images spreads over 0.26 of an 8-bit level), and its random VAE does not give
    back what it encodes (warmth before and after encode -> decode correlate 0.03), so there is
    little for raters to prefer and nothing an adapter could learn from pixels. A real base
    model has neither problem. This teaches the tiny VAE to reconstruct and the UNet to denoise
    colour fields (after it: 1.7 levels and 0.76), once, cached in `out`; every later step of
    the bench uses the model through the product, untouched.
    """
    import shutil

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    marker = out / "LORALOOP_LOOP_BASE"
    stamp = f"{size}/{vae_steps}/{unet_steps}/{seed}"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tiny, out)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for _ in range(vae_steps):
        pixels = colour_fields(16, size, generator)
        posterior = vae.encode(pixels).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator=generator)).sample, pixels)
        # A light KL: reconstruction first (a heavier one, 1e-5, left the VAE drawing grey).
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.requires_grad_(False)
    with torch.no_grad():
        # Unit-variance latents, as SD's scaling factor gives its own VAE.
        spread = vae.encode(colour_fields(64, size, generator)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / spread)
    log.info("base: VAE reconstructs colour fields (mse %.4f), latent scale %.3f", loss.item(), 1.0 / spread)

    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    noise_scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    with torch.no_grad():
        ids = tokenizer(prompts(16, offset=50_000), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        embeddings = text_encoder(ids)[0]  # (16, 77, D)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for _ in range(unet_steps):
        with torch.no_grad():
            latents = vae.encode(colour_fields(16, size, generator)).latent_dist.sample(generator=generator)
            latents = latents * vae.config.scaling_factor  # (16, 4, size/2, size/2)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (16,), generator=generator)
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, embeddings).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    log.info("base: UNet denoises colour fields (loss %.4f); %.0f s", loss.item(), time.perf_counter() - started)
    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    marker.write_text(stamp)
    return out


# --- the hidden taste -------------------------------------------------------------------------


def _channel_means(png: bytes) -> tuple[float, float, float]:
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(png)) as image:
        return tuple(ImageStat.Stat(image.convert("RGB")).mean)  # type: ignore[return-value]


def warmth(png: bytes) -> float:
    red, _, blue = _channel_means(png)
    return red - blue


def brightness(png: bytes) -> float:
    red, green, blue = _channel_means(png)
    return 0.299 * red + 0.587 * green + 0.114 * blue


TASTES: dict[str, Callable[[bytes], float]] = {
    "warm": warmth,
    "cool": lambda png: -warmth(png),
    "bright": brightness,
    "dark": lambda png: -brightness(png),
}


@dataclass(frozen=True)
class Rater:
    user_id: int
    # +1 shares the server's taste; -1 likes the opposite (the brigade).
    sign: int = 1
    # Chance of voting on an image they are shown: the brigade's is ten times the others'.
    activity: float = 0.3
    # Chance of a vote against their own taste (a misjudgement); random raters ignore taste.
    flip: float = 0.05
    random: bool = False
    # Where their taste tips over, in units of the calibration spread around the median.
    offset: float = 0.0

    @property
    def honest(self) -> bool:
        return self.sign > 0


@dataclass(frozen=True)
class Scenario:
    """Who votes: counts, noise and the brigade."""

    raters: int = 24
    activity: float = 0.25
    flip: float = 0.05
    random_share: float = 0.0
    brigade: int = 0
    brigade_activity_factor: float = 10.0


SCENARIOS = {
    "clean": Scenario(),
    "noisy": Scenario(random_share=0.3),
    # Two raters who like the opposite and vote on every image, ten times as often as the 24
    # others: ~2.4 honest and 2 brigade votes per image, so nearly half the votes pull the other way.
    "brigade": Scenario(activity=0.1, brigade=2),
}


class Panel:
    """The simulated raters and their votes; all randomness comes from one seeded generator."""

    def __init__(self, scenario: Scenario, taste: str, seed: int) -> None:
        self.taste_name = taste
        self.taste = TASTES[taste]
        self.rng = random.Random(seed)
        count_random = round(scenario.raters * scenario.random_share)
        self.raters: list[Rater] = []
        for i in range(scenario.raters):
            self.raters.append(Rater(user_id=1000 + i, activity=scenario.activity, flip=scenario.flip,
                                     random=i < count_random, offset=self.rng.gauss(0.0, 0.25)))
        brigade_activity = min(1.0, scenario.activity * scenario.brigade_activity_factor)
        for i in range(scenario.brigade):
            self.raters.append(Rater(user_id=9000 + i, sign=-1, activity=brigade_activity,
                                     flip=scenario.flip, offset=self.rng.gauss(0.0, 0.25)))
        self.reference: float | None = None
        self.spread = 1.0

    def calibrate(self, values: list[float]) -> None:
        """Fix the median (and spread) of the first images shown: the raters' idea of "average"."""
        self.reference = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4) if len(values) >= 2 else [0.0, 0.0, 1.0]
        self.spread = max(quartiles[2] - quartiles[0], 1e-6)

    def verdict(self, rater: Rater, value: float) -> int:
        """+1 or -1: one rater's vote on an image whose taste value is `value`."""
        if self.reference is None:
            raise RuntimeError("calibrate the panel on the first images before anyone votes")
        if rater.random:
            return 1 if self.rng.random() < 0.5 else -1
        likes = (value - self.reference) / self.spread > rater.offset
        if rater.sign < 0:
            likes = not likes
        if self.rng.random() < rater.flip:
            likes = not likes
        return 1 if likes else -1

    def votes(self, value: float) -> list[tuple[Rater, int]]:
        """Who votes on one shown image, and how (each rater independently, by their activity)."""
        return [(r, self.verdict(r, value)) for r in self.raters if self.rng.random() < r.activity]

    def like_share(self, value: float) -> float:
        """The share of 👍 when every honest rater votes on the image: the measurement."""
        honest = [r for r in self.raters if r.honest]
        return sum(self.verdict(r, value) > 0 for r in honest) / len(honest)


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (successes may be fractional: mean shares):
    curation's lower bound, and the same bound of the failures mirrored for the upper end."""
    from training.curate import wilson_lower_bound

    return wilson_lower_bound(successes, total, z), 1.0 - wilson_lower_bound(total - successes, total, z)


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The curation filters a scenario runs with (see [curation] in config.toml)."""

    min_raters: int = 2
    min_score: int = 1
    min_wilson: float = 0.0


FILTERS = {
    # The shipped defaults.
    "default": Filters(),
    # Trust an image only with several raters who clearly agree.
    "strict": Filters(min_raters=4, min_score=2, min_wilson=0.3),
    # Nothing filtered but the sign of the score.
    "none": Filters(min_raters=1, min_score=1, min_wilson=0.0),
}
# sft learns everything it is given, so it does best on clearly liked images only (clean raters,
# one round: +16 points with the defaults, +27 with strict); kto and dpo learn from the contrast.
OBJECTIVE_FILTERS = {"sft": "strict", "kto": "default", "dpo": "default"}


@dataclass(frozen=True)
class Training:
    """Training settings per objective, tuned to learn a colour taste on the tiny model in minutes.

    A round trains `epochs` passes over everything curated so far, so later rounds, with more
    votes, train for more steps; `steps` > 0 fixes the step count instead.
    """

    epochs: int = 10
    steps: int = 0
    learning_rate: float = 2e-3
    rank: int = 8
    batch_size: int = 8
    targets: tuple[str, ...] = ("attention", "proj", "resnet")
    beta: float = 2500.0


TRAINING = {
    # sft sees only the liked images (about 30 a round here): it needs many passes.
    "sft": Training(epochs=50),
    # At 2e-3 kto's second round fell back (+32 -> +12 points); at 1e-3 it holds (+27 -> +27).
    "kto": Training(epochs=10, learning_rate=1e-3),
    "dpo": Training(epochs=7),
}


@dataclass(frozen=True)
class LoopSettings:
    objective: str = "sft"
    scenario: str = "clean"
    taste: str = "warm"
    filters: str = "default"
    rounds: int = 2
    # Per round: prompts x images per prompt rated; fresh prompts x seeds measured.
    train_prompts: int = 16
    images_per_prompt: int = 4
    eval_prompts: int = 12
    eval_seeds: int = 4
    steps: int = 8
    # 32 px (16x16 latents): a quarter of the tiny model's native cost, and colour needs no detail.
    size: int = 32
    seed: int = 7
    training: Training | None = None
    model: str = "tiny"

    def training_settings(self) -> Training:
        return self.training or TRAINING[self.objective]


def prompts(count: int, offset: int) -> list[str]:
    """`count` distinct prompts; different offsets never repeat one another's prompts."""
    out = []
    for i in range(offset, offset + count):
        subject = SUBJECTS[i % len(SUBJECTS)]
        style = STYLES[(i // len(SUBJECTS)) % len(STYLES)]
        out.append(f"a {subject} {style}, variant {i}")
    return out


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class Shown:
    """An image made through the service and recorded in the store."""

    image_id: int
    message_id: int
    prompt: str
    seed: int
    png: bytes
    adapter_version: int | None


@dataclass
class Loop:
    """One run: the service, the store, the panel and what happened, round by round."""

    settings: LoopSettings
    data_dir: Path
    config: Any = None
    client: Any = None
    store: Any = None
    panel: Panel | None = None
    report: dict[str, Any] = field(default_factory=dict)

    async def generate(self, prompt_list: list[str], seeds_per_prompt: int, version: int | None,
                       seed_base: int, record: bool) -> list[Shown]:
        """Render every prompt with `seeds_per_prompt` seeds through the service, optionally
        recording each generation and image in the store as the bot does."""
        from generation.contract import AdapterRef, JobRequest, JobState

        s = self.settings
        adapters = (AdapterRef(f"{ADAPTER}@{version}"),) if version is not None else ()
        limit = asyncio.Semaphore(4)

        async def one(index: int, prompt: str) -> list[Shown]:
            requester = 100 + index % 8
            request = JobRequest(prompt=prompt, adapters=adapters, steps=s.steps, seed=seed_base + index * 1000,
                                 width=s.size, height=s.size, count=seeds_per_prompt,
                                 requester=f"sim:{requester}")
            async with limit:
                accepted = await self.client.submit(request)
                async for status in self.client.events(accepted.id):
                    last = status
                if last.state is not JobState.DONE:
                    raise RuntimeError(f"job {accepted.id} ended {last.state.value}: {last.error}")
                resolved = [a.version for a in last.adapters]
                if version is not None and resolved != [version]:
                    raise RuntimeError(f"job {accepted.id} used adapter versions {resolved}, not {version}")
                pngs = [await self.client.image(accepted.id, image.index) for image in last.images]
            shown = []
            generation_id = None
            if record:
                parameters = {k: v for k, v in request.to_dict().items()
                              if k not in ("prompt", "negative_prompt", "adapters", "requester")}
                generation_id = await self.store.record_generation(
                    job_id=accepted.id, prompt=prompt, requester_id=requester, guild_id=1, channel_id=2,
                    parameters=parameters, adapters=[a.to_dict() for a in last.adapters])
                await self.store.update_generation(generation_id, status="done")
            for image, png in zip(last.images, pngs, strict=True):
                image_id = message_id = 0
                if record:
                    image_id = await self.store.add_image(generation_id, index=image.index, seed=image.seed,
                                                          width=image.width, height=image.height, png=png)
                    message_id = 5_000_000 + image_id
                    await self.store.set_image_message(image_id, message_id)
                shown.append(Shown(image_id, message_id, prompt, image.seed, png, version))
            return shown

        batches = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompt_list)))
        return [image for batch in batches for image in batch]

    async def vote(self, shown: list[Shown]) -> int:
        """Every rater sees every image and votes on some, through the store like reactions do."""
        votes = 0
        for image in shown:
            value = self.panel.taste(image.png)
            for rater, verdict in self.panel.votes(value):
                # The bot finds the image by the message the reaction is on.
                found = await self.store.image_for_message(image.message_id)
                await self.store.set_vote(found.id, rater.user_id, verdict, EMOJI[verdict])
                votes += 1
        return votes

    def measure(self, shown: list[Shown]) -> dict[str, Any]:
        shares = [self.panel.like_share(self.panel.taste(image.png)) for image in shown]
        low, high = wilson_interval(sum(shares), len(shares))
        values = [self.panel.taste(image.png) for image in shown]
        return {"like_rate": round(sum(shares) / len(shares), 4), "ci95": [round(low, 4), round(high, 4)],
                "images": len(shown), "taste_mean": round(statistics.fmean(values), 4),
                "taste_std": round(statistics.pstdev(values), 4)}

    def curate_train_publish(self, round_number: int) -> dict[str, Any]:
        """Curate all votes so far, train a fresh adapter, publish it (runs on a worker thread)."""
        from loraloop.config import TrainingConfig
        from loraloop.store import Store
        from training.curate import CurationError, CurationSettings, curate
        from training.publish import publish
        from training.train import Job, train, validate

        s = self.settings
        t = s.training_settings()
        f = FILTERS[s.filters]
        dataset = self.data_dir / "datasets" / f"round-{round_number}"
        curation = CurationSettings.from_config(self.config.curation, format=s.objective, min_raters=f.min_raters,
                                                min_score=f.min_score, min_wilson=f.min_wilson)
        with Store.from_config(self.config) as store:
            try:
                curated = curate(store, dataset, curation)
            except CurationError as exc:
                return {"error": str(exc)}
            settings = TrainingConfig(
                resolution=s.size, objective=s.objective, rank=t.rank, alpha=float(t.rank),
                targets=list(t.targets), learning_rate=t.learning_rate, max_steps=max(1, t.steps),
                epochs=0 if t.steps else t.epochs,
                batch_size=t.batch_size, validation_split=0.0, checkpoint_every=10**6, log_with="none",
                dpo_beta=t.beta, kto_beta=t.beta, seed=s.seed + round_number, adam_8bit=False,
            )
            job = Job(dataset=dataset, name=ADAPTER, model=s.model, settings=settings, data_dir=self.data_dir,
                      output=self.data_dir / "runs" / f"round-{round_number}")
            started = time.perf_counter()
            trained = train(validate(job))
            seconds = time.perf_counter() - started
            published = publish(job.output, ADAPTER, self.config.adapters_dir, store)
        kept = curated.kept
        return {
            "dataset": {"kept": len(kept), "pairs": curated.pairs, "considered": curated.considered,
                        "dropped_by_reason": curated.dropped_by_reason(),
                        "liked": sum(1 for k in kept if k.get("label", k["score"] > 0)),
                        "votes_used": sum(k["likes"] + k["dislikes"] for k in kept)},
            "train_seconds": round(seconds, 1),
            "train_steps": trained["steps"],
            "final_train_loss": trained["final_train_loss"],
            "published": {"name": published.name, "version": published.version, "sha256": published.sha256},
        }


async def run_loop(settings: LoopSettings, data_dir: Path) -> tuple[dict[str, Any], dict[str, list[Shown]]]:
    """Run the whole loop in `data_dir`; returns the report and the measured images per version."""
    from generation.client import ServiceClient
    from generation.server import start_service
    from loraloop.config import Config, Secrets
    from loraloop.store import AsyncStore
    from training.publish import tell_service

    s = settings
    if s.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
    # Config.data_dir (store, adapters, runs) follows the environment, as it does for `loraloop`.
    os.environ["LORALOOP_DATA_DIR"] = str(data_dir)
    config = Config().replace("service", model=s.model, default_steps=s.steps, batch_wait_ms=20,
                              max_per_requester=64, max_queue=256, preview_every=0)
    loop = Loop(settings=s, data_dir=data_dir, config=config,
                panel=Panel(SCENARIOS[s.scenario], s.taste, s.seed))
    running = await start_service(config, Secrets(discord_token=None, service_token=None))
    loop.client = ServiceClient(running.url, timeout=120)
    loop.store = await AsyncStore.open_from_config(config)
    measured: dict[str, list[Shown]] = {}
    report: dict[str, Any] = {
        "settings": dataclasses.asdict(s) | {"training": dataclasses.asdict(s.training_settings())},
        "scenario": dataclasses.asdict(SCENARIOS[s.scenario]),
        "filters": dataclasses.asdict(FILTERS[s.filters]),
        "rounds": [],
    }
    started = time.perf_counter()
    try:
        eval_prompts = prompts(s.eval_prompts, offset=10_000)
        version: int | None = None
        votes_total = 0
        for round_number in range(1, s.rounds + 1):
            shown = await loop.generate(prompts(s.train_prompts, offset=round_number * 100), s.images_per_prompt,
                                        version, seed_base=round_number * 100_000, record=True)
            if loop.panel.reference is None:
                loop.panel.calibrate([loop.panel.taste(image.png) for image in shown])
            if version is None:
                measured["base"] = await loop.generate(eval_prompts, s.eval_seeds, None, seed_base=7_000_000,
                                                       record=False)
                report["base"] = loop.measure(measured["base"])
            votes = await loop.vote(shown)
            votes_total += votes
            outcome = await asyncio.to_thread(loop.curate_train_publish, round_number)
            entry: dict[str, Any] = {"round": round_number, "generated_with": _label(version),
                                     "images_rated": len(shown), "votes_recorded": votes,
                                     "votes_recorded_total": votes_total, **outcome}
            report["rounds"].append(entry)
            if "error" in outcome:
                log.warning("round %d: curation failed: %s", round_number, outcome["error"])
                break
            version = outcome["published"]["version"]
            served = await tell_service(running.url, None, _Published(ADAPTER, version))
            entry["service"] = served
            label = _label(version)
            measured[label] = await loop.generate(eval_prompts, s.eval_seeds, version, seed_base=7_000_000,
                                                  record=False)
            entry["after"] = loop.measure(measured[label])
            entry["delta_points"] = round(100 * (entry["after"]["like_rate"] - report["base"]["like_rate"]), 1)
            log.info("round %d (%s/%s): like rate %.1f%% -> %.1f%%", round_number, s.objective, s.scenario,
                     100 * report["base"]["like_rate"], 100 * entry["after"]["like_rate"])
    finally:
        await loop.client.close()
        await loop.store.close()
        await running.stop()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["reference"] = {"median": loop.panel.reference, "spread": loop.panel.spread}
    return report, measured


@dataclass(frozen=True)
class _Published:
    """What `tell_service` reads of a publish."""

    name: str
    version: int


def _label(version: int | None) -> str:
    return "base" if version is None else f"{ADAPTER}@{version}"


def save_grid(measured: dict[str, list[Shown]], path: Path, columns: int = 8) -> None:
    """The same fresh prompts and seeds (the first seed of each prompt), one row per version."""
    from PIL import Image

    from training.images import labelled_grid

    rows = []
    for shown in measured.values():
        firsts: dict[str, Shown] = {}
        for image in shown:
            firsts.setdefault(image.prompt, image)
        rows.append(list(firsts.values())[:columns])
    column_labels = [image.prompt.split()[1] for image in rows[0]]  # the subject: "a fox at dawn" -> fox
    def tile(image: Shown) -> Image.Image:
        return Image.open(io.BytesIO(image.png)).convert("RGB").resize((64, 64), Image.Resampling.NEAREST)

    grid = labelled_grid([[tile(i) for i in row] for row in rows], list(measured), column_labels)
    grid.save(path, optimize=True)


def diagnose(model: str, size: int, count: int = 32, seed: int = 0) -> dict[str, Any]:
    """Why the tiny model can or cannot learn a pixel taste: the spread of the taste over its
    images, and whether the taste survives the VAE round trip training sees (encode, decode)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(prompts(count, offset=20_000), num_inference_steps=8, height=size, width=size,
                      generator=torch.Generator().manual_seed(seed), output_type="pt").images  # (N, 3, S, S) in [0, 1]
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        round_trip = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)

    def tastes(x: torch.Tensor) -> dict[str, np.ndarray]:
        red, green, blue = x[:, 0].mean(dim=(1, 2)), x[:, 1].mean(dim=(1, 2)), x[:, 2].mean(dim=(1, 2))
        return {"warm": (red - blue).numpy(), "bright": (0.299 * red + 0.587 * green + 0.114 * blue).numpy()}

    before, after = tastes(images), tastes(round_trip)
    return {name: {"std_8bit_levels": round(float(before[name].std() * 255), 3),
                   "round_trip_correlation": round(float(np.corrcoef(before[name], after[name])[0, 1]), 3)}
            for name in before}


def summary_line(report: dict[str, Any]) -> str:
    s = report["settings"]
    base = report["base"]
    parts = [f"{s['objective']:<4} {s['scenario']:<8} filters={s['filters']:<8}",
             f"base {100 * base['like_rate']:.1f}% [{100 * base['ci95'][0]:.0f}-{100 * base['ci95'][1]:.0f}]"]
    for entry in report["rounds"]:
        if "after" not in entry:
            parts.append(f"round {entry['round']}: {entry.get('error', 'failed')}")
            continue
        after = entry["after"]
        parts.append(f"r{entry['round']} {100 * after['like_rate']:.1f}% [{100 * after['ci95'][0]:.0f}-"
                     f"{100 * after['ci95'][1]:.0f}] ({entry['delta_points']:+.1f} pts, "
                     f"{entry['dataset']['votes_used']} votes used, {entry['train_steps']} steps in "
                     f"{entry['train_seconds']} s)")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="clean")
    parser.add_argument("--filters", choices=sorted(FILTERS),
                        help="Curation filters for every objective (default: per objective, OBJECTIVE_FILTERS).")
    parser.add_argument("--taste", choices=sorted(TASTES), default="warm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-prompts", type=int, default=LoopSettings.train_prompts)
    parser.add_argument("--epochs", type=int, help="Training epochs per round (default: per objective, see TRAINING).")
    parser.add_argument("--steps", type=int, help="Fixed training steps per round instead of epochs.")
    parser.add_argument("--lr", type=float, help="Learning rate (default: per objective).")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: per objective).")
    parser.add_argument("--beta", type=float, help="dpo/kto beta (default: per objective).")
    parser.add_argument("--seed", type=int, default=LoopSettings.seed)
    parser.add_argument("--json", type=Path, help="Write the reports here (a JSON list).")
    parser.add_argument("--grid", type=Path, help="Write a before/after grid of the first objective's run here.")
    parser.add_argument("--workdir", type=Path, help="Keep the data directories here (default: a temp dir).")
    parser.add_argument("--pretrained-base", type=Path, metavar="DIR",
                        help="Use (and cache in DIR) the tiny model taught to draw colour fields (pretrain_base).")
    parser.add_argument("--diagnose", action="store_true",
                        help="Only measure the taste's spread over the model's images and its VAE round trip.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "aiohttp.access", "generation", "training", "loraloop"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    reports = []
    with tempfile.TemporaryDirectory(prefix="loraloop-loop-") as temp:
        root = args.workdir or Path(temp)
        from loraloop.tiny import tiny_model_path

        model = tiny_model_path(root / "tiny")
        if args.pretrained_base:
            model = pretrain_base(model, args.pretrained_base, LoopSettings.size)
        if args.diagnose:
            print(json.dumps(diagnose(str(model), LoopSettings.size), indent=2))
            return
        for index, objective in enumerate(args.objective):
            base = TRAINING[objective]
            training = dataclasses.replace(base, **{k: v for k, v in {
                "epochs": args.epochs, "steps": args.steps, "learning_rate": args.lr, "rank": args.rank,
                "beta": args.beta}.items()
                if v is not None})
            settings = LoopSettings(objective=objective, scenario=args.scenario, taste=args.taste,
                                    filters=args.filters or OBJECTIVE_FILTERS[objective], rounds=args.rounds,
                                    train_prompts=args.train_prompts, seed=args.seed, training=training,
                                    model=str(model))
            data_dir = root / f"{objective}-{args.scenario}-{settings.filters}"
            data_dir.mkdir(parents=True, exist_ok=True)
            report, measured = asyncio.run(run_loop(settings, data_dir))
            reports.append(report)
            print(summary_line(report), flush=True)
            if args.grid and index == 0:
                save_grid(measured, args.grid)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
