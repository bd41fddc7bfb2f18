"""The MP law and the rank rule on synthetic spiked covariances whose truth is known."""

import math

import pytest
import torch
from conftest import sample_eigenvalues, spiked_samples

from hf_rmtkd.mp_law import (
    TRACY_WIDOM_1_QUANTILES,
    _bulk_quantile_function,
    estimate_sigma2_bema,
    estimate_sigma2_mp_fit,
    estimate_sigma2_quantile,
    fit_spectrum,
    mp_density,
    mp_edges,
    tracy_widom_margin,
)


class TestEdgesAndDensity:
    def test_edges_match_formula(self):
        lo, hi = mp_edges(2.0, 0.25)
        assert lo == pytest.approx(2.0 * 0.5**2)
        assert hi == pytest.approx(2.0 * 1.5**2)

    @pytest.mark.parametrize("q", [0.01, 0.3, 1.0, 2.0, 5.0])
    def test_density_integrates_to_min_one_inverse_q(self, q):
        lo, hi = mp_edges(1.5, q)
        theta = torch.linspace(0, math.pi, 200001, dtype=torch.float64)
        x = lo + (hi - lo) * (1 - torch.cos(theta)) / 2
        integrand = mp_density(x, 1.5, q) * (hi - lo) * torch.sin(theta) / 2
        mass = float(torch.trapezoid(integrand, theta))
        assert mass == pytest.approx(min(1.0, 1.0 / q), rel=1e-3)

    def test_density_zero_outside_support(self):
        lo, hi = mp_edges(1.0, 0.5)
        x = torch.tensor([lo * 0.5, hi * 1.01, -1.0], dtype=torch.float64)
        assert torch.all(mp_density(x, 1.0, 0.5) == 0)

    @pytest.mark.parametrize("q", [0.1, 2.0])
    def test_bulk_quantiles_match_large_sample(self, q):
        # The non-zero eigenvalues of a big pure-noise covariance follow the MP quantiles, also for q > 1.
        d = 400
        eig = sample_eigenvalues(spiked_samples(d, int(d / q), [], seed=3))
        nonzero = torch.sort(eig[: min(d, int(d / q))]).values
        probs = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        theory = _bulk_quantile_function(q, probs)
        observed = torch.quantile(nonzero, probs)
        assert torch.allclose(observed, theory, rtol=0.03)

    def test_invalid_q_raises(self):
        with pytest.raises(ValueError, match="`q` must be > 0"):
            mp_edges(1.0, 0.0)


class TestNoiseEstimators:
    @pytest.mark.parametrize("estimator", [estimate_sigma2_bema, estimate_sigma2_mp_fit])
    @pytest.mark.parametrize("q", [0.01, 0.5, 2.0])
    def test_pure_noise_sigma2_recovered(self, estimator, q):
        d = 200
        eig = sample_eigenvalues(spiked_samples(d, int(d / q), [], sigma2=3.0, seed=1))
        assert estimator(eig, int(d / q) - 1) == pytest.approx(3.0, rel=0.05)

    def test_mp_fit_warns_when_a_heavy_tail_pins_it_to_its_bound(self):
        # A log-normal spectrum, heavy-tailed as real activations are: no MP bulk for the fit to find.
        eig = torch.exp(1.5 * torch.randn(1536, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        with pytest.warns(UserWarning, match="edge of its search range"):
            sigma2 = estimate_sigma2_mp_fit(eig, 26_000)
        assert sigma2 == pytest.approx(10 * estimate_sigma2_quantile(eig, 26_000), rel=1e-3)

    def test_quantile_is_the_median_of_nonzero_eigenvalues(self):
        eig = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        # n = 3 samples: the two zeros are structural and skipped.
        assert estimate_sigma2_quantile(eig, 3, 0.5) == pytest.approx(2.0)

    @pytest.mark.parametrize("field,value", [("tau", 0.0), ("tau", 1.0)])
    def test_bad_tau_raises(self, field, value):
        with pytest.raises(ValueError, match="`tau` must be in"):
            estimate_sigma2_quantile(torch.ones(4), 10, value)

    def test_bad_bulk_fraction_raises(self):
        with pytest.raises(ValueError, match="`bulk_fraction`"):
            estimate_sigma2_bema(torch.ones(4), 10, 0.6)


def _planted(q: float) -> list[float]:
    # Spike strengths well above the BBP threshold sqrt(q): a spike of strength l puts its sample eigenvalue at
    # sigma2 (1 + l)(1 + q / l), separated from lambda_+ by many Tracy–Widom widths at these sizes.
    root = math.sqrt(q)
    return [3 * root + 0.5, 6 * root + 1.0, 12 * root + 2.0]


class TestRankSelection:
    @pytest.mark.parametrize("estimator", ["bema", "mp_fit"])
    @pytest.mark.parametrize("q", [0.01, 0.1, 0.5, 1.0, 2.0])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_planted_spikes_found_and_no_bulk_counted(self, estimator, q, seed):
        d = 200
        n = int(d / q)
        spikes = _planted(q)
        eig = sample_eigenvalues(spiked_samples(d, n, spikes, sigma2=2.0, seed=seed))
        fit = fit_spectrum(eig, n - 1, estimator=estimator)
        assert fit.rank == len(spikes)
        assert fit.sigma2 == pytest.approx(2.0, rel=0.1)

    def test_default_estimator_passes_the_same_grid(self):
        d, q = 200, 0.5
        eig = sample_eigenvalues(spiked_samples(d, int(d / q), _planted(q), seed=7))
        assert fit_spectrum(eig, int(d / q) - 1).rank == 3

    @pytest.mark.parametrize("q", [0.05, 1.0])
    def test_pure_noise_gives_rank_zero(self, q):
        d = 150
        for seed in range(5):
            eig = sample_eigenvalues(spiked_samples(d, int(d / q), [], seed=100 + seed))
            assert fit_spectrum(eig, int(d / q) - 1).rank == 0

    def test_spike_below_bbp_is_not_counted(self):
        # Below the BBP threshold the top eigenvalue sticks to the bulk edge: nothing is detectable.
        d, q = 200, 0.5
        eig = sample_eigenvalues(spiked_samples(d, int(d / q), [0.3 * math.sqrt(q)], seed=4))
        assert fit_spectrum(eig, int(d / q) - 1).rank == 0

    def test_margin_grows_with_stricter_false_alarm(self):
        loose = tracy_widom_margin(1.0, 100, 1000, 0.05)
        strict = tracy_widom_margin(1.0, 100, 1000, 0.001)
        assert 0 < loose < strict
        assert strict / loose == pytest.approx(TRACY_WIDOM_1_QUANTILES[0.001] / TRACY_WIDOM_1_QUANTILES[0.05])

    def test_margin_matches_johnstone_scaling(self):
        # sigma2 (sqrt n + sqrt d)(1/sqrt n + 1/sqrt d)^(1/3) / n * s_alpha
        expected = (math.sqrt(1000) + 10) * (1 / math.sqrt(1000) + 0.1) ** (1 / 3) / 1000 * 2.0234
        assert tracy_widom_margin(1.0, 100, 1000, 0.01) == pytest.approx(expected)

    def test_bad_false_alarm_raises(self):
        with pytest.raises(ValueError, match="`false_alarm` must be one of"):
            fit_spectrum(torch.ones(4), 10, false_alarm=0.2)

    def test_bad_estimator_raises(self):
        with pytest.raises(ValueError, match="`estimator` must be one of"):
            fit_spectrum(torch.ones(4), 10, estimator="median")


def test_estimators_are_a_registry_whose_knobs_are_reachable():
    from hf_rmtkd.analysis import SpectralOptions
    from hf_rmtkd.mp_law import ESTIMATORS, register_estimator

    x = spiked_samples(40, 400, [8.0, 5.0], seed=1)
    eigenvalues = sample_eigenvalues(x)
    narrow = fit_spectrum(eigenvalues, 400, "bema", bulk_fraction=0.05).sigma2
    wide = fit_spectrum(eigenvalues, 400, "bema", bulk_fraction=0.45).sigma2
    assert narrow != pytest.approx(wide, rel=1e-6)  # BEMA's trimmed share reaches the estimate
    register_estimator("fixed_one", lambda eigenvalues, n, **knobs: 1.0)
    try:
        assert fit_spectrum(eigenvalues, 400, "fixed_one").sigma2 == 1.0
        assert SpectralOptions(estimator="fixed_one").estimator == "fixed_one"
    finally:
        del ESTIMATORS["fixed_one"]
    with pytest.raises(ValueError, match="`bulk_fraction` must be in"):
        SpectralOptions(bulk_fraction=0.7)
