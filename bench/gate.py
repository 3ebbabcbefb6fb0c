"""Automatic rounds behind the A/B gate: `loraloop loop`'s own code, the bot's arm draw, simulated people.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.gate --pretrained-base /tmp/loraloop-loop-base \
        --rounds 3 --json /tmp/gate-good.json                       # candidates trained on the real votes
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.gate --pretrained-base /tmp/loraloop-loop-base \
        --rounds 3 --inverted --json /tmp/gate-inverted.json        # candidates trained on inverted votes
    .venv/bin/python -m bench.gate --simulate                       # the gate alone, synthetic votes

What runs is the product: an admin publishes `loop` v1 by hand (curate, train, publish, as in
bench/loop.py): by default a version that has learned nothing yet (`IDENTITY`: it draws as the
base model does, so the first candidate is one round of learning and should win), or with
`--first-version trained` a full round on the base model's rated images. From then on every
request for `style:loop` (`--count` images, as `/imagine count:` asks) is served as the bot
serves it (`loraloop.experiments.serving` and `choose_arm`, the arm recorded with the
generation), rendered by the real service, and voted on by the panel through the store;
`training.loop.LoopRunner.step()` (one pass of `loraloop loop`, the shipped `[loop]` settings)
runs after every `--batch` requests, so it trains a candidate once enough new weighted votes
arrived, publishes it as a candidate, and decides the experiment with the gate. `--inverted`
makes every candidate learn from the votes turned upside down (liked becomes disliked): the gate
must retire each one, never promote it. Only the people (and the inversion) are simulated.

Each decided experiment reports the votes it took, the verdict's figures, and both versions'
true like rates on the fresh measuring images (the panel's expected like share, as in
bench/loop.py), so "promoted" can be checked against "better".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; keep it from shadowing packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.loop import (  # noqa: E402  after the sys.path fix above
    ADAPTER,
    EVAL_PROMPT_OFFSET,
    EVAL_SEED_BASE,
    SCENARIOS,
    TRAINING,
    BaseImages,
    Loop,
    LoopSettings,
    Panel,
    Rendered,
    Training,
    eval_key,
    pretrain_base,
    prompts,
    render,
    round_images,
    round_key,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("bench.gate")

# The first version as a style that has learned nothing yet: one step at a learning rate too
# small to move a weight, so v1 draws as the base model does (a fresh LoRA's up-projections
# start at zero) and the first candidate is exactly one round of learning from its votes.
IDENTITY = Training(steps=1, learning_rate=1e-12)


def inverted_runner(base: type) -> type:
    """A LoopRunner whose candidates learn from the votes upside down: each curated row's label
    (kto) or preference (dpo) flipped before training. Everything else is the product's."""

    class Inverted(base):  # type: ignore[misc, valid-type]
        def curate(self, store: Any, name: str, out: Path) -> None:
            from training.dataset import (
                DPO,
                METADATA_FILE,
                PARQUET_FILE,
                parquet_shards,
                read_metadata,
                read_parquet,
                record_dataset_hash,
                write_metadata,
                write_parquet,
            )

            super().curate(store, name, out)
            if parquet_shards(out):  # dpo: the preferred image becomes the rejected one
                rows = [dict(row.values, label_0=1.0 - row.values["label_0"]) for row in read_parquet(out, DPO)]
                for shard in parquet_shards(out):
                    shard.unlink()
                (out / PARQUET_FILE).parent.mkdir(parents=True, exist_ok=True)
                record_dataset_hash(out, write_parquet(out, DPO, rows))
                return
            flipped = []
            for row in read_metadata(out / METADATA_FILE):
                if "label" not in row.values:
                    raise ValueError("--inverted needs kto or dpo: an sft dataset has only liked images")
                flipped.append(dict(row.values, label=not row.values["label"]))
            write_metadata(out, flipped)
            record_dataset_hash(out)

    return Inverted


async def run_gate(settings: LoopSettings, data_dir: Path, rounds: int, inverted: bool, batch: int,
                   max_requests: int, base_images: BaseImages, images_per_request: int = 4,
                   first_version: str = "base") -> dict[str, Any]:
    from generation.client import ServiceClient
    from generation.server import start_service
    from loraloop import experiments
    from loraloop.config import Config, Secrets
    from loraloop.store import AsyncStore
    from training.loop import LoopRunner

    s = settings
    t = s.training_settings()
    os.environ["LORALOOP_DATA_DIR"] = str(data_dir)
    config = Config().replace("service", model=s.model, default_steps=s.steps, batch_wait_ms=20,
                              max_per_requester=64, max_queue=256, preview_every=0)
    config = config.replace("training", resolution=s.size, objective=s.objective, rank=t.rank, alpha=float(t.rank),
                            targets=list(t.targets), learning_rate=t.learning_rate, max_steps=max(1, t.steps),
                            epochs=t.epochs, batch_size=t.batch_size, validation_split=0.0,
                            checkpoint_every=10**6, log_with="none", dpo_beta=t.beta, kto_beta=t.beta,
                            seed=s.seed * 100, adam_8bit=False)
    config = config.replace("curation", format=s.objective)
    loop = Loop(settings=s, data_dir=data_dir, config=config, panel=Panel(SCENARIOS[s.scenario], s.taste, s.seed))
    running = await start_service(config, Secrets(discord_token=None, service_token=None))
    loop.client = ServiceClient(running.url, timeout=300)
    loop.store = await AsyncStore.open_from_config(config)
    runner = (inverted_runner(LoopRunner) if inverted else LoopRunner)(config, running.url)
    rng = random.Random(s.seed)
    eval_prompts = prompts(s.eval_prompts, offset=EVAL_PROMPT_OFFSET)
    report: dict[str, Any] = {"settings": dataclasses.asdict(s), "inverted": inverted, "first_version": first_version,
                              "batch": batch, "images_per_request": images_per_request,
                              "loop": dataclasses.asdict(config.loop), "experiments": []}
    started = time.perf_counter()
    true_rates: dict[int, float] = {}

    async def true_rate(version: int) -> float:
        if version not in true_rates:
            images = await render(loop.client, s, eval_prompts, s.eval_seeds, version, EVAL_SEED_BASE)
            true_rates[version] = loop.measure(images)["like_rate"]
        return true_rates[version]

    try:
        # An admin's first version, by hand: the base model's images rated, curated, trained, published.
        round_prompts, seed_base = round_images(s, 1)
        first = await base_images.get_or_render(round_key(s, 1), loop.client, s, round_prompts,
                                                s.images_per_prompt, seed_base)
        shown = await loop.show(first)
        loop.panel.calibrate([loop.panel.taste(image.png) for image in shown])
        base = await base_images.get_or_render(eval_key(s), loop.client, s, eval_prompts, s.eval_seeds, EVAL_SEED_BASE)
        report["base_like_rate"] = loop.measure(base)["like_rate"]
        await loop.vote(shown)
        first = loop if first_version == "trained" else dataclasses.replace(
            loop, settings=dataclasses.replace(s, training=IDENTITY))
        by_hand = await asyncio.to_thread(first.curate_train_publish, 1)
        await running.service.reload_adapters()
        report["v1"] = {"like_rate": await true_rate(by_hand["published"]["version"])}
        log.info("v1 published by hand: like rate %.1f%% (base %.1f%%)", 100 * report["v1"]["like_rate"],
                 100 * report["base_like_rate"])

        requests = 0
        offset = 900_000
        while len(report["experiments"]) < rounds and requests < max_requests:
            serving = await loop.store.call(experiments.serving, ADAPTER)
            draws = [experiments.choose_arm(serving, rng.random()) for _ in range(batch)]
            for version, arm in sorted(set(draws), key=str):
                count = sum(1 for d in draws if d == (version, arm))
                rendered: list[Rendered] = await render(loop.client, s, prompts(count, offset), images_per_request,
                                                        version, seed_base=offset * 7)
                offset += count
                shown = await loop.show(rendered, serving.experiment_id if arm else None, arm)
                await loop.vote(shown)
            requests += batch
            done = await asyncio.to_thread(runner.step)
            for result in done.rounds:
                log.info("round: %s", result)
            for experiment, verdict in done.decisions:
                entry = {"candidate_version": experiment.candidate_version,
                         "control_version": experiment.control_version, "decision": verdict.decision,
                         "reason": verdict.reason, "candidate_votes": verdict.candidate.votes,
                         "control_votes": verdict.control.votes, "verdict": verdict.to_dict(),
                         "requests_so_far": requests,
                         "candidate_like_rate": await true_rate(experiment.candidate_version),
                         "control_like_rate": await true_rate(experiment.control_version)}
                report["experiments"].append(entry)
                log.info("experiment v%d vs v%d: %s after %d candidate votes (true like rates %.1f%% vs %.1f%%)",
                         experiment.candidate_version, experiment.control_version, verdict.decision,
                         verdict.candidate.votes, 100 * entry["candidate_like_rate"], 100 * entry["control_like_rate"])
        report["requests"] = requests
    finally:
        await loop.client.close()
        await loop.store.close()
        await running.stop()
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def simulate(runs: int, seed: int = 0) -> dict[str, Any]:
    """The gate alone at the shipped defaults: votes one at a time, half on each arm, a look
    after every vote, for candidates better, equal and worse than the control."""
    from loraloop.config import LoopConfig
    from loraloop.experiments import PROMOTE, Arm, GateSettings, evaluate

    settings = GateSettings.from_config(LoopConfig())
    rng = random.Random(seed)
    out = {}
    for candidate_rate in (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7):
        outcomes = []
        for _ in range(runs):
            arms = {"control": [0, 0], "candidate": [0, 0]}
            while True:
                name = "candidate" if rng.random() < 0.5 else "control"
                liked = rng.random() < (candidate_rate if name == "candidate" else 0.5)
                arms[name][0 if liked else 1] += 1
                control, candidate = (Arm(sum(arms[n]), *arms[n]) for n in ("control", "candidate"))
                verdict = evaluate(control, candidate, settings)
                if verdict.decision is not None:
                    outcomes.append((verdict.decision, verdict.reason, candidate.votes))
                    break
        promoted = [v for d, _, v in outcomes if d == PROMOTE]
        out[f"{candidate_rate:.2f} vs 0.50"] = {
            "promoted": len(promoted) / runs,
            "retired_worse": sum(r == "worse" for _, r, _ in outcomes) / runs,
            "retired_budget": sum(r == "vote_budget_spent" for _, r, _ in outcomes) / runs,
            "median_candidate_votes_to_promote": sorted(promoted)[len(promoted) // 2] if promoted else None,
        }
    return {"settings": dataclasses.asdict(settings), "runs": runs, "results": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", choices=("kto", "dpo"), default="dpo",
                        help="The objective the loop trains candidates with ([training] objective).")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="clean")
    parser.add_argument("--taste", default="warm")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="Experiments to run to a decision.")
    parser.add_argument("--inverted", action="store_true", help="Train every candidate on inverted votes.")
    parser.add_argument("--batch", type=int, default=8, help="Requests between two passes of the loop.")
    parser.add_argument("--count", type=int, default=4,
                        help="Images per request (/imagine count:); dpo pairs images of one prompt.")
    parser.add_argument("--first-version", choices=("base", "trained"), default="base",
                        help="v1, published by hand: the base model's look (an adapter that changes nothing), "
                             "or a full round trained on the base model's rated images.")
    parser.add_argument("--max-requests", type=int, default=6000, help="Give up after this many requests.")
    parser.add_argument("--json", type=Path, help="Write the report here.")
    parser.add_argument("--workdir", type=Path, help="Keep the data directory here (default: a temp dir).")
    parser.add_argument("--pretrained-base", type=Path, metavar="DIR",
                        help="Use (and cache in DIR) the tiny model taught to draw colour fields.")
    parser.add_argument("--simulate", action="store_true", help="Only the gate on synthetic votes.")
    parser.add_argument("--runs", type=int, default=400, help="--simulate: experiments per candidate rate.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "aiohttp.access", "generation", "training.train", "loraloop"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.simulate:
        report = simulate(args.runs, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="loraloop-gate-") as temp:
            root = args.workdir or Path(temp)
            from loraloop.tiny import tiny_model_path

            model = tiny_model_path(root / "tiny")
            if args.pretrained_base:
                model = pretrain_base(model, args.pretrained_base, LoopSettings.size)
            settings = LoopSettings(objective=args.objective, scenario=args.scenario, taste=args.taste,
                                    seed=args.seed, model=str(model), training=TRAINING[args.objective])
            data_dir = root / f"gate-{'inverted' if args.inverted else 'good'}-{args.objective}-{args.seed}"
            data_dir.mkdir(parents=True, exist_ok=True)
            report = asyncio.run(run_gate(settings, data_dir, args.rounds, args.inverted, args.batch,
                                          args.max_requests, BaseImages(root / "base-images"), args.count,
                                          args.first_version))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
