"""`analyze`: planted structure is found, the report's table and plots, and target selection."""

import math

import pytest
import torch
from conftest import spiked_samples, tiny_batches, tiny_model
from torch import nn

import hf_rmtkd
from hf_rmtkd.analysis import SpectralOptions
from hf_rmtkd.sites import find_sites, select_sites


class Probe(nn.Module):
    """A linear layer whose input we control: `analyze` sees exactly the data we plant."""

    def __init__(self, d):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x):
        return self.layers[0](x)


def _chunks(x, size=250):
    return [x[i : i + size].float() for i in range(0, x.shape[0], size)]


class TestPlantedStructure:
    @pytest.mark.parametrize("estimator", ["bema", "mp_fit"])
    def test_planted_spikes_give_the_rank(self, estimator):
        d, n = 64, 4000
        q = d / n
        spikes = [3 * math.sqrt(q) + 0.5, 8 * math.sqrt(q) + 1, 20 * math.sqrt(q) + 2, 40.0]
        x = spiked_samples(d, n, spikes, sigma2=0.5, seed=11)
        report = hf_rmtkd.analyze(Probe(d), _chunks(x), estimator=estimator, progress=False)
        site = report["layers.0"]
        assert (site.rank, site.dim, site.n_samples) == (4, d, n)
        assert site.sigma2 == pytest.approx(0.5, rel=0.1)
        assert site.lambda_plus == pytest.approx(site.sigma2 * (1 + math.sqrt(d / (n - 1))) ** 2)
        assert site.eigenvalues.shape == (d,)
        assert torch.all(site.eigenvalues[:-1] >= site.eigenvalues[1:])
        assert 0 < site.retained_variance < 1

    def test_no_signal_keeps_min_rank_and_warns(self):
        x = spiked_samples(32, 3000, [], seed=2)
        with pytest.warns(UserWarning, match="keeping the minimum rank 3"):
            report = hf_rmtkd.analyze(Probe(32), _chunks(x), min_rank=3, progress=False)
        assert report["layers.0"].rank == 3 and report["layers.0"].signal_rank == 0

    def test_fewer_samples_than_dimensions_warns_and_estimates(self):
        d = 80
        x = spiked_samples(d, 60, [40.0, 80.0], seed=5)
        with pytest.warns(UserWarning, match="q = .* > 1"):
            report = hf_rmtkd.analyze(Probe(d), _chunks(x, 20), progress=False)
        assert report["layers.0"].rank == 2

    def test_uncentred_covariance_shows_the_mean_as_a_spike(self):
        x = spiked_samples(32, 3000, [], seed=3) + 5.0
        centred = hf_rmtkd.analyze(Probe(32), _chunks(x), min_rank=1, progress=False)
        raw = hf_rmtkd.analyze(Probe(32), _chunks(x), centered=False, progress=False)
        assert centred["layers.0"].signal_rank == 0
        assert raw["layers.0"].signal_rank == 1


class TestReport:
    def test_table_and_plots(self, tmp_path):
        model = tiny_model("bert")
        report = hf_rmtkd.analyze(model, tiny_batches("bert"), progress=False)
        table = report.to_pandas()
        assert list(table["module"]) == list(report)
        assert {"rank", "dim", "n_samples", "sigma2", "lambda_plus", "retained_variance"} <= set(table.columns)
        assert report.to_dict()["encoder.layer.0.output.dense"]["kind"] == "ffn"
        paths = report.plot(tmp_path, names=["encoder.layer.0.output.dense"])
        assert len(paths) == 1 and paths[0].stat().st_size > 1000
        assert paths[0].read_bytes()[:4] == b"\x89PNG"

    def test_analysis_leaves_the_model_unchanged(self):
        model = tiny_model("bert")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        hf_rmtkd.analyze(model, tiny_batches("bert", 2), progress=False)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    @pytest.mark.parametrize(
        "field,value",
        [("estimator", "median"), ("tau", 1.5), ("false_alarm", 0.3), ("min_rank", 0), ("max_samples", 1)],
    )
    def test_bad_options_raise_value_error_naming_the_field(self, field, value):
        with pytest.raises(ValueError, match=f"`{field}`"):
            SpectralOptions(**{field: value})


class TestSiteSelection:
    def test_default_sites_cover_ffn_and_block_linears_only(self):
        model = tiny_model("bert", "sequence")
        names = {s.name: s.kind for s in find_sites(model)}
        assert names["bert.encoder.layer.0.output.dense"] == "ffn"
        assert names["bert.encoder.layer.1.attention.self.query"] == "linear"
        assert "bert.encoder.layer.0.intermediate.dense" not in names  # a producer of the FFN site
        assert "classifier" not in names and "bert.pooler.dense" not in names

    def test_suffix_list_and_regex(self):
        model = tiny_model("bert")
        by_suffix = [s.name for s in select_sites(model, ["query", "intermediate.dense"])]
        assert by_suffix == [
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.output.dense",
            "encoder.layer.1.attention.self.query",
            "encoder.layer.1.output.dense",
        ]
        by_regex = [s.name for s in select_sites(model, r"encoder\.layer\.1\..*(key|value)")]
        assert by_regex == ["encoder.layer.1.attention.self.key", "encoder.layer.1.attention.self.value"]

    def test_no_match_lists_close_names(self):
        with pytest.raises(ValueError, match="matches no module.*query"):
            select_sites(tiny_model("bert"), ["quary"])

    def test_unsupported_module_type_raises_type_error(self):
        with pytest.raises(TypeError, match="LayerNorm.*supported types are torch.nn.Linear"):
            select_sites(tiny_model("bert"), ["attention.output.LayerNorm"])

    @pytest.mark.parametrize(
        "family,ffn",
        [
            ("distilbert", "transformer.layer.0.ffn.lin2"),
            ("mpnet", "encoder.layer.0.output.dense"),
            ("gpt2", "h.0.mlp.c_proj"),
            ("llama", "layers.0.mlp.down_proj"),
            ("vit", "layers.0.mlp.fc2"),
        ],
    )
    def test_ffn_found_in_every_family(self, family, ffn):
        sites = {s.name: s for s in find_sites(tiny_model(family))}
        assert sites[ffn].kind == "ffn" and sites[ffn].dim == 37


def test_sites_with_the_same_input_share_one_eigendecomposition(monkeypatch):
    model = tiny_model("bert")
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.shape) or eigh(a))  # counts the library call
    report = hf_rmtkd.analyze(model, tiny_batches("bert", 2), progress=False)
    layers = model.config.num_hidden_layers
    # Per layer: Q, K and V share one input; the attention output and the FFN each have their own.
    assert len(report) == 5 * layers and len(calls) == 3 * layers
    q, k = report["encoder.layer.0.attention.self.query"], report["encoder.layer.0.attention.self.key"]
    assert q.rank == k.rank and torch.equal(q.eigenvalues, k.eigenvalues)


def test_the_pipeline_skips_eigenvectors_only_where_selection_never_reads_them():
    from hf_rmtkd.analysis import analyze_sites

    model = tiny_model("bert")
    sites = select_sites(model, None)
    options = SpectralOptions()
    full = analyze_sites(model, tiny_batches("bert", 2), sites, options, progress=False)
    lean = analyze_sites(model, tiny_batches("bert", 2), sites, options, progress=False, keep_vectors=False)
    for site in sites:
        assert lean[site.name].rank == full[site.name].rank
        torch.testing.assert_close(lean[site.name].eigenvalues, full[site.name].eigenvalues, rtol=1e-9, atol=1e-12)
        expected = (0, 0) if site.kind == "ffn" else full[site.name].eigenvectors.shape
        assert tuple(lean[site.name].eigenvectors.shape) == tuple(expected)
    assert any(site.kind == "ffn" for site in sites) and any(site.kind == "linear" for site in sites)
