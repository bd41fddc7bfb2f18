"""Marchenko–Pastur law, noise-variance estimators and rank selection (pure tensor math, float64)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


# Upper quantiles of the Tracy–Widom distribution for beta = 1 (real data), keyed by the false-alarm
# probability alpha = P(TW1 > s). Published table (Tracy & Widom 1996; Bejan 2005); a simulation of the
# Dumitriu–Edelman tridiagonal model (n = 2000, 20k draws) reproduces them to within the known O(n^-1/3) bias.
TRACY_WIDOM_1_QUANTILES = {0.1: 0.4501, 0.05: 0.9793, 0.025: 1.4538, 0.01: 2.0234, 0.005: 2.4224, 0.001: 3.2724}


def mp_edges(sigma2: float, q: float) -> tuple[float, float]:
    """Edges of the Marchenko–Pastur bulk, `lambda_± = sigma2 (1 ± sqrt(q))^2`.

    Args:
        sigma2 (`float`): noise variance per coordinate.
        q (`float`): aspect ratio `d / n` (features over samples); any `q > 0`. For `q > 1` the bulk holds the
            `n` non-zero eigenvalues and the other `d - n` are exactly zero.

    Returns:
        `(lambda_minus, lambda_plus)` in the units of the eigenvalues (variance).
    """
    if q <= 0:
        raise ValueError(f"`q` must be > 0, got {q}.")
    root = math.sqrt(q)
    return sigma2 * (1.0 - root) ** 2, sigma2 * (1.0 + root) ** 2


def mp_density(x: torch.Tensor, sigma2: float, q: float) -> torch.Tensor:
    """Density of the MP law over the `d` eigenvalues of a `d x d` sample covariance.

    `rho(x) = sqrt((lambda_+ - x)(x - lambda_-)) / (2 pi q sigma2 x)` on `[lambda_-, lambda_+]`, zero elsewhere. It
    integrates to `min(1, 1/q)`: for `q > 1` the missing mass `1 - 1/q` is the atom at zero (not represented here).

    Args:
        x (`torch.Tensor` of any shape): eigenvalue positions.
        sigma2 (`float`): noise variance.
        q (`float`): aspect ratio `d / n`.

    Returns:
        `torch.Tensor` of the same shape as `x`, float64.
    """
    lo, hi = mp_edges(sigma2, q)
    x = x.to(torch.float64)
    inside = (x > lo) & (x < hi)
    safe = torch.where(inside, x, torch.full_like(x, (lo + hi) / 2))
    dens = torch.sqrt((hi - safe) * (safe - lo)) / (2 * math.pi * q * sigma2 * safe)
    return torch.where(inside, dens, torch.zeros_like(x))


def _unit_bulk_cdf(q: float, grid: int = 4097) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid `x` and CDF of the non-zero part of the MP law with `sigma2 = 1`, normalised to 1 (float64)."""
    if q > 1:
        # The non-zero part of MP(q > 1) is q * MP(1/q): same edges, better-conditioned quadrature.
        x, cdf = _unit_bulk_cdf(1 / q, grid)
        return q * x, cdf
    lo, hi = mp_edges(1.0, q)
    # A cosine grid absorbs the square-root edges, and the 1/x pole at q = 1, without special quadrature.
    theta = torch.linspace(0.0, math.pi, grid, dtype=torch.float64)
    x = lo + (hi - lo) * (1 - torch.cos(theta)) / 2
    f = mp_density(x, 1.0, q) * (hi - lo) * torch.sin(theta) / 2
    cdf = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumsum((f[1:] + f[:-1]) / 2 * (theta[1] - theta[0]), 0)]
    )
    return x, cdf / cdf[-1]


def _bulk_quantile_function(q: float, probs: torch.Tensor) -> torch.Tensor:
    """Quantiles of the non-zero part of the MP law with `sigma2 = 1` at probabilities `probs`."""
    x, cdf = _unit_bulk_cdf(q)
    idx = torch.searchsorted(cdf, probs.clamp(0, 1)).clamp(1, x.numel() - 1)
    c0, c1 = cdf[idx - 1], cdf[idx]
    w = torch.where(c1 > c0, (probs - c0) / (c1 - c0), torch.zeros_like(probs))
    return x[idx - 1] + w * (x[idx] - x[idx - 1])


def _bulk_cdf(points: torch.Tensor, sigma2: float, q: float, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """CDF of the non-zero part of MP(sigma2, q) at `points`, from the unit table of `_unit_bulk_cdf(q)`."""
    x, cdf = table
    u = (points / sigma2).clamp(float(x[0]), float(x[-1]))
    idx = torch.searchsorted(x, u).clamp(1, x.numel() - 1)
    x0, x1 = x[idx - 1], x[idx]
    w = torch.where(x1 > x0, (u - x0) / (x1 - x0), torch.ones_like(u))
    return cdf[idx - 1] + w * (cdf[idx] - cdf[idx - 1])


def _nonzero_eigenvalues(eigenvalues: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Sorted ascending eigenvalues, dropping the `d - n` structural zeros when `d > n`."""
    eig = torch.sort(eigenvalues.to(torch.float64).clamp_min(0)).values
    d = eig.numel()
    if n_samples < d:
        eig = eig[d - n_samples :]
    return eig


def estimate_sigma2_quantile(eigenvalues: torch.Tensor, n_samples: int, tau: float = 0.5) -> float:
    """The paper's initial estimate: the `tau` quantile of the (non-zero) eigenvalues.

    Args:
        eigenvalues (`torch.Tensor` of shape `(d,)`): sample-covariance eigenvalues.
        n_samples (`int`): number of samples `n` behind the covariance.
        tau (`float`, *optional*, defaults to 0.5): quantile in (0, 1); 0.5 is the median.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"`tau` must be in (0, 1), got {tau}.")
    return float(torch.quantile(_nonzero_eigenvalues(eigenvalues, n_samples), tau))


def estimate_sigma2_mp_fit(
    eigenvalues: torch.Tensor, n_samples: int, tau: float = 0.5, iterations: int = 5, grid: int = 400
) -> float:
    """The paper's estimator: start at the `tau` quantile, then fit the MP density to the eigenvalue histogram.

    The fit minimises the L2 distance between the histogram density and `rho_MP(.; sigma2, q)` over `sigma2` in
    `[0.1, 10] x sigma0^2` (a log grid of `grid` points, then golden-section refinement). The histogram covers
    `[0, 1.5 lambda_+(sigma2)]` of the current estimate, so a few large spikes neither stretch the bins nor enter
    the fit; it is rebuilt around each new estimate until `sigma2` moves by less than 0.1%. Bins follow the
    Freedman–Diaconis rule, clipped to [16, 200], so the result is deterministic.

    Args:
        eigenvalues (`torch.Tensor` of shape `(d,)`): sample-covariance eigenvalues.
        n_samples (`int`): number of samples `n`.
        tau (`float`, *optional*, defaults to 0.5): quantile for the starting point.

    Returns:
        `float`: the fitted noise variance.
    """
    d = eigenvalues.numel()
    q = d / n_samples
    eig = _nonzero_eigenvalues(eigenvalues, n_samples)
    sigma0 = estimate_sigma2_quantile(eigenvalues, n_samples, tau)
    if sigma0 <= 0:
        return 0.0
    table = _unit_bulk_cdf(q)
    sigma2 = sigma0
    for _ in range(iterations):
        upper = 1.5 * mp_edges(sigma2, q)[1]
        inside = eig[eig <= upper]
        if inside.numel() < 4:
            break
        iqr = float(torch.quantile(inside, 0.75) - torch.quantile(inside, 0.25))
        width = 2 * iqr / inside.numel() ** (1 / 3) if iqr > 0 else upper / 16
        bins = int(min(200, max(16, math.ceil(upper / width))))
        edges = torch.linspace(0.0, upper, bins + 1, dtype=torch.float64)
        empirical = torch.histc(inside, bins=bins, min=0.0, max=upper) / eig.numel()

        # Bin masses rather than densities at bin centres: the MP density is singular at its edges (and at 0
        # when q = 1), where centre values are badly biased.
        def loss(s2: float) -> float:
            return float(((empirical - torch.diff(_bulk_cdf(edges, s2, q, table))) ** 2).sum())

        candidates = torch.logspace(math.log10(0.1 * sigma0), math.log10(10 * sigma0), grid, dtype=torch.float64)
        losses = [loss(float(c)) for c in candidates]
        best = min(range(grid), key=losses.__getitem__)
        a, b = float(candidates[max(best - 1, 0)]), float(candidates[min(best + 1, grid - 1)])
        new = _golden_section(loss, a, b)
        converged = abs(new - sigma2) <= 1e-3 * sigma2
        sigma2 = new
        if converged:
            break
    if not 0.101 * sigma0 < sigma2 < 9.9 * sigma0:
        # Heavy-tailed spectra (real activations) push the fit to the edge of its range: the bound, not the data,
        # then sets sigma2 and the rank.
        warnings.warn(
            f"The MP histogram fit stopped at the edge of its search range (sigma2 = {sigma2 / sigma0:.3g} x the "
            f"tau-quantile {sigma0:.4g}): the spectrum does not look like an MP bulk, and the rank follows the bound. "
            "Consider estimator='bema'.",
            stacklevel=2,
        )
    return sigma2


def _golden_section(fn, a: float, b: float, iterations: int = 40) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return (a + b) / 2


def estimate_sigma2_bema(eigenvalues: torch.Tensor, n_samples: int, bulk_fraction: float = 0.2) -> float:
    """Bulk eigenvalue matching (BEMA; Ke, Ma & Lin, 2021): no `tau` needed.

    The non-zero eigenvalues whose ranks lie in `[bulk_fraction, 1 - bulk_fraction]` are matched by least squares
    to the quantiles of the MP law with unit variance; the slope is `sigma2`. Spikes sit above the upper cut and
    never enter the fit.

    Args:
        eigenvalues (`torch.Tensor` of shape `(d,)`): sample-covariance eigenvalues.
        n_samples (`int`): number of samples `n`.
        bulk_fraction (`float`, *optional*, defaults to 0.2): fraction trimmed from each end, in (0, 0.5).
    """
    if not 0.0 < bulk_fraction < 0.5:
        raise ValueError(f"`bulk_fraction` must be in (0, 0.5), got {bulk_fraction}.")
    d = eigenvalues.numel()
    q = d / n_samples
    eig = _nonzero_eigenvalues(eigenvalues, n_samples)
    m = eig.numel()
    probs = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    keep = (probs >= bulk_fraction) & (probs <= 1 - bulk_fraction)
    theory = _bulk_quantile_function(q, probs[keep])
    observed = eig[keep]
    denom = float((theory * theory).sum())
    return float((theory * observed).sum()) / denom if denom > 0 else 0.0


def tracy_widom_margin(sigma2: float, d: int, n_samples: int, false_alarm: float = 0.001) -> float:
    """Finite-sample margin above `lambda_+` for the largest noise eigenvalue (Johnstone, 2001).

    The largest eigenvalue of a white Wishart covariance fluctuates as
    `lambda_max ~ lambda_+ + sigma2 * s_n * TW1`, with `s_n = (sqrt(n) + sqrt(d)) (1/sqrt(n) + 1/sqrt(d))^(1/3) / n`.
    Returns `sigma2 * s_n * TW1_quantile(1 - false_alarm)`, so that a pure-noise spectrum has probability about
    `false_alarm` of putting any eigenvalue above `lambda_+ + margin`.

    Args:
        false_alarm (`float`, *optional*, defaults to 0.001): one of `TRACY_WIDOM_1_QUANTILES`.
    """
    if false_alarm not in TRACY_WIDOM_1_QUANTILES:
        raise ValueError(f"`false_alarm` must be one of {sorted(TRACY_WIDOM_1_QUANTILES)}, got {false_alarm}.")
    scale = (math.sqrt(n_samples) + math.sqrt(d)) * (1 / math.sqrt(n_samples) + 1 / math.sqrt(d)) ** (1 / 3)
    return sigma2 * scale / n_samples * TRACY_WIDOM_1_QUANTILES[false_alarm]


@dataclass
class MPFit:
    """Outcome of the MP rule on one spectrum.

    Attributes:
        rank (`int`): eigenvalues above `threshold` (before any minimum-rank floor).
        sigma2 (`float`): estimated noise variance.
        lambda_plus (`float`): MP bulk edge for `sigma2` and `q`.
        threshold (`float`): `lambda_plus` plus the Tracy–Widom margin; eigenvalues above it are signal.
        q (`float`): aspect ratio `d / n`.
    """

    rank: int
    sigma2: float
    lambda_plus: float
    threshold: float
    q: float


# Noise-variance estimators by name: `(eigenvalues, n_samples, **knobs) -> sigma2`; each takes the knobs it uses
# (`tau`, `bulk_fraction`) from the options and ignores the others.
ESTIMATORS: dict[str, Callable[..., float]] = {
    "bema": lambda eigenvalues, n, bulk_fraction=0.2, **_: estimate_sigma2_bema(eigenvalues, n, bulk_fraction),
    "mp_fit": lambda eigenvalues, n, tau=0.5, **_: estimate_sigma2_mp_fit(eigenvalues, n, tau),
    "quantile": lambda eigenvalues, n, tau=0.5, **_: estimate_sigma2_quantile(eigenvalues, n, tau),
}


def register_estimator(name: str, estimator: Callable[..., float]) -> None:
    """Add a noise-variance estimator `(eigenvalues, n_samples, **knobs) -> sigma2` under `name`, usable as
    `estimator=name` everywhere (`analyze`, `compress`, `reduction_estimator`)."""
    ESTIMATORS[name] = estimator


def fit_spectrum(
    eigenvalues: torch.Tensor,
    n_samples: int,
    estimator: str = "bema",
    tau: float = 0.5,
    false_alarm: float = 0.001,
    bulk_fraction: float = 0.2,
) -> MPFit:
    """Estimate the noise variance and count the eigenvalues that rise above the MP bulk.

    Args:
        eigenvalues (`torch.Tensor` of shape `(d,)`): eigenvalues of a `d x d` sample covariance (any order).
        n_samples (`int`): samples `n` behind it (tokens for transformers, positions for CNNs).
        estimator (`str`, *optional*, defaults to `"bema"`): a key of [`ESTIMATORS`]: `"bema"` (trims
            `bulk_fraction` from each end), `"mp_fit"` (the paper's: `tau` quantile then histogram fit) or
            `"quantile"` (the `tau` quantile alone), or one added with [`register_estimator`].
        tau (`float`, *optional*, defaults to 0.5): quantile for `"mp_fit"` and `"quantile"`.
        bulk_fraction (`float`, *optional*, defaults to 0.2): trimmed share of each end for `"bema"`.
        false_alarm (`float`, *optional*, defaults to 0.001): probability that pure noise yields rank >= 1.

    Returns:
        [`MPFit`].
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {tuple(ESTIMATORS)}, got {estimator!r}.")
    if n_samples < 2:
        raise ValueError(f"`n_samples` must be >= 2, got {n_samples}.")
    d = eigenvalues.numel()
    q = d / n_samples
    sigma2 = ESTIMATORS[estimator](eigenvalues, n_samples, tau=tau, bulk_fraction=bulk_fraction)
    lambda_plus = mp_edges(sigma2, q)[1]
    threshold = lambda_plus + tracy_widom_margin(sigma2, d, n_samples, false_alarm)
    rank = int((eigenvalues.to(torch.float64) > threshold).sum())
    return MPFit(rank=rank, sigma2=sigma2, lambda_plus=lambda_plus, threshold=threshold, q=q)
