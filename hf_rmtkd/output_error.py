"""A per-site output-error budget: keep the smallest rank that is at least the MP rank and keeps the site's relative
output error within `max_output_error`.

The MP edge says which directions are statistically distinguishable from noise, not which ones the output needs;
on heavy-tailed spectra (LLMs) it cuts far deeper than the output tolerates. The error is computed from the
calibration statistics alone (no forward pass), for the surgery that will actually run:

* projection (a factorised linear layer, an FFN with `ffn_method="project"`): keeping the top-`k` eigenvectors `V_k`
  of the input covariance `C = V diag(lambda) V^T`, the output error is `W (I - P) x` with `P = V_k V_k^T`, so
  `e(k) = tr(W (I - P) C (I - P) W^T) / tr(W C W^T) = sum_{j > k} lambda_j |W v_j|^2 / sum_j lambda_j |W v_j|^2`;
* selection (an FFN with `ffn_method="select"`): keeping `k` inner units `S` chosen by pivoted Cholesky and
  reconstructing the others by least squares leaves the Schur complement `C - C[:, S] C[S, S]^-1 C[S, :]`, which is
  `C - L_k L_k^T` for the first `k` pivoted-Cholesky columns `L_k`, so `e(k) = 1 - sum_{j <= k} |W l_j|^2 / tr(W C W^T)`;
* an embedding table (its output is the site's output, `W = I`): the share of the output's energy dropped;
* the hidden width (the residual stream itself, `W = I`): the share of the stream's energy dropped,
  `sum_{j > k} lambda_j / sum_j lambda_j`; for families whose readers see the stream through a norm (RMSNorm
  decoders), the readers' own errors instead ([`reader_errors`]): the stream's energy is dominated by a few outlier
  dimensions that the norms' weights largely switch off, so "energy kept" says little about what the layers read.

`C` is centred when the options are (the surgery then moves the mean into the bias). A convolution's weight
`(out, in, kh, kw)` is read as the `(out * kh * kw, in)` stack of its kernel positions (correlations between
positions are ignored: an approximation). `W` is the weight of the module that reads the reduced width.
"""

from __future__ import annotations

import dataclasses

import torch

from .analysis import SiteReport, SpectralReport, round_rank
from .sites import SITE_KINDS
from .surgery import weight_and_bias


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """`(out, in)`, or a convolution's `(out, in, kh, kw)` as `(out * kh * kw, in)`, in float64."""
    weight = weight.to(torch.float64)
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    return weight


def _first_within(errors: torch.Tensor, budget: float) -> int:
    """Smallest `k >= 1` with `errors[k] <= budget` (`errors` has `d + 1` entries, `errors[d] = 0`)."""
    within = torch.nonzero(errors[1:] <= budget + 1e-12)
    return int(within[0]) + 1 if within.numel() else errors.numel() - 1


def projection_errors(weight: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> torch.Tensor:
    """Relative output error `e(k)` of keeping the top-`k` eigen-directions, for `k = 0..d`; shape `(d + 1,)`.

    Args:
        weight: the reader's weight, `(out, d)` (or a convolution's `(out, d, kh, kw)`).
        eigenvalues (`(d,)`, descending) and eigenvectors (`(d, d)`, columns) of the input covariance.
    """
    energy = eigenvalues.to(torch.float64).clamp_min(0) * (_as_matrix(weight) @ eigenvectors.to(torch.float64)).pow(
        2
    ).sum(0)
    return _tail_errors(energy)


def stream_errors(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Relative error `e(k)` of keeping the top-`k` directions of a stream itself (`W = I`); shape `(d + 1,)`."""
    return _tail_errors(eigenvalues.to(torch.float64).clamp_min(0))


def reader_errors(
    weight: torch.Tensor, norm_weight: torch.Tensor, input_moment: torch.Tensor, eigenvectors: torch.Tensor
) -> torch.Tensor:
    """Relative output error `e(k)` of a module that reads a normalised stream, when the stream keeps its top-`k`
    directions, for `k = 0..d`; shape `(d + 1,)`.

    The reader computes `W (g * u)`, with `u = x / rms(x)` the normalised stream and `g` the norm's weight; slicing
    keeps `P u` (`P = V_k V_k^T`, `V` the stream's eigenvectors). With `S = E[u u^T]` and `A = W diag(g)`,
    `e(k) = tr(A (I - P) S (I - P) A^T) / tr(A S A^T) = sum_{i, j > k} G_ij S'_ij / total`, where `G = (A V)^T A V`
    and `S' = V^T S V`, so every `k` costs one suffix sum. The norm's renormalisation after slicing is ignored, and
    `S` is recovered from the observed input by dividing by `g`: a dimension whose norm weight is exactly 0 is unseen
    and counts as 0.

    Args:
        weight (`(out, d)`): the reader's weight (several readers of one norm stacked along `out`).
        norm_weight (`(d,)`): the norm's weight `g`.
        input_moment (`(d, d)`): `sum (g * u)(g * u)^T` over the calibration tokens (the reader's observed input;
            any positive scale).
        eigenvectors (`(d, d)`, columns, descending eigenvalues): the stream's basis the slice keeps a prefix of.
    """
    g = norm_weight.to(torch.float64)
    safe = torch.where(g.abs() < 1e-12, torch.full_like(g, 1e-12), g)
    moment = input_moment.to(torch.float64) / torch.outer(safe, safe)
    basis = eigenvectors.to(torch.float64)
    rotated = (_as_matrix(weight) * g[None, :]) @ basis
    products = (rotated.T @ rotated) * (basis.T @ moment @ basis)
    suffix = products.flip(0).cumsum(0).flip(0).flip(1).cumsum(1).flip(1).diagonal()
    errors = torch.cat([suffix, torch.zeros(1, dtype=torch.float64)])
    if errors[0] <= 0:
        return torch.zeros_like(errors)
    return (errors / errors[0]).clamp_min(0)


def _tail_errors(energy: torch.Tensor) -> torch.Tensor:
    total = energy.sum()
    if total <= 0:
        return torch.zeros(energy.numel() + 1, dtype=torch.float64)  # nothing reaches the output: any rank is exact
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(energy, 0)])
    return ((total - kept) / total).clamp_min(0)


def selection_errors(weight: torch.Tensor, covariance: torch.Tensor, up_to: int | None = None) -> torch.Tensor:
    """Relative output error `e(k)` of keeping the `k` units pivoted Cholesky picks (the others reconstructed by
    least squares), for `k = 0..up_to` (default `d`); shape `(up_to + 1,)`. The picks are those of
    [`hf_rmtkd.surgery.pivoted_cholesky`], which is greedy, so every `k` shares one order."""
    cov = covariance.to(torch.float64)
    w = _as_matrix(weight)
    d = cov.shape[0]
    up_to = d if up_to is None else up_to
    total = float(torch.einsum("ij,jk,ik->", w, cov, w))
    errors = torch.zeros(up_to + 1, dtype=torch.float64)
    if total <= 0:
        return errors
    errors[0] = 1.0
    diag, factors, explained = cov.diagonal().clone(), torch.zeros(d, up_to, dtype=torch.float64), 0.0
    for j in range(up_to):
        i = int(torch.argmax(diag))
        if diag[i] <= 0:
            break  # what is left is an exact combination of the picks: nothing more to explain
        column = (cov[:, i] - factors[:, :j] @ factors[i, :j]) / diag[i].sqrt()
        factors[:, j] = column
        diag = diag - column**2
        diag[i] = -float("inf")
        explained += float((w @ column).pow(2).sum())
        errors[j + 1] = max(0.0, 1.0 - explained / total)
    return errors


def site_errors(site: SiteReport, module: torch.nn.Module, centered: bool, ffn_method: str) -> torch.Tensor:
    """`e(k)` for `k = 0..dim` of one analysed site, for the surgery that `ffn_method` runs; `module` is the site's
    module (its weight is the reader `W`; a kind that reads its module's output, a token table or a factorised
    convolution, is cut on that output itself, `W = I`)."""
    if SITE_KINDS[site.kind].reads_output:
        return stream_errors(site.eigenvalues)
    weight, _ = weight_and_bias(module)
    if site.kind == "ffn" and ffn_method == "select":
        return selection_errors(weight, site.statistics.covariance(centered))
    return projection_errors(weight, site.eigenvalues, site.eigenvectors)


def budget_site(site: SiteReport, errors: torch.Tensor, budget: float, rank_multiple: int = 1) -> SiteReport:
    """`site` with `rank = max(MP rank, smallest rank within budget)` (rounded up to `rank_multiple`), recording
    `mp_rank`, `budget_rank` and the `output_error` at the kept rank."""
    budget_rank = _first_within(errors, budget)
    rank = round_rank(max(site.rank, budget_rank), site.dim, rank_multiple)
    total = float(site.eigenvalues.sum())
    return dataclasses.replace(
        site,
        rank=rank,
        mp_rank=site.rank,
        budget_rank=budget_rank,
        output_error=float(errors[rank]),
        retained_variance=float(site.eigenvalues[:rank].sum()) / total if total > 0 else 1.0,
    )


def apply_output_budget(model, report: SpectralReport, ffn_method: str = "select") -> SpectralReport:
    """The report with every site's rank raised to meet `report.options.max_output_error` (unchanged when it is
    `None`). `model` holds the sites' modules (the paths of the report)."""
    options = report.options
    if options.max_output_error is None:
        return report
    sites = {}
    for name, site in report.items():
        errors = site_errors(site, model.get_submodule(name), options.centered, ffn_method)
        sites[name] = budget_site(site, errors, options.max_output_error, options.rank_multiple)
    return SpectralReport(sites, options, report.fingerprint)
