"""One timed training run for bench/reference.py: the reference script or `loraloop train`, unedited.

    python bench/reference_launch.py TIMES_JSON BAR_NAME script PATH_TO_SCRIPT [script args...]
    python bench/reference_launch.py TIMES_JSON BAR_NAME loraloop train ...

Either trainer shows one progress bar per optimiser step (diffusers' script names it "Steps",
`loraloop train` names it after the job). tqdm.auto.tqdm is wrapped before the trainer imports
it, so each update of the bar called BAR_NAME records a time.perf_counter() stamp and the process's
CPU time; the stamps go to TIMES_JSON at exit. That is how steady-state steps/s is measured without touching either
trainer's code. Peak RSS is measured by the parent (os.wait4), not here.

This file runs under the reference's venv too, so it imports nothing of the project at module
level and only the stdlib, torch and tqdm, which both venvs have.

The reference needs one shim on a CPU-only box: PyPI's Linux torchvision 0.28.0 wheel is a CUDA
build whose compiled ops cannot load against torch's CPU build, and its import then fails in
`torchvision/_meta_registrations.py` registering fake kernels for ops that were never defined
("operator torchvision::nms does not exist"). Defining those two op schemas first lets the import
succeed; the script uses only torchvision.transforms (PIL), never the ops. LORALOOP_BENCH_TV_SHIM=1
turns it on.
"""

import atexit
import json
import os
import resource
import runpy
import sys
import time

STARTED = time.perf_counter()
# Run as a script, this file's folder (bench/) comes first on sys.path, where bench/bot.py and
# bench/training.py would shadow the project's packages of those names.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import torch  # noqa: E402
import tqdm.auto  # noqa: E402

if os.environ.get("LORALOOP_BENCH_TV_SHIM") == "1":
    _torchvision_ops = torch.library.Library("torchvision", "DEF")  # must stay referenced while the process runs
    _torchvision_ops.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_ops.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

TIMES_JSON, BAR_NAME, KIND = sys.argv[1], sys.argv[2], sys.argv[3]
stamps: list[float] = []
cpu_stamps: list[float] = []  # process CPU seconds: on a loaded machine, what the run itself spent
fault_stamps: list[int] = []  # minor page faults so far: memory the allocator handed back and asked for again
_tqdm = tqdm.auto.tqdm


class _TimedBar(_tqdm):
    def update(self, n=1):
        shown = super().update(n)
        if getattr(self, "desc", None) == BAR_NAME:
            stamps.extend([time.perf_counter() - STARTED] * int(n))
            cpu_stamps.extend([time.process_time()] * int(n))
            fault_stamps.extend([resource.getrusage(resource.RUSAGE_SELF).ru_minflt] * int(n))
        return shown


tqdm.auto.tqdm = _TimedBar


@atexit.register
def _write_times() -> None:
    with open(TIMES_JSON, "w") as f:
        json.dump({"step_end_s": stamps, "step_end_cpu_s": cpu_stamps, "step_end_minor_faults": fault_stamps,
                   "exit_s": time.perf_counter() - STARTED,
                   "torch": torch.__version__, "torch_threads": torch.get_num_threads()}, f)


if KIND == "script":
    sys.argv = sys.argv[4:]
    runpy.run_path(sys.argv[0], run_name="__main__")
elif KIND == "loraloop":
    from loraloop.cli import main

    sys.argv = ["loraloop", *sys.argv[4:]]
    try:
        main()
    except SystemExit as exc:  # click exits 0 after a command; anything else is a failed run
        if exc.code not in (0, None):
            raise
else:
    sys.exit(f"unknown kind {KIND!r}: use 'script' or 'loraloop'")
