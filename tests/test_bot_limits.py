"""The bot's refusals, decided before any work: caps, cooldown, blocked terms, places, bans."""

from __future__ import annotations

import pytest

from bot.limits import Limits
from loraloop.config import BotConfig, ConfigError, parse_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(clock: Clock | None = None, bans_path=None, **config) -> Limits:
    return Limits(BotConfig(**config), bans_path=bans_path, clock=clock or Clock())


def test_a_second_request_inside_the_cooldown_is_refused_until_it_passes():
    clock = Clock()
    guard = limits(clock, cooldown_seconds=10, max_active_per_user=5, max_queued_per_user=5)
    assert guard.check(1, "a fox") is None
    guard.started(1, "job-1")
    clock.now += 4
    refusal = guard.check(1, "a fox")
    assert refusal.reason == "cooldown" and "6 s" in refusal.message
    assert guard.check(2, "a fox") is None, "another user is not slowed down"
    clock.now += 6
    assert guard.check(1, "a fox") is None


def test_the_active_and_queued_caps_count_each_users_jobs():
    guard = limits(cooldown_seconds=0, max_active_per_user=2, max_queued_per_user=1)
    guard.started(1, "a")
    assert guard.check(1, "x").reason == "queued_cap"
    guard.running(1, "a")
    assert guard.check(1, "x") is None
    guard.started(1, "b")
    assert guard.check(1, "x").reason == "active_cap"
    guard.finished(1, "a")
    guard.running(1, "b")
    assert guard.check(1, "x") is None


def test_blocked_terms_match_whole_words_in_either_prompt_case_insensitively():
    guard = limits(blocked_terms=["gore", "red panda"])
    assert guard.check(1, "Lots of GORE!").reason == "blocked_term"
    assert guard.check(1, "a cat", negative="a Red  Panda") is None  # two spaces: a different phrase
    assert guard.check(1, "a cat", negative="a red panda").reason == "blocked_term"
    assert guard.check(1, "gorey details") is None


def test_a_prompt_over_the_limit_is_refused_with_its_length():
    refusal = limits(max_prompt_chars=10).check(1, "x" * 11)
    assert refusal.reason == "prompt_too_long" and "11" in refusal.message and "10" in refusal.message


def test_channels_outside_the_allowlist_and_dms_are_refused_unless_enabled():
    guard = limits(channels=[5])
    assert guard.check_place(5, in_dm=False) is None
    assert "<#5>" in guard.check_place(6, in_dm=False).message
    assert guard.check_place(None, in_dm=True).reason == "dm"
    assert limits(allow_dms=True).check_place(None, in_dm=True) is None


def test_bans_survive_a_restart(tmp_path):
    path = tmp_path / "bans.json"
    guard = limits(bans_path=path)
    assert guard.ban(7) and not guard.ban(7)
    assert limits(bans_path=path).check(7, "a fox").reason == "banned"
    assert limits(bans_path=path).unban(7)
    assert limits(bans_path=path).check(7, "a fox") is None


def test_a_corrupt_bans_file_stops_the_bot_instead_of_unbanning_everyone(tmp_path):
    path = tmp_path / "bans.json"
    path.write_text("{not json")
    with pytest.raises(RuntimeError, match="cannot read bans"):
        limits(bans_path=path)


def test_rating_emojis_must_be_likes_or_dislikes():
    with pytest.raises(ConfigError, match="rating_emojis"):
        parse_config({"bot": {"rating_emojis": {"👍": 2}}})
