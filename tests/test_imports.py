"""The house has floors: every module imports first in a fresh interpreter, and the floor never looks up.

An import cycle shows only when a module is the *first* one imported, so each module gets its own
interpreter. The floor (`loraloop.config`, `store`, `context`, `tiny`) must import nothing from the
packages built on it; only the command line's roof (`loraloop.cli`, `loraloop.run`) gathers them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("loraloop", "bot", "generation", "training", "console")
FLOOR = ("loraloop.config", "loraloop.store", "loraloop.raters", "loraloop.experiments", "loraloop.context",
         "loraloop.tiny", "loraloop.bans")
ABOVE_THE_FLOOR = ("bot", "generation", "training", "console")


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            if path.stem == "__main__":
                continue  # running it is the command itself; test_cli covers `python -m loraloop`
            found.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return found


def import_alone(module: str) -> subprocess.CompletedProcess[str]:
    probe = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = modules()
    assert len(names) > 30, "the module list should cover the five packages"
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(names, pool.map(import_alone, names), strict=True))
    failures = {name: result.stderr.strip().splitlines()[-1] for name, result in results.items()
                if result.returncode != 0}
    assert failures == {}


def test_the_floor_imports_nothing_built_on_it():
    for module in FLOOR:
        result = import_alone(module)
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stdout)
        above = [name for name in loaded if name.split(".")[0] in ABOVE_THE_FLOOR]
        assert above == [], f"{module} pulls in {above}"


def test_a_service_on_the_local_backend_never_imports_ray(tiny_model_dir, data_dir):
    script = f"""
import asyncio, sys
from generation.server import start_service
from loraloop.config import Config, Secrets

async def main():
    running = await start_service(Config().replace("service", model={str(tiny_model_dir)!r}), Secrets(None, None))
    await running.stop()

asyncio.run(main())
assert "ray" not in sys.modules, "the local backend imported ray"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
