"""Spectral analysis without change: per-site MP fit of the activation covariance, as a report."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .calibration import ActivationStatistics, collect_statistics
from .mp_law import ESTIMATORS, TRACY_WIDOM_1_QUANTILES, fit_spectrum
from .sites import SITE_KINDS, Site, select_sites, site_kinds


@dataclass
class SpectralOptions:
    """Options of the MP analysis, shared by `analyze`, `compress` and the trainer.

    Args:
        estimator (`str`, *optional*, defaults to `"bema"`): noise-variance estimator: `"bema"` (bulk eigenvalue
            matching, no knob), `"mp_fit"` (the paper's: `tau` quantile refined by an MP histogram fit) or
            `"quantile"` (the `tau` quantile alone).
        tau (`float`, *optional*, defaults to 0.5): quantile for `"mp_fit"` and `"quantile"`, in (0, 1).
        bulk_fraction (`float`, *optional*, defaults to 0.2): share trimmed from each end of the spectrum by
            `"bema"`, in (0, 0.5).
        false_alarm (`float`, *optional*, defaults to 0.001): Tracy–Widom false-alarm level of the rank rule.
        centered (`bool`, *optional*, defaults to `True`): subtract the mean; `False` is the paper's uncentred
            covariance (the mean then shows up as a spurious spike).
        max_samples (`int`, *optional*, defaults to 200000): cap on tokens (samples) per site; `None` for no cap.
        min_rank (`int`, *optional*, defaults to 1): floor on the retained rank of any site.
        min_rank_ratio (`float`, *optional*, defaults to 0.0): floor `ceil(min_rank_ratio * d)` on the retained rank,
            in [0, 1) (the trainer's stop rule `rho_min`).
        rank_multiple (`int`, *optional*, defaults to 1): round every retained rank up to a multiple of this (capped
            at the width): 8 or 16 lets GPU and oneDNN kernels use their fast tiled paths.
        seed (`int`, *optional*): recorded in the checkpoint's provenance.
        max_output_error (`float`, *optional*): per-site output-error budget in (0, 1): keep the smallest rank that
            is at least the MP rank and keeps the site's relative output error within it (see
            [`hf_rmtkd.output_error`]); `None` (default) keeps the paper's rule.
    """

    estimator: str = "bema"
    tau: float = 0.5
    bulk_fraction: float = 0.2
    false_alarm: float = 0.001
    centered: bool = True
    max_samples: int | None = 200_000
    min_rank: int = 1
    min_rank_ratio: float = 0.0
    rank_multiple: int = 1
    seed: int | None = None
    max_output_error: float | None = None

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {tuple(ESTIMATORS)}, got {self.estimator!r}.")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"`tau` must be in (0, 1), got {self.tau}.")
        if not 0.0 < self.bulk_fraction < 0.5:
            raise ValueError(f"`bulk_fraction` must be in (0, 0.5), got {self.bulk_fraction}.")
        if self.false_alarm not in TRACY_WIDOM_1_QUANTILES:
            raise ValueError(
                f"`false_alarm` must be one of {sorted(TRACY_WIDOM_1_QUANTILES)}, got {self.false_alarm}."
            )
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"`max_samples` must be >= 2 or None, got {self.max_samples}.")
        if self.min_rank < 1:
            raise ValueError(f"`min_rank` must be >= 1, got {self.min_rank}.")
        if not 0.0 <= self.min_rank_ratio < 1.0:
            raise ValueError(f"`min_rank_ratio` must be in [0, 1), got {self.min_rank_ratio}.")
        if self.rank_multiple < 1:
            raise ValueError(f"`rank_multiple` must be >= 1, got {self.rank_multiple}.")
        if self.max_output_error is not None and not 0.0 < self.max_output_error < 1.0:
            raise ValueError(f"`max_output_error` must be in (0, 1) or None, got {self.max_output_error}.")


@dataclass
class SiteReport:
    """MP analysis of one site.

    Attributes:
        name, kind, producers: the [`~hf_rmtkd.sites.Site`].
        dim (`int`): width `d` of the analysed activation.
        n_samples (`int`): samples `n` (tokens or positions).
        rank (`int`): retained rank `k` (at least `min_rank`).
        signal_rank (`int`): eigenvalues above the threshold, before the `min_rank` floor.
        sigma2, lambda_plus, threshold, q (`float`): the MP fit.
        eigenvalues (`torch.Tensor` of shape `(d,)`): covariance eigenvalues, descending, float64.
        retained_variance (`float`): fraction of the total variance in the top `rank` eigen-directions.
        statistics: the raw sums, kept for surgery (not serialised).
        mp_rank, budget_rank (`int`, *optional*): with an output-error budget, the MP rule's rank and the smallest
            rank within the budget (`rank` is the larger, rounded); output_error (`float`, *optional*): the relative
            output error at `rank`.
    """

    name: str
    kind: str
    dim: int
    n_samples: int
    rank: int
    signal_rank: int
    sigma2: float
    lambda_plus: float
    threshold: float
    q: float
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor = field(repr=False)
    retained_variance: float = 0.0
    producers: list[str] = field(default_factory=list)
    statistics: ActivationStatistics | None = field(default=None, repr=False)
    mp_rank: int | None = None
    budget_rank: int | None = None
    output_error: float | None = None

    def summary(self) -> dict:
        """Scalar fields only: one row of the report table."""
        return {
            "module": self.name,
            "kind": self.kind,
            "dim": self.dim,
            "rank": self.rank,
            "rank_fraction": self.rank / self.dim,
            "n_samples": self.n_samples,
            "q": self.q,
            "sigma2": self.sigma2,
            "lambda_plus": self.lambda_plus,
            "threshold": self.threshold,
            "retained_variance": self.retained_variance,
            "mp_rank": self.mp_rank,
            "budget_rank": self.budget_rank,
            "output_error": self.output_error,
        }


class SpectralReport(Mapping):
    """Mapping from module path to [`SiteReport`], with table and plot helpers.

    Attributes:
        options ([`SpectralOptions`]): the options used.
        fingerprint (`str`): sha256 of the calibration batches.
    """

    def __init__(self, sites: dict[str, SiteReport], options: SpectralOptions, fingerprint: str):
        self._sites = sites
        self.options = options
        self.fingerprint = fingerprint

    def __getitem__(self, name: str) -> SiteReport:
        return self._sites[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def to_dict(self) -> dict[str, dict]:
        """`{module: summary}` of scalar fields."""
        return {name: site.summary() for name, site in self._sites.items()}

    def to_pandas(self):
        """The report as a `pandas.DataFrame`, one row per site."""
        import pandas as pd

        return pd.DataFrame([site.summary() for site in self._sites.values()])

    def plot(self, output_dir: str | Path, names: Iterable[str] | None = None) -> list[Path]:
        """Write one spectrum PNG per site (histogram, fitted MP density, `lambda_+`); returns the paths."""
        from .plotting import plot_spectrum

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [plot_spectrum(self._sites[n], out) for n in (names or self._sites)]


def round_rank(rank: int, dim: int, multiple: int = 1) -> int:
    """`rank` rounded up to a multiple of `multiple`, at most `dim`."""
    return min(dim, -(-rank // multiple) * multiple)


def _same_input(a: ActivationStatistics, b: ActivationStatistics) -> bool:
    return (
        a.count == b.count and a.dim == b.dim and torch.equal(a.sum, b.sum) and torch.equal(a.sum_outer, b.sum_outer)
    )


def analyze_statistics(
    site: Site,
    stats: ActivationStatistics,
    options: SpectralOptions,
    decompositions: list | None = None,
    vectors: bool = True,
) -> SiteReport:
    """Eigendecompose one site's covariance and apply the MP rule.

    `decompositions`, a list shared across calls, reuses the eigendecomposition of sites with the very same input
    statistics (Q, K and V; gate and up): one `eigh` per distinct input instead of one per site. With `vectors=False`
    only the eigenvalues are computed (`eigvalsh`, about 3x cheaper at width 1536) and `eigenvectors` is empty: for a
    site whose surgery and budget need none (an FFN reduced by selection).
    """
    cov = stats.covariance(options.centered)
    n = stats.count - 1 if options.centered else stats.count
    if n < 2:
        raise ValueError(f"Module {site.name!r} saw {stats.count} calibration samples; at least 3 are needed.")
    if not torch.isfinite(cov).all():
        raise ValueError(
            f"Module {site.name!r}: the activation covariance is not finite (its float64 sums overflowed, or the "
            "statistics hold NaN): check the model's weights and inputs at that module before calibrating."
        )
    if n < stats.dim:
        warnings.warn(
            f"Module {site.name!r}: {stats.count} calibration samples for width {stats.dim} (q = {stats.dim / n:.2f} > 1); "
            "the rank estimate is valid but noisy. Use more calibration data.",
            stacklevel=3,
        )
    known = decompositions if decompositions is not None else []
    found = next((pair for seen, pair in reversed(known[-8:]) if _same_input(seen, stats)), None)
    if found is None and not vectors:
        found = torch.linalg.eigvalsh(cov), torch.empty(0, 0, dtype=cov.dtype)
    elif found is None:
        found = torch.linalg.eigh(cov)
        known.append((stats, found))
    eigenvalues, eigenvectors = found
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    fit = fit_spectrum(eigenvalues, n, options.estimator, options.tau, options.false_alarm, options.bulk_fraction)
    floor = max(options.min_rank, math.ceil(options.min_rank_ratio * stats.dim))
    rank = round_rank(max(fit.rank, floor), stats.dim, options.rank_multiple)
    if float(eigenvalues[0]) == 0.0:
        # A dead layer (constant input, e.g. zeroed weights): no signal at all; keep the floor, the surgery
        # compensates nothing, and the output is unchanged.
        warnings.warn(
            f"Module {site.name!r}: its input is constant on the calibration data (zero covariance: a dead layer); "
            f"keeping the minimum rank {rank}.",
            stacklevel=3,
        )
    elif fit.rank < options.min_rank:
        warnings.warn(
            f"Module {site.name!r}: no eigenvalue rises above the MP edge (sigma2={fit.sigma2:.4g}, "
            f"lambda_plus={fit.lambda_plus:.4g}); keeping the minimum rank {rank}.",
            stacklevel=3,
        )
    total = float(eigenvalues.sum())
    return SiteReport(
        name=site.name,
        kind=site.kind,
        dim=stats.dim,
        n_samples=stats.count,
        rank=rank,
        signal_rank=fit.rank,
        sigma2=fit.sigma2,
        lambda_plus=fit.lambda_plus,
        threshold=fit.threshold,
        q=fit.q,
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        retained_variance=float(eigenvalues[:rank].sum()) / total if total > 0 else 1.0,
        producers=list(site.producers),
        statistics=stats,
    )


def analyze_sites(
    model: nn.Module,
    calibration_data: Iterable,
    sites: list[Site],
    options: SpectralOptions,
    progress: bool = True,
    ffn_method: str = "select",
    keep_vectors: bool = True,
) -> SpectralReport:
    """Collect statistics for `sites` in one pass over the data and analyse each (with `options.max_output_error`,
    the ranks meet that budget for the FFN surgery `ffn_method`). `keep_vectors=False` skips the eigenvectors of FFN
    sites reduced by selection (the reduction pipeline, which never reads them)."""
    from .output_error import apply_output_budget

    outputs = [s.name for s in sites if SITE_KINDS[s.kind].reads_output]
    stats, fingerprint = collect_statistics(
        model, calibration_data, [s.name for s in sites], options.max_samples, progress, outputs
    )
    decompositions: list = []
    # compress and the trainer select FFN units from the covariance: their eigenvectors would never be read.
    lean = {s.name for s in sites if s.kind == "ffn" and ffn_method == "select" and not keep_vectors}
    report = SpectralReport(
        {s.name: analyze_statistics(s, stats[s.name], options, decompositions, s.name not in lean) for s in sites},
        options,
        fingerprint,
    )
    return apply_output_budget(model, report, ffn_method)


def _merged_copy_of_peft(model: nn.Module) -> nn.Module:
    """A `peft.PeftModel` as `compress` sees it: a merged copy (so the sites are the base model's, not LoRA's
    internals, and the model passed in keeps its adapters); any other model is returned as is."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    if not isinstance(model, PeftModel):
        return model
    # merge_and_unload works in place: merge a copy (this costs one model's memory while the analysis runs).
    return copy.deepcopy(model).merge_and_unload()


def analyze(
    model: nn.Module,
    calibration_data: Iterable,
    target_modules: str | list[str] | None = None,
    progress: bool = True,
    convolutions: str = "channels",
    **options,
) -> SpectralReport:
    """Analyse the activation spectra of a model's reducible sites, without changing the model.

    Args:
        model (`nn.Module`): a Hugging Face model, an RMTKD model, or any torch module. A `peft.PeftModel` is
            analysed as `compress` reduces it, merged (on a copy; the model passed in keeps its adapters).
        calibration_data (`Iterable`): batches: dicts of tensors (`model(**batch)`) or tensors (`model(batch)`).
        target_modules (`str` or `list[str]`, *optional*): regex or list of name suffixes, as peft's
            `target_modules`; by default every reducible site (FFN inner widths and the linear layers of the blocks).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
        convolutions (`str`, *optional*, defaults to `"channels"`): `"factorize"` analyses every block convolution
            (or each one `target_modules` names) as a factorisation site, on its output covariance, instead of conv
            blocks' inner channels (see [`hf_rmtkd.compress`]).
        **options: fields of [`SpectralOptions`] (`estimator`, `tau`, `false_alarm`, `centered`, `max_samples`,
            `min_rank`, `seed`).

    Returns:
        [`SpectralReport`]: module path -> [`SiteReport`] with `rank`, `dim`, `n_samples`, `sigma2`, `lambda_plus`,
        `eigenvalues` and `retained_variance`.

    Example:

    ```python
    >>> report = hf_rmtkd.analyze(model, batches, target_modules=["output.dense"])
    >>> report.to_pandas()[["module", "dim", "rank", "sigma2"]]
    >>> report.plot("spectra/")
    ```
    """
    inner = _merged_copy_of_peft(getattr(model, "rmtkd_inner_model", model))
    return analyze_sites(
        inner,
        calibration_data,
        select_sites(inner, target_modules, site_kinds(convolutions=convolutions)),
        SpectralOptions(**options),
        progress,
    )
