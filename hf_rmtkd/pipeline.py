"""The one reduction pipeline: calibrate, analyse, reduce, record. `compress` and `RMTKDTrainer` both call
[`reduce_model`]; nothing else changes a model's structure.

One reduction is a [`ReductionPlan`]: optionally one hidden-width step first (every other site's recorded shape
depends on the width), then the chosen sites. It is all or nothing: if any part fails, the model, its config
records, its kept bases and its spectra are exactly as they were, and the error names what failed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .analysis import SiteReport, SpectralOptions, SpectralReport, analyze_sites
from .hidden import plan_hidden
from .kept_basis import add_stream_map, stream_maps
from .records import HIDDEN_SITE, OPTION_KEYS, ModuleRecord, ReductionRecord
from .relaxation import relax_report
from .sites import select_sites, site_kinds
from .surgery import FFN_METHODS, reduce_site


logger = logging.getLogger(__name__)


@dataclass
class ReductionPlan:
    """What one reduction does.

    Args:
        target_modules (`str` or `list[str]`, *optional*): sites to reduce after the hidden width, as in
            [`hf_rmtkd.analyze`]; `None` selects every default site, `[]` none.
        hidden_steps_left (`int`, *optional*, defaults to 0): `0`: keep the hidden width; `n >= 1`: one hidden-width
            step, a geometric `1/n` of the way to the MP width (`1`: all the way).
        hidden_width (`int`, *optional*): a fixed new hidden width instead of the MP rule's (PCA slicing).
        ffn_method (`str`, *optional*, defaults to `"select"`): FFN surgery, `"select"` or `"project"`.
        relaxation (`float`, *optional*, defaults to 0): share of the way from every MP rank back to the full width,
            in [0, 1) (a metric budget's gentler retry).
        embeddings (`bool`, *optional*, defaults to `False`): with `target_modules=None`, the input token table is
            a site too (factorised, [`~hf_rmtkd.layers.LowRankEmbedding`]).
        convolutions (`str`, *optional*, defaults to `"channels"`): how a CNN's block convolutions are reduced:
            `"channels"` narrows each block's inner channels, `"factorize"` factorises every block convolution
            ([`~hf_rmtkd.layers.LowRankConv2d`]); also decides what a named convolution in `target_modules` is.
    """

    target_modules: str | list[str] | None = None
    hidden_steps_left: int = 0
    hidden_width: int | None = None
    ffn_method: str = "select"
    relaxation: float = 0.0
    embeddings: bool = False
    convolutions: str = "channels"

    @property
    def kinds(self) -> tuple[str, ...]:
        """Site kinds selected when `target_modules` is `None`."""
        return site_kinds(self.embeddings, self.convolutions)

    def __post_init__(self) -> None:
        site_kinds(self.embeddings, self.convolutions)  # raises `ValueError` for a bad `convolutions`
        if not isinstance(self.hidden_steps_left, int) or self.hidden_steps_left < 0:
            raise ValueError(f"`hidden_steps_left` must be an int >= 0, got {self.hidden_steps_left!r}.")
        if self.ffn_method not in FFN_METHODS:
            raise ValueError(f"`ffn_method` must be one of {FFN_METHODS}, got {self.ffn_method!r}.")
        if not 0.0 <= self.relaxation < 1.0:
            raise ValueError(f"`relaxation` must be in [0, 1), got {self.relaxation!r}.")
        if self.hidden_width is not None and (not self.hidden_steps_left or self.hidden_width < 1):
            raise ValueError(
                f"`hidden_width` ({self.hidden_width!r}) needs `hidden_steps_left` >= 1 and must be a positive int."
            )


@dataclass
class ReductionResult:
    """What one reduction did.

    Attributes:
        report: the spectral analysis of every site analysed (the hidden width under `"hidden_size"`).
        records: the new records, by site (`"hidden_size"` for the hidden width); sites the MP rule kept whole
            have none.
        fingerprint: sha256 of the calibration batches; n_tokens: calibration tokens (or positions) seen.
        params_before, params_after: the model's parameter count; seconds: wall time.
    """

    report: SpectralReport
    records: dict[str, ReductionRecord] = field(default_factory=dict)
    fingerprint: str = ""
    n_tokens: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the log: sites, parameters before and after, seconds."""
        share = 1 - self.params_after / self.params_before if self.params_before else 0.0
        return (
            f"RMT-KD reduction: {len(self.records)} of {len(self.report)} sites reduced, parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({share:.1%} fewer), {self.seconds:.1f} s"
        )


def _shows_progress(progress: bool) -> bool:
    """A bar only where asked, and on the main process only."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return bool(progress) and (not distributed or torch.distributed.get_rank() == 0)


def _site_error(name: str, error: Exception) -> Exception:
    cls = TypeError if isinstance(error, TypeError) else ValueError
    return cls(f"Reducing site {name!r} failed, so nothing was reduced (the model is as it was): {error}")


def _put_back(inner: nn.Module, replaced: list[tuple[str, nn.Module]]) -> None:
    for path, module in reversed(replaced):
        parent_path, _, child = path.rpartition(".")
        setattr(inner.get_submodule(parent_path) if parent_path else inner, child, module)


def apply_report(
    model,
    report: SpectralReport,
    ffn_method: str = "select",
    names: Iterable[str] | None = None,
    replaced: list[tuple[str, nn.Module]] | None = None,
) -> dict[str, ModuleRecord]:
    """Reduce the sites of `report` (or only `names`) in an RMTKD `model` and add their records to its config.

    All or nothing: surgery replaces modules (it never writes into existing ones), so if any site fails, the modules
    replaced before it are put back and the config is left as it was. Calibration provenance and spectra are the
    pipeline's to record ([`reduce_model`]).

    Args:
        replaced (`list`, *optional*): receives `(path, module before)` of every replaced module, so a caller can
            undo the reduction after this call returns.

    Returns:
        The new records, keyed by module path.

    Raises:
        `ValueError` (or `TypeError`) naming the site whose surgery failed; the model is then unchanged.
    """
    records: dict[str, ModuleRecord] = {}
    inner = model.model
    undo: list[tuple[str, nn.Module]] = []
    try:
        for name in names or list(report):
            site = report[name]
            try:
                undo.extend((path, inner.get_submodule(path)) for path in (name, *site.producers))
                record = reduce_site(inner, site, report.options.centered, ffn_method)
            except Exception as error:
                raise _site_error(name, error) from error
            if record is None:
                continue
            options = {key: getattr(report.options, key) for key in OPTION_KEYS}
            record = dataclasses.replace(record, **options)
            previous = model.config.reduced_modules.get(name)
            if previous is not None:
                # A second reduction of the same site: shapes stay relative to the original module.
                record = dataclasses.replace(
                    record, in_features=previous.in_features, out_features=previous.out_features
                )
            records[name] = record
    except BaseException:
        _put_back(inner, undo)
        raise
    model.config.reduced_modules.update(records)
    if replaced is not None:
        replaced.extend(undo)
    return records


def _spectrum(site: SiteReport) -> SiteReport:
    # What the card's plots need, not the (d, d) eigenvectors and sums.
    return dataclasses.replace(site, eigenvectors=torch.empty(0), statistics=None)


def reduce_model(
    model, calibration_data: Iterable, options: SpectralOptions, plan: ReductionPlan, progress: bool = True
) -> ReductionResult:
    """Run one reduction of an RMTKD `model` in place (its `model.model` may be replaced by a rebuilt one).

    Calibration: one pass for the hidden width (two for post-LN encoders, whose norms are fitted), then one pass for
    all the other sites of the plan together (their statistics are of the narrower model, so they cannot share the
    first pass). The calibration provenance (fingerprint, tokens, options) and every analysed site's spectrum are
    recorded, including the hidden width's.

    Raises:
        `ValueError` / `TypeError` naming what failed; the model, its records, kept bases and spectra are then as
        they were.
    """
    began = time.perf_counter()
    config = model.config
    saved = (model.model, dict(config.reduced_modules), config.hidden_width, dict(config.calibration))
    saved_maps, saved_spectra = list(stream_maps(model)), dict(model.__dict__.get("rmtkd_spectra", {}))
    replaced: list[tuple[str, nn.Module]] = []
    # One bar for the whole reduction (every calibration pass advances it by tokens), never one per pass.
    bar = tqdm(desc="RMT-KD reduction", unit="tok", disable=not _shows_progress(progress), leave=False)
    params_before = model.num_parameters()
    sites: dict[str, SiteReport] = {}
    result = ReductionResult(SpectralReport({}, options, ""), params_before=params_before)
    try:
        if plan.hidden_steps_left:
            if config.reduced_modules:
                raise ValueError(
                    "The hidden width must be reduced before any other site (their recorded shapes depend on it); "
                    f"this model already has {len(config.reduced_modules)} reduced modules."
                )
            if iter(calibration_data) is calibration_data:
                calibration_data = list(calibration_data)  # a one-shot iterator; iterated more than once below
            bar.set_description("RMT-KD reduction: hidden width")
            step = plan_hidden(
                model.model,
                config.hidden_width,
                calibration_data,
                options,
                bar,
                plan.hidden_steps_left,
                plan.relaxation,
                plan.hidden_width,
            )
            sites[HIDDEN_SITE] = step.report
            result.fingerprint, result.n_tokens = step.fingerprint, step.report.n_samples
            if step.model is not None:
                model.model, config.hidden_width = step.model, step.record
                add_stream_map(model, step.stream_map)
                result.records[HIDDEN_SITE] = step.record
        chosen = select_sites(model.model, plan.target_modules, plan.kinds)
        if chosen:
            bar.set_description(f"RMT-KD reduction: {len(chosen)} sites")
            analysed = analyze_sites(
                model.model, calibration_data, chosen, options, bar, plan.ffn_method, keep_vectors=False
            )
            report = relax_report(analysed, plan.relaxation)
            result.records.update(apply_report(model, report, plan.ffn_method, replaced=replaced))
            sites.update(report)
            result.fingerprint = result.fingerprint or report.fingerprint
            result.n_tokens = max([result.n_tokens, *(site.n_samples for site in report.values())])
        if sites:
            config.record_calibration(result.fingerprint, result.n_tokens, dataclasses.asdict(options))
            model.__dict__.setdefault("rmtkd_spectra", {}).update({n: _spectrum(s) for n, s in sites.items()})
    except BaseException:
        _put_back(model.model, replaced)
        model.model, config.hidden_width = saved[0], saved[2]
        config.reduced_modules, config.calibration = saved[1], saved[3]
        model.__dict__["rmtkd_stream_maps"] = saved_maps
        model.__dict__["rmtkd_spectra"] = saved_spectra
        raise
    finally:
        bar.close()
    result.report = SpectralReport(sites, options, result.fingerprint)
    result.params_after = model.num_parameters()
    result.seconds = time.perf_counter() - began
    logger.info(result.summary())
    return result


def reduce_hidden(
    model,
    calibration_data: Iterable,
    options: SpectralOptions,
    progress: bool = True,
    steps_left: int = 1,
    relaxation: float = 0.0,
    width: int | None = None,
) -> SiteReport:
    """Reduce only the hidden width of an RMTKD `model` (see [`reduce_model`] and [`hf_rmtkd.hidden.plan_hidden`]).

    Returns:
        The hidden width's [`SiteReport`]; its `rank` is the new width (`dim` when nothing was dropped).
    """
    plan = ReductionPlan(target_modules=[], hidden_steps_left=steps_left, hidden_width=width, relaxation=relaxation)
    return reduce_model(model, calibration_data, options, plan, progress).report[HIDDEN_SITE]
