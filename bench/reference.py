"""Side by side, in one run: diffusers' own LoRA training script against `loraloop train` on the same work.

    .venv/bin/python -m bench.reference --script-repo DIFFUSERS_GIT_DIR \\
        --reference-python /work/anchor-venv/bin/python --torchvision /work/tv
    .venv/bin/python -m bench.reference --script train_text_to_image_lora.py --reference-python ... --repeats 5

The reference is `examples/text_to_image/train_text_to_image_lora.py` as diffusers ships it
(read out of a diffusers git directory at --tag with `git show`, or a copy given with --script;
never edited, never part of this repository). It runs in its own venv (--reference-python: torch,
diffusers, transformers, peft, accelerate, datasets) with torchvision put on its path from a
folder of its own (--torchvision: `pip install --no-deps --target DIR torchvision==0.28.0`; kept
out of every venv because its CUDA build breaks CPU torch's import, see bench/reference_launch.py).

The work, the same for both: a tiny SD-1.x-shaped model with random weights (the shapes the
issue's figures were measured on: UNet blocks (32, 64) with 2 layers each, a 5-layer CLIP text
encoder of width 32, a 2-block VAE), 32 coloured-shape images at 64 px with captions, batch 4,
LoRA rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0, AdamW at lr 1e-4 constant, fp32, seed 42,
60 steps, no validation, no checkpoints, no flips, no Min-SNR weighting.

The runs alternate (reference, loraloop uncached, loraloop cached, the order rotated each
repeat, after one untimed warm-up of each trainer) so that load from other work on a shared
machine falls on all three alike. Each run's steady-state steps/s is timed from per-step stamps
(steps SKIP+1 to the last); peak RSS is the child's own maximum resident set (os.wait4). Printed:
every run, the medians, versions and load, and last a line
`ratio_uncached=.. ratio_cached=.. rss_ratio=..` (loraloop / reference; rss_ratio is the larger
of the two loraloop runs' medians over the reference's).

--set KEY=VALUE (repeatable) is passed on to both loraloop runs, to try a setting side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and bench/training.py would then
# shadow the `training` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

LAUNCHER = Path(__file__).resolve().parent / "reference_launch.py"
SCRIPT_IN_REPO = "examples/text_to_image/train_text_to_image_lora.py"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
JOB = "reference-bench"


def build_model(path: Path) -> None:
    """The tiny model both trainers load, saved with save_pretrained (random weights, fixed seed)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from loraloop.tiny import _byte_level_vocab

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vocab = _byte_level_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    # Any: mypy reads diffusers' lazy top-level names as its dummy placeholder classes.
    pipe: Any = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                        scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    pipe.save_pretrained(path)


def make_dataset(out: Path, count: int, size: int) -> None:
    """Coloured shapes on coloured grounds, captioned; metadata.jsonl as both trainers read it."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    rows = []
    for i in range(count):
        fg, bg = rng.sample(list(COLOURS), 2)
        shape = SHAPES[i % len(SHAPES)]
        image = Image.new("RGB", (size, size), COLOURS[bg])
        r = rng.randint(size // 6, size // 3)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[fg])
        elif shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=COLOURS[fg])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[fg])
        image.save(out / f"{i:03d}.png")
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {fg} {shape} on a {bg} background"}))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def timed(command: list[str], env: dict[str, str], log: Path) -> resource.struct_rusage:
    """Run `command`, its output to `log`; its resource usage. A failed run stops the benchmark."""
    with log.open("w") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(command[:4])}... failed ({code}); see {log}")
    return usage


def figures(times_json: Path, usage: resource.struct_rusage, skip: int) -> dict[str, float]:
    """Steady-state steps/s by the clock and per CPU second, peak RSS (MiB), minor page faults per step."""
    times = json.loads(times_json.read_text())
    wall, cpu, faults = times["step_end_s"], times["step_end_cpu_s"], times["step_end_minor_faults"]
    if len(wall) <= skip:
        sys.exit(f"{times_json}: only {len(wall)} steps were timed; need more than --skip {skip}")
    steps = len(wall) - skip
    return {"steps_per_s": steps / (wall[-1] - wall[skip - 1]), "steps_per_cpu_s": steps / (cpu[-1] - cpu[skip - 1]),
            "rss_mib": usage.ru_maxrss / 1024, "faults_per_step": (faults[-1] - faults[skip - 1]) / steps}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, script: Path) -> None:
        self.args, self.work, self.script = args, work, script
        self.runs = work / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf"),
                    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}

    def reference(self, name: str) -> dict[str, float]:
        a = self.args
        env = {**self.env, "LORALOOP_BENCH_TV_SHIM": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (a.torchvision, self.env.get("PYTHONPATH")) if p)}
        command = [a.reference_python, str(LAUNCHER), str(self.runs / f"{name}.json"), "Steps", "script",
                   str(self.script), f"--pretrained_model_name_or_path={self.work / 'model'}",
                   f"--train_data_dir={self.work / 'data'}", "--caption_column=text", f"--resolution={a.resolution}",
                   f"--train_batch_size={a.batch_size}", f"--max_train_steps={a.steps}", "--learning_rate=1e-4",
                   "--rank", str(a.rank), "--seed", "42", "--dataloader_num_workers", "0",
                   "--output_dir", str(self.work / f"out-{name}")]
        usage = timed(command, env, self.runs / f"{name}.log")
        return figures(self.runs / f"{name}.json", usage, a.skip)

    def loraloop(self, name: str, cached: bool) -> dict[str, float]:
        a = self.args
        # A fresh data directory per run: a cached run encodes everything once before its first step.
        env = {**self.env, "LORALOOP_DATA_DIR": str(self.work / f"ldata-{name}")}
        settings = [f"resolution={a.resolution}", f"batch_size={a.batch_size}", "learning_rate=1e-4",
                    'targets=["attention"]', f"cache_latents={str(cached).lower()}", "validation_split=0.0",
                    "checkpoint_every=1000000", 'log_with="none"', "random_flip=false", "snr_gamma=0.0", "seed=42",
                    *a.set]
        command = [sys.executable, str(LAUNCHER), str(self.runs / f"{name}.json"), JOB, "loraloop",
                   "train", str(self.work / "data"), "--name", JOB, "--model", str(self.work / "model"),
                   "--output", str(self.work / f"out-{name}"), "--steps", str(a.steps), "--rank", str(a.rank),
                   "--alpha", str(a.rank), *[arg for s in settings for arg in ("--set", s)]]
        usage = timed(command, env, self.runs / f"{name}.log")
        return figures(self.runs / f"{name}.json", usage, a.skip)


def versions(python: str) -> str:
    code = ("import importlib.metadata as m, platform; print(platform.python_version(), *(f'{p} '"
            "+ m.version(p) for p in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate')))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def script_from(args: argparse.Namespace, work: Path) -> Path:
    if args.script:
        return Path(args.script).resolve()
    shown = subprocess.run(["git", "--git-dir", args.script_repo, "show", f"{args.tag}:{SCRIPT_IN_REPO}"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"cannot read {SCRIPT_IN_REPO} at {args.tag} from {args.script_repo}: {shown.stderr.strip()}")
    script = work / "train_text_to_image_lora.py"
    script.write_text(shown.stdout)
    return script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--script", help="diffusers' train_text_to_image_lora.py, as fetched")
    source.add_argument("--script-repo", help="a diffusers git directory to read the script from at --tag")
    parser.add_argument("--tag", default="v0.40.0")
    parser.add_argument("--reference-python", help="python of the venv the reference runs in (required)")
    parser.add_argument("--torchvision", help="folder with torchvision installed --no-deps --target")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of steps/s (warm-up)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra loraloop setting")
    parser.add_argument("--workdir", help="keep models, logs and per-step times here (default: a temp dir)")
    parser.add_argument("--build-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_model:
        build_model(Path(args.build_model))
        return
    if not (args.script or args.script_repo) or not args.reference_python:
        parser.error("give --script or --script-repo, and --reference-python")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        script = script_from(args, work)
        if not (work / "model" / "model_index.json").is_file():
            # Built in a child so this process stays small and never imports torch.
            subprocess.run([sys.executable, __file__, "--build-model", str(work / "model")], check=True,
                           capture_output=True)
        make_dataset(work / "data", args.images, args.resolution)
        bench = Bench(args, work, script)
        trainers = {"reference": bench.reference, "uncached": lambda name: bench.loraloop(name, cached=False),
                    "cached": lambda name: bench.loraloop(name, cached=True)}
        load_before = os.getloadavg()
        bench.reference("warm-reference")
        bench.loraloop("warm-loraloop", cached=False)
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in trainers}
        order = list(trainers)
        for repeat in range(args.repeats):
            for kind in order[repeat % 3:] + order[:repeat % 3]:
                run = trainers[kind](f"{kind}-{repeat}")
                runs[kind].append(run)
                print(f"  {kind:9s} run {repeat + 1}: {run['steps_per_s']:.2f} steps/s, {run['steps_per_cpu_s']:.2f} "
                      f"per CPU s, {run['rss_mib']:.0f} MiB, {run['faults_per_step']:.0f} faults/step", flush=True)
        load_after = os.getloadavg()

    print(f"\n{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"reference: {args.script or f'{args.script_repo} @ {args.tag}'}; {versions(args.reference_python)}")
    print(f"loraloop:  {versions(sys.executable)}; extra settings: {args.set or 'none'}")
    print(f"{args.images} images at {args.resolution} px, batch {args.batch_size}, rank {args.rank}, {args.steps} "
          f"steps, figures over steps {args.skip + 1}-{args.steps}, {args.repeats} interleaved repeats, medians\n")
    median = {k: {key: statistics.median(r[key] for r in v) for key in v[0]} for k, v in runs.items()}
    labels = {"reference": "diffusers script", "uncached": "loraloop uncached", "cached": "loraloop cached"}
    print(f"| {'trainer':18s} | steps/s (each run) | median | steps per CPU s | peak RSS MiB | faults/step |")
    print("|---|---|---|---|---|---|")
    for kind, each in runs.items():
        m = median[kind]
        each_run = " ".join(f"{r['steps_per_s']:.2f}" for r in each)
        print(f"| {labels[kind]:18s} | {each_run} | {m['steps_per_s']:.2f} "
              f"| {m['steps_per_cpu_s']:.2f} | {m['rss_mib']:.0f} | {m['faults_per_step']:.0f} |")
    ref = median["reference"]
    rss_ratio = max(median["uncached"]["rss_mib"], median["cached"]["rss_mib"]) / ref["rss_mib"]
    print(f"\nper CPU second: ratio_uncached={median['uncached']['steps_per_cpu_s'] / ref['steps_per_cpu_s']:.2f} "
          f"ratio_cached={median['cached']['steps_per_cpu_s'] / ref['steps_per_cpu_s']:.2f}")
    print(f"ratio_uncached={median['uncached']['steps_per_s'] / ref['steps_per_s']:.2f} "
          f"ratio_cached={median['cached']['steps_per_s'] / ref['steps_per_s']:.2f} rss_ratio={rss_ratio:.2f}")

if __name__ == "__main__":
    main()
