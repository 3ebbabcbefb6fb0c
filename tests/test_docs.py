"""The README's configuration reference stays true to loraloop/config.py.

The reference is a table per section under "## Configuration reference": a row per key with its
default as TOML. Adding a key without documenting it, or changing a default without updating
the README, fails here.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest

from loraloop.config import Config

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "source"]


def documented_keys() -> dict[str, dict[str, str]]:
    """Section -> key -> the default as written, from the README's reference tables."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Configuration reference")
    end = text.find("\n## ", start + 1)
    reference = text[start:end if end != -1 else len(text)]
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in reference.splitlines():
        heading = re.match(r"### `\[(\w+)\]`", line)
        if heading:
            section = heading.group(1)
            tables[section] = {}
            continue
        row = re.match(r"\| `(\w+)` \| `(.*?)` \|", line)
        if row and section is not None:
            tables[section][row.group(1)] = row.group(2)
    return tables


def section_defaults(section: str) -> dict[str, typing.Any]:
    cls = typing.get_type_hints(Config)[section]
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def test_the_reference_has_a_table_for_every_config_section():
    assert sorted(documented_keys()) == sorted(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_the_reference_lists_every_key_of_the_section_and_no_other(section):
    documented = documented_keys().get(section, {})
    keys = section_defaults(section)
    assert not set(keys) - set(documented), f"[{section}] keys missing from the README: {set(keys) - set(documented)}"
    unknown = set(documented) - set(keys)
    assert not unknown, f"[{section}] README lists keys that do not exist: {unknown}"


@pytest.mark.parametrize("section", SECTIONS)
def test_the_reference_shows_each_keys_real_default(section):
    documented = documented_keys().get(section, {})
    for key, default in section_defaults(section).items():
        if key not in documented:
            continue  # reported by the test above
        shown = tomllib.loads(f"v = {documented[key]}")["v"]
        assert shown == default, f"[{section}] {key}: README says {documented[key]}, config.py has {default!r}"
