"""What every benchmark script shares: percentiles, aligned tables, verdicts against targets."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], which: int) -> float:
    """The ``which``-th percentile (1 to 99) of ``samples``, inclusive method; one sample is itself."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(sorted(samples), n=100, method="inclusive")[which - 1]


def table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows as aligned lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))])
        for row in rows
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """Whether one measured path met its target, and the sentence that says so."""

    key: str
    met: bool
    text: str
