"""Choosing and cutting the hidden width, for any registered family: pooled stream statistics, the MP width (in
progressive steps if asked), the slice, and the typed record. Pure: nothing here changes the caller's model; the
reduction pipeline ([`hf_rmtkd.pipeline`]) applies the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..analysis import SiteReport, SpectralOptions, round_rank
from ..calibration import ActivationStatistics, collect_statistics
from ..kept_basis import StreamMap
from ..output_error import budget_site
from ..records import HiddenRecord, provenance_of
from ..relaxation import relax_rank
from .family import family_for


def stream_states(model: nn.Module) -> list[str]:
    """Modules whose input is a state of `model`'s residual stream (see [`HiddenFamily.states`])."""
    return family_for(model).states(model)


def residual_statistics(
    model: nn.Module,
    calibration_data,
    max_samples: int | None = None,
    progress: bool = True,
    return_fingerprint: bool = False,
    extra: list[str] | tuple[str, ...] = (),
):
    """Statistics of the residual stream, pooled (averaged) over its states and per state.

    `extra` names further modules whose input statistics are collected in the same pass (returned with the states').

    Returns:
        The pooled statistics, of width `d`, whose `count` is the number of tokens (not tokens x states: every state
        sees the same tokens, so the MP ratio `q = d / n` uses the token count), and the statistics per state
        (keyed by [`stream_states`]); with `return_fingerprint`, also the sha256 of the calibration batches.
    """
    names = family_for(model).states(model)
    stats, fingerprint = collect_statistics(model, calibration_data, names + list(extra), max_samples, progress)
    states = [stats[name] for name in names]
    mean_outer = sum(s.sum_outer for s in states) / len(states)
    pooled = ActivationStatistics(mean_outer, sum(s.sum for s in states) / len(states), states[0].count)
    return (pooled, stats, fingerprint) if return_fingerprint else (pooled, stats)


def step_width(current: int, mp_width: int, steps_left: int, relaxation: float = 0.0) -> int:
    """The width of one hidden-width step, before rounding.

    Progressive width reaches the MP width in `steps_left` geometric steps: `current * (mp / current)^(1 / steps)`
    (the MP width itself when `steps_left` is 1). `relaxation` in [0, 1) moves it towards `current` by that share of
    the gap (the gentler rank a metric budget retries with).
    """
    if steps_left < 1:
        raise ValueError(f"`steps_left` must be >= 1, got {steps_left}.")
    target = mp_width if steps_left == 1 else current * (mp_width / current) ** (1.0 / steps_left)
    return relax_rank(max(mp_width, round(target)), current, relaxation)


@dataclass
class HiddenReduction:
    """The outcome of one hidden-width step.

    Attributes:
        report: the MP analysis of the pooled stream; its `rank` is the new width (`dim` when nothing is dropped).
        fingerprint: sha256 of the calibration batches.
        model: the sliced model, or `None` when the width is kept.
        record: the [`HiddenRecord`] of the model after this step (relative to the original model), or `None`.
        stream_map: the map from the old stream to the new one, or `None`.
    """

    report: SiteReport
    fingerprint: str
    model: nn.Module | None = None
    record: HiddenRecord | None = None
    stream_map: StreamMap | None = None


def plan_hidden(
    model: nn.Module,
    previous: HiddenRecord | None,
    calibration_data,
    options: SpectralOptions,
    progress: bool = True,
    steps_left: int = 1,
    relaxation: float = 0.0,
    width: int | None = None,
) -> HiddenReduction:
    """Analyse `model`'s residual stream and slice a new model to the chosen width; `model` itself is not changed.

    Decoders are sliced exactly up to the dropped directions; post-LN encoders are approximated (their norms fitted
    on a second pass over `calibration_data`, which must then be re-iterable, see [`hf_rmtkd.hidden.encoder`]).

    Args:
        previous: the record of earlier hidden-width steps of this model, if any (progressive width).
        steps_left (`int`, *optional*, defaults to 1): hidden-width steps left including this one; the width is a
            geometric step towards the MP width (see [`step_width`]).
        relaxation (`float`, *optional*, defaults to 0): share of the gap to the current width added back.
        width (`int`, *optional*): a fixed new width instead of the MP rule's (the top principal directions: PCA
            slicing, e.g. for a baseline); rounded up to a multiple of the heads.
    """
    family = family_for(model)
    budgeted = options.max_output_error is not None
    extra = family.budget_inputs(model) if budgeted else []
    pooled, states, fingerprint = residual_statistics(
        model, calibration_data, options.max_samples, progress, True, extra
    )
    report = family.analyze(pooled, model, options)
    if budgeted:
        multiple = family.width_multiple(model, options)
        errors = family.output_errors(model, report, states)
        report = budget_site(report, errors, options.max_output_error, multiple)
    # Progressive width re-estimates the MP width at every step, but never goes below the first estimate: the
    # narrower model's own spectrum would otherwise pull the target down step after step.
    mp_width = max(report.rank, previous.first_mp_width or 0) if previous else report.rank
    if width is None:
        width = step_width(report.dim, mp_width, steps_left, relaxation)
    width = round_rank(width, report.dim, family.width_multiple(model, options))
    report = dataclasses.replace(report, rank=width)
    if width >= report.dim:
        return HiddenReduction(report, fingerprint)
    sliced = family.slice(model, report, width, states, calibration_data, options, progress)
    overrides = {**(previous.config_overrides if previous else {}), **sliced.config_overrides}
    fields = {**sliced.record_fields, **({"attention_width": previous.attention_width} if previous else {})}
    record = HiddenRecord(
        rank=width,
        **{**provenance_of(report, options), "dim": previous.dim if previous else report.dim},
        config_overrides=overrides,
        widths=((previous.widths or [previous.rank]) if previous else []) + [width],
        first_mp_width=previous.first_mp_width if previous and previous.first_mp_width else mp_width,
        attention_width=fields.get("attention_width"),
    )
    return HiddenReduction(report, fingerprint, sliced.model, record, sliced.stream_map)
