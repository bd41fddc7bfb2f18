"""Gentler ranks: the knob the metric budget's search turns when a reduction costs too much."""

from __future__ import annotations

import dataclasses
import math

from .analysis import SpectralReport, round_rank


def relax_rank(rank: int, dim: int, relaxation: float, multiple: int = 1) -> int:
    """`rank` moved `relaxation` (in [0, 1)) of the way back to `dim`, rounded up to a multiple of `multiple`."""
    if not 0.0 <= relaxation < 1.0:
        raise ValueError(f"`relaxation` must be in [0, 1), got {relaxation}.")
    return round_rank(rank + math.ceil(relaxation * (dim - rank)), dim, multiple)


def relax_report(report: SpectralReport, relaxation: float) -> SpectralReport:
    """The same report with every site's `rank` relaxed (`signal_rank` keeps the MP count); itself at 0."""
    if relaxation == 0.0:
        return report
    multiple = report.options.rank_multiple
    sites = {
        name: dataclasses.replace(site, rank=relax_rank(site.rank, site.dim, relaxation, multiple))
        for name, site in report.items()
    }
    return SpectralReport(sites, report.options, report.fingerprint)
