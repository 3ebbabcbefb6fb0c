"""Speed options of the training loop that change no numbers: the same seed gives the same loss curve and adapter.

    train(plan)                          # both on (the default)
    train(plan, speed=training.speed.PLAIN)  # both off: what tests compare against

- foreach AdamW: one multi-tensor update of all LoRA tensors instead of a Python loop over each
  (torch picks foreach by itself only on CUDA). The same arithmetic per element, so bit-identical.
- glibc malloc kept from giving buffers back: glibc serves blocks above its mmap threshold
  (128 KiB, raised dynamically) with fresh mmaps and trims the heap top above 128 KiB, so a step's
  activation buffers were page-faulted in again on every step (about 300 faults a step on the
  benchmark's tiny model). A fixed threshold of 64 MiB and a trim threshold of 256 MiB keep those
  buffers in the heap between steps; peak RSS stays what the largest step needs. mallopt sets it for
  the whole process and cannot be undone, so it is applied once, on glibc only; it moves no values.

Measured side by side with diffusers' own script in bench/RESULTS.md ("Side by side").

Floor: part of training/; imports torch and the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


@dataclass(frozen=True)
class Speed:
    foreach_optimizer: bool = True
    keep_malloc_buffers: bool = True


FAST = Speed()
PLAIN = Speed(foreach_optimizer=False, keep_malloc_buffers=False)

_malloc_tuned = False


def keep_malloc_buffers() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where libc is not glibc."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  # only glibc has it; musl's mallopt ignores these
    except (OSError, AttributeError, TypeError):
        return False
    _malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _malloc_tuned:
        log.debug("mallopt refused the thresholds; training runs with glibc's defaults")
    return _malloc_tuned


def optimizer_options(speed: Speed, optimizer_class: Any) -> dict[str, Any]:
    """Extra keyword arguments for the optimiser: foreach for torch's AdamW, nothing for others (8-bit AdamW)."""
    import torch

    return {"foreach": True} if speed.foreach_optimizer and optimizer_class is torch.optim.AdamW else {}
