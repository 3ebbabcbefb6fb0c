"""Personal styles: the adapter each person can have, trained from their own votes only.

    personal_adapter_name(1234)          # -> "personal-1234", its folder in ADAPTERS_DIR
    personal_owner("personal-1234@2")    # -> 1234; None for a shared style

A personal adapter is published beside the shared ones under a name that carries its owner's
Discord id, so every place that applies adapters can tell whose it is: the service refuses it to
any other requester (generation/jobs.py), the bot never lists or autocompletes it, and the loop
trains (training/loop.py) and removes it. Its life is a row of `profiles` in the store:
requested -> training -> ready (or failed), and deleted by /profile delete or /optout.

Floor: loraloop/ (stdlib only).
"""

from __future__ import annotations

import re

PERSONAL_PREFIX = "personal-"
# A Discord snowflake is at most 20 digits; \A...\Z as in generation/contract.py.
_PERSONAL_RE = re.compile(r"\Apersonal-([0-9]{1,20})\Z")
PROFILE_STATUSES = ("requested", "training", "ready", "failed", "deleted")


def personal_adapter_name(user_id: int) -> str:
    return f"{PERSONAL_PREFIX}{user_id}"


def personal_owner(name: str) -> int | None:
    """The Discord user a personal adapter belongs to (a version pin "@N" is ignored); None if shared."""
    match = _PERSONAL_RE.match(name.partition("@")[0])
    return int(match[1]) if match else None


def requester_id(requester: str) -> int | None:
    """The Discord user id of a service requester ("discord:1234"); None for anyone else."""
    kind, _, number = requester.partition(":")
    return int(number) if kind == "discord" and number.isascii() and number.isdigit() else None
