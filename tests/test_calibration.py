"""Streaming activation statistics: exact sums, padding dropped, caps, errors, and the 2-process reduction."""

import pytest
import torch
from conftest import tiny_batches, tiny_model
from torch import nn

from hf_rmtkd.calibration import ActivationStatistics, collect_statistics


def _mlp(d_in=6, d_hidden=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, 3)).double()


class TestStatistics:
    def test_streamed_covariance_equals_direct(self):
        model = _mlp()
        batches = [torch.randn(7, 6, dtype=torch.float64) for _ in range(5)]
        stats, _ = collect_statistics(model, batches, ["2"], progress=False)
        hidden = torch.cat([model[1](model[0](b)) for b in batches]).detach()
        s = stats["2"]
        assert s.count == 35
        centred = hidden - hidden.mean(0)
        assert torch.allclose(s.covariance(True), centred.T @ centred / 35, atol=1e-12)
        assert torch.allclose(s.covariance(False), hidden.T @ hidden / 35, atol=1e-12)
        assert s.sum_outer.dtype == torch.float64

    def test_padding_is_dropped_through_attention_mask(self):
        model = tiny_model("bert")
        batches = tiny_batches("bert", n_batches=2)
        name = "encoder.layer.0.output.dense"
        stats, _ = collect_statistics(model, batches, [name], progress=False)
        assert stats[name].count == sum(int(b["attention_mask"].sum()) for b in batches)
        # The same statistics from the real tokens only, collected by hand.
        seen = []
        handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            for b in batches:
                model(**b)
        handle.remove()
        real = torch.cat([h[b["attention_mask"].bool()] for h, b in zip(seen, batches)]).double()
        assert torch.allclose(stats[name].sum, real.sum(0), atol=1e-9)

    def test_shared_inputs_share_one_accumulation_and_agree(self):
        model = tiny_model("bert")
        names = [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
        stats, _ = collect_statistics(model, tiny_batches("bert", 2), names, progress=False)
        assert torch.equal(stats[names[0]].sum_outer, stats[names[1]].sum_outer)
        assert torch.equal(stats[names[0]].sum_outer, stats[names[2]].sum_outer)

    def test_forwards_stop_after_the_last_hooked_module_with_the_same_statistics(self):
        model = tiny_model("llama", "causal")
        batches = tiny_batches("llama", n_batches=4)
        names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
        ran = []
        handle = model.lm_head.register_forward_pre_hook(lambda m, a: ran.append(1))
        early, _ = collect_statistics(model, batches, names, progress=False)
        assert len(ran) == 1  # the first batch ran in full, the three others stopped at layer 0's down_proj
        # Reference: every forward in full, the same hooks' inputs collected by hand.
        seen = {name: [] for name in names}
        hooks = [
            model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0])) for n in names
        ]
        with torch.no_grad():
            for b in batches:
                model(**b)
        for hook in [handle, *hooks]:
            hook.remove()
        assert len(ran) == 5
        for name in names:
            real = torch.cat([h[b["attention_mask"].bool()] for h, b in zip(seen[name], batches)]).double()
            assert early[name].count == real.shape[0]
            torch.testing.assert_close(early[name].sum_outer, real.T @ real, rtol=1e-4, atol=1e-4)  # float32 products
        # The interrupted forwards leave the model as it was: a full forward afterwards is unchanged.
        with torch.no_grad():
            after = model(**batches[0], output_hidden_states=True)
        assert len(after.hidden_states) == model.config.num_hidden_layers + 1

    def test_a_module_called_twice_per_forward_never_stops_it_early(self):
        layer = nn.Linear(6, 6).double()
        model = nn.Sequential(layer, nn.Tanh(), layer)  # one module, two calls: both inputs are samples
        batches = [torch.randn(5, 6, dtype=torch.float64) for _ in range(3)]
        stats, _ = collect_statistics(model, batches, ["0"], progress=False)
        assert stats["0"].count == 2 * 15

    def test_max_samples_caps_every_module(self):
        model = _mlp()
        stats, _ = collect_statistics(
            model, [torch.randn(8, 6, dtype=torch.float64)] * 10, ["0", "2"], 20, progress=False
        )
        assert stats["0"].count == 20 and stats["2"].count == 20

    def test_conv_inputs_use_spatial_positions_as_samples(self):
        model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1))
        stats, _ = collect_statistics(model, [torch.randn(2, 3, 4, 4)], ["2"], progress=False)
        assert stats["2"].count == 2 * 4 * 4 and stats["2"].dim == 5

    def test_fingerprint_depends_on_data(self):
        model = _mlp()
        a = [torch.ones(4, 6, dtype=torch.float64)]
        b = [torch.zeros(4, 6, dtype=torch.float64)]
        fa = collect_statistics(model, a, ["0"], progress=False)[1]
        assert fa == collect_statistics(model, a, ["0"], progress=False)[1]
        assert fa != collect_statistics(model, b, ["0"], progress=False)[1]

    def test_training_mode_restored_and_no_grad(self):
        model = _mlp().train()
        collect_statistics(model, [torch.randn(4, 6, dtype=torch.float64)], ["0"], progress=False)
        assert model.training
        assert all(p.grad is None for p in model.parameters())


class TestBadInput:
    def test_nan_activations_name_the_module(self):
        model = _mlp()
        with torch.no_grad():
            model[0].bias[0] = float("nan")
        with pytest.raises(ValueError, match="Non-finite.*'2'"):
            collect_statistics(model, [torch.randn(4, 6, dtype=torch.float64)], ["2"], progress=False)

    def test_empty_data_raises(self):
        with pytest.raises(ValueError, match="`calibration_data` is empty"):
            collect_statistics(_mlp(), [], ["0"], progress=False)

    def test_module_that_never_runs_raises(self):
        class WithUnused(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.unused = _mlp(), nn.Linear(6, 6)

            def forward(self, x):
                return self.body(x)

        model = WithUnused()
        with pytest.raises(ValueError, match="never ran"):
            collect_statistics(model, [torch.randn(4, 6, dtype=torch.float64)], ["unused"], progress=False)

    def test_bad_cap_raises(self):
        with pytest.raises(ValueError, match="`max_samples` must be >= 2"):
            collect_statistics(_mlp(), [torch.randn(4, 6)], ["0"], max_samples=1, progress=False)


def _two_process_job():
    # Runs in each of 2 gloo processes: each rank sees half the data; the sums must equal the full-data sums.
    import torch.distributed as dist
    from accelerate import PartialState

    # The launcher forks this test process: drop any process state inherited from the parent.
    PartialState._reset_state()
    state = PartialState(cpu=True)
    assert state.num_processes == 2, state.num_processes
    torch.manual_seed(0)
    model = _mlp()
    data = [torch.randn(5 + i, 6, dtype=torch.float64) for i in range(4)]
    mine = data[state.process_index :: 2]
    stats, _ = collect_statistics(model, mine, ["2"], progress=False)
    full = ActivationStatistics.zeros(10)
    with torch.no_grad():
        for b in data:
            full.add(model[1](model[0](b)))
    assert dist.get_world_size() == 2
    assert stats["2"].count == full.count
    assert torch.allclose(stats["2"].sum_outer, full.sum_outer, atol=1e-9)
    assert torch.allclose(stats["2"].sum, full.sum, atol=1e-9)


def test_statistics_are_summed_across_two_processes():
    from accelerate import debug_launcher

    debug_launcher(_two_process_job, num_processes=2)


def test_statistics_zeros_shapes():
    s = ActivationStatistics.zeros(4)
    assert s.sum_outer.shape == (4, 4) and s.count == 0 and s.dim == 4


@pytest.mark.parametrize("width", [100, 576, 1100])
def test_the_blocked_gram_equals_the_plain_product(width):
    from hf_rmtkd.calibration import gram

    x = torch.randn(300, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    result = gram(x)
    torch.testing.assert_close(result, x.T @ x, rtol=1e-12, atol=1e-10)
    if width >= 512:  # blocked: the blocks below the diagonal are those above it, transposed
        half = round(width / (2 if width < 1024 else 4))
        assert torch.equal(result[half:, :half], result[:half, half:].T)
