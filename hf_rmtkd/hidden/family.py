"""The protocol every hidden-width family implements, and the registry keyed by `model_type`.

A family says where its residual stream can be observed, how the MP rule's width is chosen from the pooled stream
statistics, and how a model is sliced to a kept basis. Adding a family (Qwen3, ViT, ...) is one new file with one
[`HiddenFamily`] subclass and one [`register_family`] call; nothing else in the library changes. Reloading needs
only the record's config overrides (plus [`hf_rmtkd.hidden_reload`] for what a family keeps at its old width).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..analysis import SiteReport, SpectralOptions, analyze_statistics
from ..calibration import ActivationStatistics
from ..kept_basis import StreamMap
from ..output_error import stream_errors
from ..records import HIDDEN_SITE
from ..sites import Site


@dataclass
class SliceResult:
    """What slicing a model to a kept basis returns.

    Attributes:
        model: the new model of the same class, with the narrower stream (same device, dtype, train/eval mode).
        config_overrides: base-config values that rebuild it on reload (`hidden_size` and what goes with it).
        stream_map: how the old stream maps onto the new one (for representation distillation; never saved in the
            checkpoint weights).
        record_fields: extra fields of the [`~hf_rmtkd.records.HiddenRecord`] (e.g. GPT-2's `attention_width`).
    """

    model: nn.Module
    config_overrides: dict
    stream_map: StreamMap
    record_fields: dict = field(default_factory=dict)


class HiddenFamily:
    """One family of models whose residual-stream width can be reduced (see the module text).

    Attributes:
        name: short name shown in errors and docs.
        model_types: the `config.model_type` values it handles.
        exact: whether slicing is exact up to the dropped directions (decoders) or fitted on the data (post-LN
            encoders, which then iterate the calibration data a second time).
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    exact: bool = True

    def states(self, model: nn.Module) -> list[str]:
        """Module paths whose *input* is a state of the residual stream; their statistics are pooled."""
        raise NotImplementedError

    def analyze(self, pooled: ActivationStatistics, model: nn.Module, options: SpectralOptions) -> SiteReport:
        """MP analysis of the pooled stream (uncentred: the projection must be linear, without a mean offset).

        The `rank` is rounded up to a multiple of the number of attention heads (transformers requires `hidden_size`
        to be one, even with an explicit `head_dim`) and of `options.rank_multiple`; `signal_rank` keeps the MP count.
        """
        multiple = self.width_multiple(model, options)
        hidden_options = dataclasses.replace(options, centered=False, rank_multiple=multiple)
        return analyze_statistics(Site(HIDDEN_SITE, "hidden", pooled.dim), pooled, hidden_options)

    def width_multiple(self, model: nn.Module, options: SpectralOptions) -> int:
        """Every width is a multiple of this (the heads and `options.rank_multiple`)."""
        return math.lcm(options.rank_multiple, model.config.num_attention_heads)

    def budget_inputs(self, model: nn.Module) -> list[str]:
        """Modules whose input statistics [`output_errors`] needs, observed in the same pass as [`states`]."""
        return []

    def output_errors(
        self, model: nn.Module, report: SiteReport, statistics: dict[str, ActivationStatistics]
    ) -> torch.Tensor:
        """Relative output error `e(k)` of keeping `k` stream directions, `k = 0..d` (the output-error budget's
        measure). Default: the share of the stream's own energy dropped ([`hf_rmtkd.output_error.stream_errors`])."""
        return stream_errors(report.eigenvalues)

    def slice(
        self,
        model: nn.Module,
        report: SiteReport,
        width: int,
        states: dict[str, ActivationStatistics],
        calibration_data,
        options: SpectralOptions,
        progress: bool,
    ) -> SliceResult:
        """A model whose stream keeps `width` directions chosen from `report.eigenvectors` (shape `(d, d)`).

        `states` holds the statistics per stream state (keyed by [`states`]); `calibration_data` is there for
        families that fit parts of the new model on the data."""
        raise NotImplementedError


FAMILIES: dict[str, HiddenFamily] = {}


def register_family(family: HiddenFamily) -> HiddenFamily:
    """Register `family` for each of its `model_types` (a later registration replaces an earlier one)."""
    if not family.model_types:
        raise ValueError(f"{type(family).__name__}.model_types is empty: say which model types it handles.")
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


def family_for(model: nn.Module) -> HiddenFamily:
    """The registered family of `model` (by `config.model_type`).

    Raises:
        `TypeError` naming the model type and listing the registered ones.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise TypeError(
            f"The hidden width is not supported for model_type {model_type!r} ({type(model).__name__}); registered "
            f"model types: {sorted(FAMILIES)} (add one with hf_rmtkd.hidden.register_family)."
        )
    return FAMILIES[model_type]


def top_directions(report: SiteReport, width: int) -> torch.Tensor:
    """The `width` leading eigenvectors of the report, shape `(d, width)`."""
    return report.eigenvectors[:, :width]
