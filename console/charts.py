"""The console's charts, drawn on the server with matplotlib (training/images.py's figures and canvas).

    svg = like_rate_chart(store.adapter_stats())
"""

from __future__ import annotations

from collections.abc import Sequence

from loraloop.store import AdapterStats
from training.curate import wilson_lower_bound
from training.images import figure_bytes, new_figure

Z95 = 1.96  # a 95% interval


def wilson_interval(likes: int, votes: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a like rate (curation's bound, both ends): honest about a handful of votes."""
    if votes == 0:
        return 0.0, 1.0
    return wilson_lower_bound(likes, votes, z), 1 - wilson_lower_bound(votes - likes, votes, z)


def label(stats: AdapterStats) -> str:
    if stats.adapter is None:
        return "base model"
    return f"{stats.adapter} v{stats.version}" if stats.version is not None else stats.adapter


def like_rate_chart(rows: Sequence[AdapterStats], fmt: str = "svg") -> bytes:
    """Like rate per adapter version with its 95% interval, the number of votes under each bar."""
    figure = new_figure((720, 360))
    axes = figure.add_subplot()
    rated = [row for row in rows if row.votes]
    if not rated:
        axes.set_title("no votes yet: rate some images first")
        axes.set_axis_off()
        return figure_bytes(figure, fmt)
    positions = list(range(len(rated)))
    rates = [row.likes / row.votes for row in rated]
    intervals = [wilson_interval(row.likes, row.votes) for row in rated]
    below = [rate - low for rate, (low, _) in zip(rates, intervals, strict=True)]
    above = [high - rate for rate, (_, high) in zip(rates, intervals, strict=True)]
    axes.bar(positions, rates, color="#2e8b57", yerr=[below, above], capsize=4, ecolor="0.3")
    axes.set_xticks(positions, [f"{label(row)}\n{row.votes} vote{'' if row.votes == 1 else 's'}" for row in rated])
    axes.set_ylim(0, 1)
    axes.set_ylabel("like rate (95% interval)")
    axes.set_title("like rate per adapter version")
    axes.grid(axis="y", alpha=0.3)
    return figure_bytes(figure, fmt)
