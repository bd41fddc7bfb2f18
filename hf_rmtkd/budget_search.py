"""A model-level quality budget for post-training compression: bisect the per-site output-error budget until the
model's own metric (perplexity, accuracy, ...) stays within a maximum relative drop."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from .compression import compress


logger = logging.getLogger(__name__)


@dataclass
class BudgetTry:
    """One compression tried by [`search_output_error`].

    Attributes:
        max_output_error: the per-site budget tried.
        metric: the evaluation of the compressed model; relative_drop: its drop relative to the original (positive
            is worse, in either direction of `greater_is_better`).
        parameters: the compressed model's parameter count; accepted: whether `relative_drop <= max_relative_drop`.
    """

    max_output_error: float
    metric: float
    relative_drop: float
    parameters: int
    accepted: bool


def _relative_drop(metric: float, reference: float, greater_is_better: bool) -> float:
    change = (reference - metric) if greater_is_better else (metric - reference)
    return change / abs(reference) if reference else change


def search_output_error(
    model: nn.Module,
    calibration_data: Iterable,
    evaluate: Callable[[nn.Module], float],
    max_relative_drop: float,
    greater_is_better: bool = False,
    low: float = 1e-4,
    high: float = 0.5,
    tries: int = 6,
    **compress_kwargs,
):
    """Compress `model` with the loosest per-site `max_output_error` whose model-level metric stays within
    `max_relative_drop` of the original's.

    The budget is bisected on a log scale in `[low, high]`: `high` first (accepted: done), then `low` (refused: the
    tightest model is returned with a warning), then geometric midpoints. Each try compresses a fresh copy of `model`.

    Cost: one evaluation of `model`, plus per try one `compress` (a calibration pass per reduction kind, see
    [`hf_rmtkd.compress`]) and one evaluation: at most `tries` of each. Memory: one extra copy of the model at a time.

    Args:
        model: the trained model (left unchanged).
        calibration_data: re-iterable batches, as for [`hf_rmtkd.compress`].
        evaluate: `model -> metric` on held-out data (e.g. perplexity, lower is better; or accuracy).
        max_relative_drop: largest accepted relative change of the metric for the worse (0.25: perplexity at most
            1.25x the original's, or accuracy at least 0.75x).
        greater_is_better: the metric's direction (`False` for perplexity or loss).
        low, high: the range of per-site budgets searched, `0 < low < high < 1`.
        tries: compressions at most, >= 2.
        **compress_kwargs: passed to [`hf_rmtkd.compress`] (`target_modules`, `hidden_width`, `ffn_method`, spectral
            options); `progress` defaults to `False`.

    Returns:
        `(compressed, tries)`: the accepted model with the loosest budget (or the tightest tried when none was
        accepted) and every [`BudgetTry`], in order (also logged).
    """
    if not 0 < low < high < 1:
        raise ValueError(f"`low` and `high` must satisfy 0 < low < high < 1, got low={low}, high={high}.")
    if tries < 2:
        raise ValueError(f"`tries` must be >= 2, got {tries}.")
    if max_relative_drop < 0:
        raise ValueError(f"`max_relative_drop` must be >= 0, got {max_relative_drop}.")
    if "max_output_error" in compress_kwargs:
        raise ValueError("`max_output_error` is what this function searches: do not pass it.")
    if iter(calibration_data) is calibration_data:
        calibration_data = list(calibration_data)  # compressed once per try
    compress_kwargs.setdefault("progress", False)
    reference = float(evaluate(model))
    history: list[BudgetTry] = []

    def attempt(budget: float) -> tuple[BudgetTry, nn.Module]:
        compressed = compress(copy.deepcopy(model), calibration_data, max_output_error=budget, **compress_kwargs)
        metric = float(evaluate(compressed))
        drop = _relative_drop(metric, reference, greater_is_better)
        entry = BudgetTry(budget, metric, drop, compressed.num_parameters(), drop <= max_relative_drop)
        history.append(entry)
        logger.info(
            "Output-error budget %.3g: metric %.4g (relative drop %.2f%%, allowed %.2f%%), %d parameters: %s",
            budget, metric, 100 * drop, 100 * max_relative_drop, entry.parameters, "accepted" if entry.accepted else "refused",
        )  # fmt: skip
        return entry, compressed

    entry, compressed = attempt(high)
    if entry.accepted:
        return compressed, history
    entry, compressed = attempt(low)
    if not entry.accepted:
        logger.warning(
            "Even the tightest budget tried (%.3g) drops the metric by %.2f%% (allowed %.2f%%): returning it.",
            low, 100 * entry.relative_drop, 100 * max_relative_drop,
        )  # fmt: skip
        return compressed, history
    best, accepted, refused = compressed, low, high
    for _ in range(tries - 2):
        middle = math.sqrt(accepted * refused)
        entry, candidate = attempt(middle)
        if entry.accepted:
            best, accepted = candidate, middle
        else:
            refused = middle
    return best, history
