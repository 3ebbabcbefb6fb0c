"""Curation: the server's votes in the feedback store turned into a training dataset.

    loraloop dataset curate data/datasets/liked                     # sft: the well-liked images
    loraloop dataset curate data/datasets/thumbs --format kto       # liked and disliked, labelled
    loraloop dataset curate data/datasets/pairs --format dpo --adapter pixel --adapter-version 3
    loraloop dataset curate out --since 2026-11-01 --until 2026-11-08 --min-raters 3 --min-wilson 0.5

This module owns choosing images (filters, scores, duplicates), which images go into each of the
three formats, and the report. Every image in the selection is either kept or dropped with a reason:

1. the store lists the votes of the selection, leaving out votes by opted-out users and, unless
   asked, the requester's own vote (`Store.rated_images`, `Store.rated_votes`);
2. the rater model (`loraloop.raters`) weighs every rater from those votes: reliable raters'
   votes count nearly 1, random or contrarian raters' nearly 0, lockstep blocs 0, and no one
   rater more than `max_rater_share` of all the weight. Every score below is a weighted one:
   likes and dislikes are sums of the voters' weights, the net score their difference, the
   Wilson bound is taken on the weighted like ratio;
3. images whose requester opted out, flagged images (NSFW, artifact) and images with fewer than
   `min_raters` distinct raters are dropped;
4. sft keeps images with net score >= `min_score` and a Wilson lower bound on the like ratio
   >= `min_wilson`; kto labels an image liked or disliked when it clears the same bars in
   either direction and drops the unclear rest; dpo keeps everything for pairing;
5. image files that are missing, fail their sha256 or cannot be decoded are dropped;
6. exact duplicates (same sha256) and near-duplicates (perceptual hashes at most
   `near_duplicate_distance` bits apart) collapse onto the best-scored copy;
7. dpo pairs images of the same prompt whose weighted net scores differ; ties are dropped, never
   counted as a win.

Every row also gets a loss `weight`: the rater model's probability that its label is right
(sft: that the community likes the image; kto: that its label holds; dpo: P(preferred liked)
- P(rejected liked)), scaled to a mean of 1 over the dataset, so training leans on the
examples the votes are surest about without changing the learning rate's meaning.

The folder is a dataset in the layout `training/dataset.py` owns (what training/data.py and
`datasets.load_dataset(OUT)` read):

    sft  OUT/metadata.jsonl  {"file_name": "<sha256[:16]>.png", "text": prompt, "weight": w}
    kto  OUT/metadata.jsonl  {"file_name": ..., "text": prompt, "label": true | false, "weight": w}
    dpo  OUT/data/train-00000-of-00001.parquet  caption (prompt), jpg_0, jpg_1 (PNG bytes), label_0 (1.0 | 0.0),
         weight (w)

plus OUT/report.json (kept and why, dropped and why, every rater's weight and why, the
settings), OUT/score_histogram.png and
OUT/dataset_hash, the content hash training computes, so a run names exactly what it learned from.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from loraloop.config import CurationConfig
from loraloop.raters import RaterModel, RaterSettings, estimate
from loraloop.store import RatedImage, Store
from training.dataset import (
    DPO,
    FORMATS,
    HISTOGRAM_FILE,
    KTO,
    REPORT_FILE,
    SFT,
    DatasetError,
    FormatName,
    NearDuplicateIndex,
    check_output_folder,
    content_hash,
    image_file_name,
    perceptual_hash,
    record_dataset_hash,
    staged_folder,
    write_metadata,
    write_parquet,
)
from training.images import score_histogram

log = logging.getLogger(__name__)

# Why an image was left out; the report counts by these codes.
REQUESTER_OPTED_OUT = "requester_opted_out"
FLAGGED = "flagged"
DELETED = "deleted_in_discord"
TOO_FEW_RATERS = "too_few_raters"
LOW_SCORE = "score_below_minimum"
LOW_WILSON = "wilson_below_minimum"
NO_CLEAR_VERDICT = "no_clear_verdict"
MISSING_FILE = "missing_file"
CORRUPT_FILE = "corrupt_file"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
NO_PAIR = "no_pair_with_a_different_score"
PAIRS_CAPPED = "beyond_max_pairs_per_prompt"
# Two weighted scores closer than this are a tie for dpo (sums of float weights).
TIE_TOLERANCE = 1e-6


class CurationError(DatasetError):
    """A curation problem a person can fix; the message says what to change."""


# One source of truth for the filters' defaults: the [curation] section of the config.
_DEFAULTS = CurationConfig()


@dataclass(frozen=True)
class CurationSettings:
    """What to select and how; defaults come from `[curation]` in config.toml."""

    format: FormatName = _DEFAULTS.format
    adapter: str | None = None
    adapter_version: int | None = None
    # One person's votes only (a personal style): the images they voted on, their votes alone.
    voter: int | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    min_raters: int = _DEFAULTS.min_raters
    min_score: float = _DEFAULTS.min_score
    min_wilson: float = _DEFAULTS.min_wilson
    wilson_z: float = _DEFAULTS.wilson_z
    include_self_votes: bool = _DEFAULTS.include_self_votes
    near_duplicate_distance: int = _DEFAULTS.near_duplicate_distance
    max_pairs_per_prompt: int = _DEFAULTS.max_pairs_per_prompt
    link_images: bool = _DEFAULTS.link_images
    rater_model: bool = _DEFAULTS.rater_model
    rater_prior_accuracy: float = _DEFAULTS.rater_prior_accuracy
    rater_prior_votes: float = _DEFAULTS.rater_prior_votes
    max_rater_share: float = _DEFAULTS.max_rater_share

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise CurationError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.adapter_version is not None and self.adapter is None:
            raise CurationError("--adapter-version needs --adapter NAME")
        if self.since and self.until and self.since >= self.until:
            raise CurationError("--since must be before --until")
        if not 0 <= self.near_duplicate_distance <= 64:
            raise CurationError("near_duplicate_distance must be between 0 and 64 bits")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("since", "until"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return data

    def rater_settings(self) -> RaterSettings:
        return RaterSettings(enabled=self.rater_model, prior_accuracy=self.rater_prior_accuracy,
                             prior_votes=self.rater_prior_votes, max_share=self.max_rater_share)

    @classmethod
    def from_config(cls, section: CurationConfig, **overrides: Any) -> CurationSettings:
        """Settings from a `[curation]` config section, with CLI options (None: keep) on top."""
        base = cls(
            format=section.format, min_raters=section.min_raters, min_score=section.min_score,
            min_wilson=section.min_wilson, wilson_z=section.wilson_z,
            include_self_votes=section.include_self_votes,
            near_duplicate_distance=section.near_duplicate_distance,
            max_pairs_per_prompt=section.max_pairs_per_prompt, link_images=section.link_images,
            rater_model=section.rater_model, rater_prior_accuracy=section.rater_prior_accuracy,
            rater_prior_votes=section.rater_prior_votes, max_rater_share=section.max_rater_share,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def wilson_lower_bound(positive: float, total: float, z: float) -> float:
    """The lower end of the Wilson score interval (E. B. Wilson, JASA 1927) for positive/total: a
    like ratio that is only high when there are enough votes to believe it (3/3 likes scores
    below 30/32).
    Both may be fractional (sums of shares, or of raters' weights: a total weight of 2.5 is as
    sure as 2.5 fully reliable votes); the upper end is 1 minus the lower end of
    (total - positive)/total."""
    if total <= 0:
        return 0.0
    p = positive / total
    z2 = z * z
    centre = p + z2 / (2 * total)
    margin = z * math.sqrt((p * (1 - p) + z2 / (4 * total)) / total)
    return (centre - margin) / (1 + z2 / total)


@dataclass
class CurationCandidate:
    """A rated image up for curation, and what curation has learned about it so far."""

    image: RatedImage
    # Weighted by the rater model: sums of the likers' and dislikers' weights.
    likes: float
    dislikes: float
    wilson: float  # lower bound of the weighted like ratio
    posterior: float  # the rater model's P(the community likes it)
    label: bool | None = None  # kto: liked (True) or disliked (False)
    phash: int = 0  # set once its file has been checked
    why: str = ""  # why it was kept, for the report

    @property
    def score(self) -> float:
        """The weighted net score: weighted likes minus weighted dislikes."""
        return self.likes - self.dislikes

    @classmethod
    def of(cls, image: RatedImage, votes: list[tuple[int, int]], model: RaterModel,
           z: float) -> CurationCandidate:
        likes, dislikes = model.tally(votes)
        return cls(image=image, likes=likes, dislikes=dislikes,
                   wilson=wilson_lower_bound(likes, likes + dislikes, z),
                   posterior=model.posterior.get(image.id, model.liked_prior))


@dataclass
class CurationReport:
    format: str
    settings: dict[str, Any]
    database: str
    considered: int = 0
    kept: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    pairs: int = 0
    tied_pairs_dropped: int = 0
    dataset_hash: str = ""
    phashes_computed: int = 0
    # Every rater of the selection as the rater model weighed them (RaterEstimate.to_dict, + name).
    raters: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, candidate: CurationCandidate, reason: str, detail: str = "") -> None:
        image = candidate.image
        self.dropped.append({"image_id": image.id, "reason": reason, "detail": detail,
                             "score": round(candidate.score, 4), "raters": image.raters})

    def dropped_by_reason(self) -> dict[str, int]:
        return dict(Counter(row["reason"] for row in self.dropped).most_common())

    def summary(self) -> str:
        kept = f"{len(self.kept)} images"
        if self.format == "dpo":
            kept += f" in {self.pairs} pairs ({self.tied_pairs_dropped} tied pairs dropped)"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped_by_reason().items())
        return f"{self.considered} considered, kept {kept}; dropped: {reasons or 'none'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "settings": self.settings, "database": self.database,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "dataset_hash": self.dataset_hash,
            "counts": {"considered": self.considered, "kept": len(self.kept),
                       "dropped": len(self.dropped), "pairs": self.pairs,
                       "tied_pairs_dropped": self.tied_pairs_dropped},
            "dropped_by_reason": self.dropped_by_reason(),
            "histogram": HISTOGRAM_FILE,
            "raters": self.raters,
            "kept": self.kept, "dropped": self.dropped,
        }


# --- choosing images ------------------------------------------------------------------------


def _passes_rating_filters(candidate: CurationCandidate, settings: CurationSettings,
                           report: CurationReport) -> bool:
    image = candidate.image
    if image.requester_opted_out:
        report.drop(candidate, REQUESTER_OPTED_OUT)
        return False
    if image.deleted:
        report.drop(candidate, DELETED)
        return False
    if image.flags:
        report.drop(candidate, FLAGGED, ",".join(image.flags))
        return False
    if image.raters < settings.min_raters:
        report.drop(candidate, TOO_FEW_RATERS, f"{image.raters} < {settings.min_raters}")
        return False
    score = candidate.score
    if settings.format == "sft":
        if score < settings.min_score:
            report.drop(candidate, LOW_SCORE, f"{score:.3f} < {settings.min_score}")
            return False
        if candidate.wilson < settings.min_wilson:
            report.drop(candidate, LOW_WILSON, f"{candidate.wilson:.3f} < {settings.min_wilson}")
            return False
        candidate.why = f"liked: score {score:.3f} >= {settings.min_score}, wilson {candidate.wilson:.3f}"
    elif settings.format == "kto":
        disliked_bound = wilson_lower_bound(candidate.dislikes, candidate.likes + candidate.dislikes,
                                            settings.wilson_z)
        if score >= settings.min_score and candidate.wilson >= settings.min_wilson:
            candidate.label = True
            candidate.why = f"liked: score {score:.3f} >= {settings.min_score}, wilson {candidate.wilson:.3f}"
        elif -score >= settings.min_score and disliked_bound >= settings.min_wilson:
            candidate.label = False
            candidate.why = f"disliked: score {score:.3f} <= -{settings.min_score}, wilson {disliked_bound:.3f}"
        else:
            report.drop(candidate, NO_CLEAR_VERDICT, f"score {score:.3f}")
            return False
    return True


@dataclass(frozen=True)
class FileCheck:
    """What reading one image file found: its perceptual hash, or why it is unusable."""

    phash: int = 0  # meaningful only when there is no problem
    computed: bool = False  # the hash was computed now, not read from the store's cache
    problem: str | None = None  # MISSING_FILE or CORRUPT_FILE
    detail: str = ""


def check_file(path: Path, sha256: str, cached_phash: str | None) -> FileCheck:
    """Read an image file, verify its sha256 and find its perceptual hash (cached or computed)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return FileCheck(problem=MISSING_FILE, detail=str(path))
    if hashlib.sha256(data).hexdigest() != sha256:
        return FileCheck(problem=CORRUPT_FILE, detail=f"{path}: contents do not match its sha256")
    if cached_phash is not None:
        return FileCheck(phash=int(cached_phash, 16))
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
            return FileCheck(phash=perceptual_hash(decoded), computed=True)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return FileCheck(problem=CORRUPT_FILE, detail=f"{path}: cannot be decoded ({exc})")


def _check_files(candidates: list[CurationCandidate], store: Store,
                 report: CurationReport) -> list[CurationCandidate]:
    """The candidates whose files are intact, with their perceptual hashes set.

    Threads, because reading, sha256, PNG decoding and resizing all release the GIL: on two
    cores a cold run (hashes not cached yet) takes about half as long.
    """
    def check_chunk(chunk: list[CurationCandidate]) -> list[FileCheck]:
        return [check_file(store.image_path(c.image), c.image.sha256, c.image.phash)
                for c in chunk]

    # Chunks, not one task per image: a future per image costs as much as a cached check.
    chunks = [candidates[i:i + 64] for i in range(0, len(candidates), 64)]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                            thread_name_prefix="curate") as pool:
        checks = [check for chunk in pool.map(check_chunk, chunks) for check in chunk]
    intact = []
    for candidate, check in zip(candidates, checks, strict=True):
        if check.problem is not None:
            report.drop(candidate, check.problem, check.detail)
            continue
        candidate.phash = check.phash
        report.phashes_computed += check.computed
        intact.append(candidate)
    return intact


def _collapse_duplicates(candidates: list[CurationCandidate], settings: CurationSettings,
                         report: CurationReport) -> list[CurationCandidate]:
    # Best first, so the copy that survives is the best-rated one.
    ranked = sorted(candidates, key=lambda c: (-c.score, -c.wilson, c.image.id))
    by_sha: dict[str, int] = {}
    index: NearDuplicateIndex[int] = NearDuplicateIndex(settings.near_duplicate_distance)
    kept = []
    for candidate in ranked:
        image = candidate.image
        if image.sha256 in by_sha:
            report.drop(candidate, DUPLICATE, f"same file as image {by_sha[image.sha256]}")
            continue
        twin = index.find(candidate.phash)
        if twin is not None:
            report.drop(candidate, NEAR_DUPLICATE, f"looks like image {twin}")
            continue
        by_sha[image.sha256] = image.id
        index.add(candidate.phash, image.id)
        kept.append(candidate)
    return kept


def _pairs(candidates: list[CurationCandidate], settings: CurationSettings,
           report: CurationReport) -> list[tuple[CurationCandidate, CurationCandidate]]:
    """Preference pairs of images of the same prompt; (jpg_0, jpg_1) in image id order."""
    by_prompt: dict[str, list[CurationCandidate]] = defaultdict(list)
    for candidate in candidates:
        by_prompt[candidate.image.prompt.strip()].append(candidate)
    pairs = []
    paired: set[int] = set()
    for group in by_prompt.values():
        group.sort(key=lambda c: c.image.id)
        options = []
        for first, second in itertools.combinations(group, 2):
            # Weighted scores: equal weight either way is a tie, however many votes it took.
            if abs(first.score - second.score) < TIE_TOLERANCE:
                report.tied_pairs_dropped += 1
                continue
            options.append((first, second))
        # The clearest preferences first, when a prompt has more pairs than the cap allows.
        options.sort(key=lambda p: (-abs(p[0].score - p[1].score), p[0].image.id, p[1].image.id))
        if settings.max_pairs_per_prompt:
            options = options[: settings.max_pairs_per_prompt]
        pairs.extend(options)
        paired.update(c.image.id for pair in options for c in pair)
    for candidate in candidates:
        if candidate.image.id not in paired:
            report.drop(candidate, NO_PAIR, candidate.image.prompt[:80])
        else:
            candidate.why = f"in a pair: score {candidate.score:.3f}"
    return pairs


def loss_weights(values: list[float]) -> list[float]:
    """Per-example loss weights from the rater model's confidences, scaled to a mean of 1 (so the
    learning rate keeps its meaning); all equal when no example has any confidence."""
    mean = sum(values) / len(values) if values else 0.0
    if mean <= 0:
        return [1.0] * len(values)
    return [round(v / mean, 4) for v in values]


# --- writing --------------------------------------------------------------------------------


def file_name(image: RatedImage) -> str:
    return image_file_name(image.sha256)


def _place_image(source: Path, target: Path, link: bool) -> None:
    # A hard link costs one directory entry (writing a copy is ~10x slower here, see
    # bench/RESULTS.md) and no disk; the store never rewrites an image, since its name is its
    # sha256. Other filesystems or devices fall back to a copy.
    if link:
        try:
            os.link(source, target)
        except OSError as exc:
            log.debug("cannot hard-link %s (%s); copying it", source, exc)
        else:
            return
    shutil.copyfile(source, target)


def curate(store: Store, out: Path, settings: CurationSettings) -> CurationReport:
    """Select rated images from `store` and write them to `out` in `settings.format`.

    Raises CurationError before writing anything when nothing survives the filters. The
    dataset is built beside `out` and renamed into place, so an interruption never leaves a
    half-written dataset where training would look.
    """
    settings.validate()
    out = Path(out)
    check_output_folder(out, error=CurationError)
    report = CurationReport(format=settings.format, settings=settings.to_dict(),
                            database=str(store.db_path))
    selection: dict[str, Any] = {
        "adapter": settings.adapter, "adapter_version": settings.adapter_version,
        "since": settings.since, "until": settings.until, "include_self_votes": settings.include_self_votes,
        "voter": settings.voter,
    }
    images = store.rated_images(**selection)
    votes = store.rated_votes(**selection)
    model = estimate(votes, settings.rater_settings())
    report.raters = rater_rows(model, store.user_names(model.raters))
    report.considered = len(images)
    by_image: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for image_id, user_id, value in votes:
        by_image[image_id].append((user_id, value))
    candidates = [CurationCandidate.of(image, by_image[image.id], model, settings.wilson_z) for image in images]
    candidates = [c for c in candidates if _passes_rating_filters(c, settings, report)]

    intact = _check_files(candidates, store, report)
    new_hashes = [(c.image.id, f"{c.phash:016x}") for c in intact if c.image.phash is None]
    if new_hashes:
        store.set_image_phash(new_hashes)
    survivors = _collapse_duplicates(intact, settings, report)

    pairs: list[tuple[CurationCandidate, CurationCandidate]] = []
    if settings.format == "dpo":
        pairs = _pairs(survivors, settings, report)
        in_pairs = {c.image.id for pair in pairs for c in pair}
        survivors = [c for c in survivors if c.image.id in in_pairs]
        report.pairs = len(pairs)

    if not survivors:
        raise CurationError(_empty_selection_message(report, settings))

    with staged_folder(out, "partial") as staging:
        _write_dataset(store, staging, survivors, pairs, settings, report)
    log.info("curated %s dataset %s: %s", settings.format, out, report.summary())
    return report


def rater_rows(model: RaterModel, names: dict[int, str]) -> list[dict[str, Any]]:
    """Every rater of the model, heaviest first, with the name the bot stored (None: unknown)."""
    rows = [{"name": names.get(r.user_id), **r.to_dict()} for r in model.raters.values()]
    return sorted(rows, key=lambda row: (-row["weight"], -row["votes"], row["user_id"]))


def _write_dataset(store: Store, folder: Path, survivors: list[CurationCandidate],
                   pairs: list[tuple[CurationCandidate, CurationCandidate]], settings: CurationSettings,
                   report: CurationReport) -> None:
    for candidate in sorted(survivors, key=lambda c: c.image.id):
        image = candidate.image
        kept = {"image_id": image.id, "sha256": image.sha256, "prompt": image.prompt,
                "score": round(candidate.score, 4), "likes": image.likes, "dislikes": image.dislikes,
                "weighted_likes": round(candidate.likes, 4), "weighted_dislikes": round(candidate.dislikes, 4),
                "wilson": round(candidate.wilson, 4), "posterior": round(candidate.posterior, 4),
                "why": candidate.why}
        if settings.format != "dpo":  # dpo keeps the images inside its Parquet file
            _place_image(store.image_path(image), folder / file_name(image), settings.link_images)
            kept["file_name"] = file_name(image)
        if candidate.label is not None:
            kept["label"] = candidate.label
        report.kept.append(kept)

    if settings.format == "dpo":
        weights = loss_weights([abs(first.posterior - second.posterior) for first, second in pairs])
        report.dataset_hash = record_dataset_hash(folder, write_parquet(folder, DPO, _pair_rows(store, pairs, weights)))
    else:
        rows = []
        ordered = sorted(survivors, key=lambda c: file_name(c.image))
        weights = loss_weights([c.posterior if c.label is not False else 1 - c.posterior for c in ordered])
        for candidate, weight in zip(ordered, weights, strict=True):
            name, prompt = file_name(candidate.image), candidate.image.prompt
            rows.append(KTO.row(file_name=name, text=prompt, label=candidate.label, weight=weight)
                        if settings.format == "kto" else SFT.row(file_name=name, text=prompt, weight=weight))
        metadata = write_metadata(folder, rows)
        # Every file was checked against its sha256 above, so the hash needs no second read.
        report.dataset_hash = record_dataset_hash(
            folder, content_hash(metadata, {file_name(c.image): c.image.sha256 for c in survivors}))
    score_histogram(
        [row["score"] for row in report.kept], [row["score"] for row in report.dropped],
        f"{settings.format}: {len(report.kept)} kept, {len(report.dropped)} dropped", folder / HISTOGRAM_FILE,
    )
    (folder / REPORT_FILE).write_text(_report_json(report.to_dict()), encoding="utf-8")


def _pair_rows(store: Store, pairs: list[tuple[CurationCandidate, CurationCandidate]],
               weights: list[float]) -> Iterator[dict[str, Any]]:
    """dpo rows with the images' bytes, read as they are written, and each pair's loss weight. A
    prompt's pairs come together (`_pairs` groups them), so the last few files read cover every repeat."""
    read = functools.lru_cache(maxsize=64)(lambda image_id, path: path.read_bytes())
    for (first, second), weight in zip(pairs, weights, strict=True):
        yield DPO.row(caption=first.image.prompt,
                      jpg_0=read(first.image.id, store.image_path(first.image)),
                      jpg_1=read(second.image.id, store.image_path(second.image)),
                      label_0=1.0 if first.score > second.score else 0.0, weight=weight)


def _report_json(data: dict[str, Any]) -> str:
    """The report indented for people, with one line per image in its long lists.

    json.dumps with indent= runs the pure-Python encoder, a quarter of a warm curation's time
    at 20,000 images; each row on its own line uses the C encoder and still reads well.
    """
    rows = {key: data.pop(key) for key in ("kept", "dropped")}
    text = json.dumps(data, indent=2, ensure_ascii=False).removesuffix("\n}")
    for key, items in rows.items():
        lines = ",\n    ".join(json.dumps(item, ensure_ascii=False) for item in items)
        text += f',\n  "{key}": [\n    {lines}\n  ]' if items else f',\n  "{key}": []'
    return text + "\n}\n"


def _empty_selection_message(report: CurationReport, settings: CurationSettings) -> str:
    if report.considered == 0:
        where = []
        if settings.adapter:
            where.append(f"adapter {settings.adapter}"
                         + (f" v{settings.adapter_version}" if settings.adapter_version else ""))
        if settings.since or settings.until:
            where.append("the date range")
        scope = f" for {' and '.join(where)}" if where else ""
        return f"No images in the database{scope}; nothing to curate."
    reasons = ", ".join(f"{n} {reason}" for reason, n in report.dropped_by_reason().items())
    hint = {
        TOO_FEW_RATERS: "lower --min-raters or wait for more votes",
        LOW_SCORE: "lower --min-score",
        LOW_WILSON: "lower --min-wilson",
        NO_CLEAR_VERDICT: "lower --min-score or --min-wilson",
        NO_PAIR: "dpo needs images of the same prompt with different scores",
    }
    top_reason = next(iter(report.dropped_by_reason()), "")
    advice = f"; {hint[top_reason]}" if top_reason in hint else ""
    return (f"No images left to curate: all {report.considered} were dropped ({reasons})"
            f"{advice}.")
