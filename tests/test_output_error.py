"""The per-site output-error budget: the error formulas agree with the surgery's actual output error, the rank meets
the budget and never goes below the MP rank, and both ranks reach the report, the record, the card and the trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batches, tiny_model
from testing_utils import labelled_dataset, planted_llama, tiny_classifier, token_ids, trainer_args

import hf_rmtkd
from hf_rmtkd import RMTKDTrainer
from hf_rmtkd.model_card import build_model_card
from hf_rmtkd.output_error import projection_errors, reader_errors, selection_errors, stream_errors
from hf_rmtkd.surgery import pivoted_cholesky


def _correlated(n=2000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing.T


def _measured(weight, x, reconstruct):
    """Relative output error measured on the samples: |W (x - x_hat)|^2 / |W x|^2 (centred)."""
    x = x - x.mean(0)
    residual = (x - reconstruct(x)) @ weight.T
    return float((residual**2).sum() / ((x @ weight.T) ** 2).sum())


class TestFormulas:
    def test_projection_error_is_the_measured_output_error(self):
        x = _correlated()
        weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        cov = torch.cov(x.T, correction=0)
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0), vectors.flip(1)
        errors = projection_errors(weight, values, vectors)
        assert errors[0] == pytest.approx(1.0) and errors[-1] == pytest.approx(0.0, abs=1e-12)
        for k in (1, 3, 7):
            basis = vectors[:, :k]
            assert errors[k] == pytest.approx(_measured(weight, x, lambda z: z @ basis @ basis.T), rel=1e-9)

    def test_selection_error_is_the_least_squares_residual_of_the_picked_units(self):
        x = _correlated(seed=2)
        weight = torch.randn(4, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        cov = torch.cov(x.T, correction=0)
        errors = selection_errors(weight, cov)
        for k in (1, 4, 9):
            keep = pivoted_cholesky(cov, k)
            mixing = torch.linalg.solve(cov[keep][:, keep], cov[keep, :]).T  # (d, k)
            assert errors[k] == pytest.approx(_measured(weight, x, lambda z: z[:, keep] @ mixing.T), rel=1e-7)
        assert torch.all(errors[1:] <= errors[:-1] + 1e-12)  # more units never hurt

    def test_reader_error_is_the_measured_error_of_a_norm_reader(self):
        x = _correlated(seed=4)
        x[:, 0] += 40.0  # an outlier dimension: most of the stream's energy
        g = torch.Generator().manual_seed(5)
        norm_weight = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
        norm_weight[0] = 1e-3  # ... which the norm all but switches off
        weight = torch.randn(6, 12, generator=g, dtype=torch.float64)
        values, vectors = torch.linalg.eigh(x.T @ x)
        values, vectors = values.flip(0), vectors.flip(1)
        u = x / x.pow(2).mean(1, keepdim=True).sqrt()  # RMSNorm without its weight
        seen = u * norm_weight  # what calibration observes at the reader's input
        errors = reader_errors(weight, norm_weight, seen.T @ seen, vectors)
        a = weight * norm_weight
        for k in (1, 4, 9):
            dropped = u - u @ vectors[:, :k] @ vectors[:, :k].T
            measured = float(((dropped @ a.T) ** 2).sum() / ((u @ a.T) ** 2).sum())
            assert errors[k] == pytest.approx(measured, rel=1e-6)
        assert errors[-1] == 0.0
        # The stream's energy says one direction is enough; the reader, which never sees that direction, disagrees.
        assert stream_errors(values)[1] < 0.05 and errors[1] > 0.5

    def test_a_decoders_hidden_budget_follows_its_readers_not_the_streams_energy(self):
        from hf_rmtkd.analysis import SpectralOptions
        from hf_rmtkd.hidden import residual_statistics
        from hf_rmtkd.hidden.family import family_for

        model, _ = planted_llama(k=12)
        with torch.no_grad():  # a massive activation on dimension 0, all but switched off by every norm
            model.model.embed_tokens.weight[:, 0] += 50.0
            for norm in [model.model.norm] + [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]:
                norm.weight[0] = 1e-3
        family = family_for(model)
        names = family.budget_inputs(model)
        assert len(names) == 2 * model.config.num_hidden_layers + 1  # attention and MLP norms of each layer, head
        pooled, stats = residual_statistics(
            model, [{"input_ids": token_ids(s)} for s in range(8)], None, False, False, names
        )
        report = family.analyze(pooled, model, SpectralOptions())
        readers = family.output_errors(model, report, stats)
        assert stream_errors(report.eigenvalues)[1] < 0.05 and readers[1] > 0.5
        assert float(readers[report.dim]) == 0.0

    def test_stream_error_is_the_dropped_energy(self):
        errors = stream_errors(torch.tensor([4.0, 3.0, 2.0, 1.0]))
        assert errors.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.1, 0.0])


class TestCompress:
    def test_budget_is_met_and_never_below_the_mp_rank(self):
        plain = hf_rmtkd.compress(tiny_model("bert"), tiny_batches("bert"), progress=False)
        budget = hf_rmtkd.compress(tiny_model("bert"), tiny_batches("bert"), progress=False, max_output_error=0.05)
        assert budget.config.reduced_modules
        raised = 0
        for name, record in budget.config.reduced_modules.items():
            assert record.mp_rank == plain.config.reduced_modules[name].rank
            assert record.rank == max(record.mp_rank, record.budget_rank) and record.output_error <= 0.05
            raised += record.rank > record.mp_rank
        assert raised, "the budget changed no rank: pick a tighter budget for this model"
        assert budget.num_parameters() > plain.num_parameters()

    def test_tighter_budgets_keep_more_and_the_output_closer(self):
        batch = tiny_batches("bert", 1, seed=9)[0]
        reference = tiny_model("bert")(**batch).last_hidden_state
        errors, params = [], []
        for budget in (0.3, 0.1, 0.01):
            model = hf_rmtkd.compress(
                tiny_model("bert"), tiny_batches("bert"), progress=False, max_output_error=budget
            )
            with torch.no_grad():
                out = model(**batch).last_hidden_state
            errors.append(float((out - reference).norm() / reference.norm()))
            params.append(model.num_parameters())
        assert params == sorted(params) and errors == sorted(errors, reverse=True)

    def test_hidden_width_budget_and_both_ranks_in_the_card(self, tmp_path):
        model, _ = planted_llama(k=12)
        with torch.no_grad():  # a weak direction outside the planted subspace, below the MP edge's reach
            model.model.embed_tokens.weight.add_(1e-3 * torch.randn_like(model.model.embed_tokens.weight))
        batches = [{"input_ids": token_ids(seed)} for seed in range(8)]
        plain = hf_rmtkd.compress(copy.deepcopy(model), batches, hidden_width=True, target_modules=[], progress=False)
        mp_error = 1 - plain.config.hidden_width.retained_variance  # the stream's energy the MP width drops
        compressed = hf_rmtkd.compress(
            model, batches, hidden_width=True, target_modules=[], progress=False, max_output_error=mp_error / 2
        )
        record = compressed.config.hidden_width
        assert record.mp_rank == plain.config.hidden_width.rank == 12 < record.budget_rank <= record.rank < 32
        assert record.output_error <= mp_error / 2
        compressed.save_pretrained(tmp_path)
        reloaded = hf_rmtkd.RMTKDForCausalLM.from_pretrained(tmp_path)
        assert reloaded.config.hidden_width.budget_rank == record.budget_rank
        card = str(build_model_card(reloaded))
        assert f"| {record.mp_rank} / {record.budget_rank} |" in card

    @pytest.mark.parametrize("value", [0.0, 1.0, -0.1])
    def test_bad_budget_names_the_field(self, value):
        with pytest.raises(ValueError, match="max_output_error"):
            hf_rmtkd.compress(tiny_model("bert"), tiny_batches("bert"), progress=False, max_output_error=value)
        with pytest.raises(ValueError, match="reduction_max_output_error"):
            trainer_args("/tmp/unused", reduction_max_output_error=value)


def test_the_trainer_applies_the_budget(tmp_path):
    args = trainer_args(
        tmp_path,
        max_steps=1,
        reduction_schedule="all_at_once",
        reduction_max_output_error=0.02,
        reduction_min_rank_ratio=0.0,
    )
    trainer = RMTKDTrainer(model=tiny_classifier(), args=args, train_dataset=labelled_dataset(32))
    trainer.train()
    records = trainer.model.config.reduced_modules
    assert records and all(r.budget_rank is not None and r.output_error <= 0.02 for r in records.values())
    assert trainer.model.config.calibration["max_output_error"] == 0.02


def test_a_conv_block_gets_a_budget_rank():
    from hf_rmtkd import ResNetCifarConfig, ResNetCifarForImageClassification

    torch.manual_seed(0)
    model = ResNetCifarForImageClassification(ResNetCifarConfig(depth=8, widths=[4, 8, 16], image_size=8)).eval()
    images = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    compressed = hf_rmtkd.compress(model, images, progress=False, max_output_error=0.1)
    records = compressed.config.reduced_modules
    assert records and all(r.budget_rank is not None and r.output_error <= 0.1 for r in records.values())


def _agreement(model, batches, reference_logits):
    """Cosine similarity of the model's logits with the original's (1.0 for the original): higher is better."""
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"]).logits.flatten() for b in batches])
    return float(torch.nn.functional.cosine_similarity(logits, reference_logits, dim=0))


def test_model_level_budget_search_meets_the_drop_with_the_loosest_budget_tried():
    model, _ = planted_llama(k=12)
    with torch.no_grad():  # signal outside the planted subspace too, so the budget matters
        model.model.embed_tokens.weight.add_(0.05 * torch.randn_like(model.model.embed_tokens.weight))
    calibration = [{"input_ids": token_ids(seed)} for seed in range(8)]
    held_out = [{"input_ids": token_ids(seed)} for seed in range(100, 104)]
    with torch.no_grad():
        original = torch.cat([model(input_ids=b["input_ids"]).logits.flatten() for b in held_out])

    def evaluate(m):
        return _agreement(m, held_out, original)

    compressed, tries = hf_rmtkd.search_output_error(
        model, calibration, evaluate, max_relative_drop=0.001, greater_is_better=True, tries=5
    )
    assert evaluate(model) == pytest.approx(1.0)  # the model passed in is unchanged
    assert len(tries) == 5 and [t.max_output_error for t in tries[:2]] == [0.5, 1e-4]
    assert not tries[0].accepted and tries[1].accepted, "pick a model where the loosest budget fails"
    best = max((t for t in tries if t.accepted), key=lambda t: t.max_output_error)
    assert evaluate(compressed) == pytest.approx(best.metric)
    assert best.relative_drop <= 0.001 and compressed.num_parameters() == best.parameters
    assert all(t.relative_drop > 0.001 for t in tries if not t.accepted)
    assert compressed.num_parameters() < model.num_parameters()


def test_the_budget_follows_the_ffn_surgery_that_runs():
    site = "encoder.layer.0.output.dense"
    analysed = hf_rmtkd.analyze(tiny_model("bert"), tiny_batches("bert"), [site], progress=False)[site]
    weight = tiny_model("bert").get_submodule(site).weight.detach()
    expected = {
        "project": projection_errors(weight, analysed.eigenvalues, analysed.eigenvectors),
        "select": selection_errors(weight, analysed.statistics.covariance(True)),
    }
    for method, errors in expected.items():
        compressed = hf_rmtkd.compress(
            tiny_model("bert"), tiny_batches("bert"), [site], ffn_method=method, progress=False, max_output_error=0.05
        )
        record = compressed.config.reduced_modules[site]
        assert record.ffn_method == method and record.output_error == pytest.approx(float(errors[record.rank]))
    assert not torch.allclose(expected["project"], expected["select"])
