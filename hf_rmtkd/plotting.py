"""Spectrum plots: eigenvalue histogram, fitted MP density and the bulk edge, one PNG per site."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .mp_law import mp_density


def plot_filename(name: str) -> str:
    """File name of a site's spectrum plot: the module path with unsafe characters replaced."""
    return "spectrum_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"


def plot_spectrum(site, output_dir: Path) -> Path:
    """Draw one site's spectrum to `output_dir/spectrum_<module>.png` and return the path.

    Args:
        site ([`~hf_rmtkd.analysis.SiteReport`]): the analysed site.
        output_dir (`Path`): existing folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eig = site.eigenvalues.to(torch.float64)
    upper = float(max(2.0 * site.threshold, torch.quantile(eig, 0.98)))
    shown = eig[eig <= upper]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.hist(
        shown.numpy(),
        bins=80,
        range=(0.0, upper),
        density=False,
        weights=[1.0 / (eig.numel() * upper / 80)] * shown.numel(),
        color="#9bb7d4",
        label=f"eigenvalues ({eig.numel() - shown.numel()} beyond the axis)",
    )
    x = torch.linspace(0.0, upper, 600, dtype=torch.float64)
    ax.plot(
        x.numpy(),
        mp_density(x, site.sigma2, site.q).numpy(),
        color="#c0392b",
        label=f"MP fit, sigma2={site.sigma2:.3g}",
    )
    ax.axvline(site.lambda_plus, color="#2c3e50", linestyle="--", label=f"lambda+ = {site.lambda_plus:.3g}")
    ax.axvline(site.threshold, color="#7f8c8d", linestyle=":", label="lambda+ + TW margin")
    ax.set_title(f"{site.name}\nd={site.dim}, n={site.n_samples}, kept k={site.rank}", fontsize=9)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = output_dir / plot_filename(site.name)
    fig.savefig(path)
    plt.close(fig)
    return path
