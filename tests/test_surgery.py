"""Surgery is exact where the algebra allows: redundant FFN neurons, inputs on a low-dimensional affine subspace."""

import pytest
import torch
from conftest import tiny_batches, tiny_model
from torch import nn

import hf_rmtkd
from hf_rmtkd.layers import LowRankLinear
from hf_rmtkd.records import LinearRecord
from hf_rmtkd.sites import linear_shape
from hf_rmtkd.structure import apply_structure
from hf_rmtkd.surgery import pivoted_cholesky, reduce_site, saves_parameters


FFN = {
    "bert": ("encoder.layer.0.output.dense", ["encoder.layer.0.intermediate.dense"]),
    "gpt2": ("h.0.mlp.c_proj", ["h.0.mlp.c_fc"]),
    "llama": ("layers.0.mlp.down_proj", ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]),
}


def _duplicate_neurons(model, producers, unique):
    """Make the FFN's inner neurons copies of `unique` distinct ones: the inner activation then has rank `unique`."""
    with torch.no_grad():
        for path in producers:
            module = model.get_submodule(path)
            width = linear_shape(module)[1]
            source = torch.arange(width) % unique
            if module.weight.shape[0] == width:  # nn.Linear: (out, in)
                module.weight.copy_(module.weight[source])
            else:  # Conv1D: (in, out)
                module.weight.copy_(module.weight[:, source])
            if module.bias is not None:
                module.bias.copy_(module.bias[source])


class TestFFNSelection:
    @pytest.mark.parametrize("family", sorted(FFN))
    def test_redundant_neurons_are_removed_exactly(self, family):
        model = tiny_model(family)
        consumer, producers = FFN[family]
        _duplicate_neurons(model, producers, unique=6)
        batches = tiny_batches(family, 3)
        with torch.no_grad():
            reference = model(**batches[0]).last_hidden_state
        report = hf_rmtkd.analyze(model, batches, target_modules=[consumer.split(".", 1)[1]], progress=False)
        site = report[consumer]
        site.rank = 6
        record = reduce_site(model, site)
        assert record.rank == 6 and record.in_features == 37
        for path in producers:
            assert linear_shape(model.get_submodule(path))[1] == 6
        assert linear_shape(model.get_submodule(consumer))[0] == 6
        with torch.no_grad():
            assert torch.allclose(model(**batches[0]).last_hidden_state, reference, atol=1e-5)

    def test_project_method_shrinks_the_same_modules(self):
        model = tiny_model("bert")
        report = hf_rmtkd.analyze(model, tiny_batches("bert", 3), target_modules=["output.dense"], progress=False)
        site = report["encoder.layer.0.output.dense"]
        site.rank = 9
        record = reduce_site(model, site, ffn_method="project")
        assert record.ffn_method == "project"
        assert model.get_submodule("encoder.layer.0.intermediate.dense").out_features == 9
        assert model.get_submodule("encoder.layer.0.output.dense").in_features == 9

    def test_bad_ffn_method_raises(self):
        model = tiny_model("bert")
        report = hf_rmtkd.analyze(model, tiny_batches("bert", 2), target_modules=["output.dense"], progress=False)
        with pytest.raises(ValueError, match="`ffn_method` must be one of"):
            reduce_site(model, report["encoder.layer.0.output.dense"], ffn_method="fold")

    def test_pivoted_cholesky_skips_redundant_coordinates(self):
        base = torch.randn(500, 3, dtype=torch.float64)
        x = torch.cat([base, base[:, :1] * 2, base[:, 1:2] - base[:, 2:3]], dim=1)  # 5 columns, rank 3
        cov = x.T @ x / 500
        picked = set(pivoted_cholesky(cov, 3).tolist())
        assert len(picked) == 3
        assert torch.linalg.matrix_rank(cov[sorted(picked)][:, sorted(picked)]) == 3


class Probe(nn.Module):
    def __init__(self, d_in=24, d_out=20, bias=True):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_in, d_out, bias=bias)])

    def forward(self, x):
        return self.layers[0](x)


class TestLowRankLinear:
    @pytest.mark.parametrize("bias", [True, False])
    def test_exact_on_an_affine_subspace(self, bias):
        torch.manual_seed(0)
        basis, offset = torch.randn(3, 24), torch.randn(24) * 3
        make = lambda n: torch.randn(n, 3) @ basis + offset  # noqa: E731
        model = Probe(bias=bias)
        report = hf_rmtkd.analyze(model, [make(200) for _ in range(3)], min_rank=3, progress=False)
        site = report["layers.0"]
        site.rank = 3
        fresh = make(50)
        with torch.no_grad():
            reference = model(fresh)
        record = reduce_site(model, site)
        assert isinstance(model.layers[0], LowRankLinear) and model.layers[0].rank == 3
        # The mean correction lands in a bias, also for a bias-free layer: recorded so reload rebuilds it.
        assert record.bias is True
        with torch.no_grad():
            assert torch.allclose(model(fresh), reference, atol=1e-4)

    def test_left_dense_when_factorising_saves_nothing(self):
        model = Probe(24, 20)
        report = hf_rmtkd.analyze(model, [torch.randn(300, 24)], progress=False)
        site = report["layers.0"]
        site.rank = 11  # 11 * (24 + 20) = 484 >= 480
        assert not saves_parameters(24, 20, 11)
        assert reduce_site(model, site) is None
        assert isinstance(model.layers[0], nn.Linear)


class TestApplyStructure:
    def test_rebuild_from_records_matches_compressed_shapes(self):
        model = tiny_model("gpt2")
        compressed = hf_rmtkd.compress(model, tiny_batches("gpt2"), progress=False)
        fresh = tiny_model("gpt2", seed=1)
        apply_structure(fresh, compressed.config.reduced_modules)
        shapes = {k: v.shape for k, v in compressed.model.state_dict().items()}
        assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes

    def test_record_for_wrong_base_width_raises(self):
        fresh = tiny_model("bert")
        record = LinearRecord(in_features=64, out_features=32, rank=4)
        with pytest.raises(ValueError, match="encoder.layer.0.attention.self.query.*in=64.*in=32"):
            apply_structure(fresh, {"encoder.layer.0.attention.self.query": record})

    def test_record_for_missing_module_raises(self):
        with pytest.raises(ValueError, match="does not exist"):
            record = LinearRecord(in_features=37, out_features=32, rank=4)
            apply_structure(tiny_model("bert"), {"encoder.layer.9.output.dense": record})
