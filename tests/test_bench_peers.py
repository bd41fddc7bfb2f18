"""The peer baselines of the benchmark (truncated SVD, energy PCA, layer dropping) on tiny models with known answers."""

import sys

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from testing_utils import BENCHMARKS
from torch import nn


sys.path.insert(0, str(BENCHMARKS))
from peers import (  # noqa: E402
    drop_layers,
    energy_rank,
    flops,
    parameter_counts,
    pca_energy,
    svd_embedding,
    svd_factor,
    svd_like,
    svd_to_size,
)
from tasks import RESNET_DENSE_MODULES  # noqa: E402

from hf_rmtkd import compress  # noqa: E402


def _bert(seed=0):
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(tiny_config("bert", num_labels=2)).eval()


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 99, (8, 16), generator=g)} for _ in range(n)]


class TestSVD:
    @pytest.mark.parametrize("kind", ["linear", "conv"])
    def test_full_rank_reproduces_the_layer_and_low_rank_is_the_best_approximation(self, kind):
        torch.manual_seed(0)
        layer = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
        x = torch.randn(5, 12) if kind == "linear" else torch.randn(2, 4, 9, 9)
        full = svd_factor(layer, 10 if kind == "linear" else 6)
        assert torch.allclose(full(x), layer(x), atol=1e-5)
        weight = layer.weight.detach().flatten(1)
        low = svd_factor(layer, 3)
        low_weight = (low[1].weight.flatten(1) @ low[0].weight.flatten(1)).detach()
        # Eckart–Young: the error of the rank-3 truncation is the norm of the dropped singular values.
        dropped = torch.linalg.svdvals(weight)[3:]
        assert torch.allclose(torch.linalg.norm(weight - low_weight), dropped.norm(), rtol=1e-4)

    def test_matches_rmtkd_parameter_count_per_site(self):
        teacher = _bert()
        compressed = compress(_bert(), _batches(), progress=False)
        model, ranks = svd_like(teacher, compressed.config.reduced_modules, compressed.model)
        assert set(ranks) == set(compressed.config.reduced_modules)
        ours, theirs = parameter_counts(compressed)[0], parameter_counts(model)[0]
        assert theirs <= ours and ours - theirs < 0.02 * ours
        with torch.no_grad():
            assert model(**_batches(1)[0]).logits.shape == (8, 2)

    def test_token_table_truncation_is_exact_at_full_rank_and_best_below(self):
        torch.manual_seed(0)
        table = nn.Embedding(50, 8)
        ids = torch.randint(0, 50, (3, 7))
        assert torch.allclose(svd_embedding(table, 8)(ids), table(ids), atol=1e-5)
        low = svd_embedding(table, 3)
        approx = (low.down.weight @ low.up.weight.T).detach()
        dropped = torch.linalg.svdvals(table.weight.detach())[3:]
        assert torch.allclose(torch.linalg.norm(table.weight.detach() - approx), dropped.norm(), rtol=1e-4)
        assert low.down.weight.shape == (50, 3) and low.up.weight.shape == (8, 3)

    def test_svd_to_size_lands_just_under_the_target_with_the_table_factorised(self):
        teacher = _bert()
        total = teacher.num_parameters()
        for share in (0.6, 0.3):
            target = int(share * total)
            model, ranks = svd_to_size(teacher, target)
            count = model.num_parameters()
            # Under the target, and within one rank step of the largest matrix of it.
            assert count <= target and target - count < 0.05 * total
            assert "bert.embeddings.word_embeddings" in ranks and "classifier" not in ranks
            with torch.no_grad():
                assert model(**_batches(1)[0]).logits.shape == (8, 2)
        assert teacher.num_parameters() == total  # the teacher is copied, not changed
        with pytest.raises(ValueError, match="rank 1 everywhere"):
            svd_to_size(teacher, 1000)

    def test_svd_to_size_factorises_a_cnn_s_block_convolutions_and_keeps_the_named_modules_whole(self):
        from hf_rmtkd import ResNetCifarConfig, ResNetCifarForImageClassification

        torch.manual_seed(0)
        teacher = ResNetCifarForImageClassification(ResNetCifarConfig(depth=8, widths=[8, 16, 32], image_size=8))
        teacher.eval()
        total = teacher.num_parameters()
        target = int(0.5 * total)
        model, ranks = svd_to_size(teacher, target, skip=RESNET_DENSE_MODULES)
        count = model.num_parameters()
        # Under the target by less than one rank of the costliest factorised convolution (C_in * 9 + C_out).
        assert count <= target and target - count < 32 * 9 + 32
        # Every block convolution, and only those: the stem `conv1` is skipped, `layer1.0.conv1` is not.
        assert set(ranks) == {f"layer{i}.0.conv{j}" for i in (1, 2, 3) for j in (1, 2)}
        assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.linear, nn.Linear)
        # One shared fraction: each rank is that fraction of its weight's parameters, in units of its rank cost.
        fractions = [
            ranks[n] * sum(s) / (s[0] * s[1])
            for n, s in (
                (n, (m.weight.shape[0], m.weight[0].numel())) for n, m in teacher.named_modules() if n in ranks
            )
        ]
        assert max(fractions) - min(fractions) < 0.25
        # The factorised model runs on images; a strided block convolution keeps its stride in the k x k factor.
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert model(pixel_values=x).logits.shape == teacher(pixel_values=x).logits.shape == (2, 10)
        factor = model.get_submodule("layer2.0.conv1")
        assert factor[0].stride == teacher.get_submodule("layer2.0.conv1").stride and factor[1].kernel_size == (1, 1)


class TestEnergyAndLayers:
    def test_energy_rank(self):
        values = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5], dtype=torch.float64)
        assert energy_rank(values, 0.5) == 1
        assert energy_rank(values, 0.8) == 2
        assert energy_rank(values, 0.95) == 4

    def test_pca_energy_keeps_more_with_more_energy(self):
        loose, ranks_loose = pca_energy(_bert(), _batches(), energy=0.5)
        tight, ranks_tight = pca_energy(_bert(), _batches(), energy=0.99)
        assert all(ranks_loose[n] <= ranks_tight[n] for n in ranks_loose)
        assert loose.num_parameters() < tight.num_parameters()

    def test_drop_layers_hits_the_closest_count_and_runs(self):
        config = tiny_config("bert", num_labels=2)
        config.num_hidden_layers = 4
        torch.manual_seed(0)
        teacher = tf.BertForSequenceClassification(config).eval()
        per_layer = sum(p.numel() for p in teacher.bert.encoder.layer[0].parameters())
        target = teacher.num_parameters() - 2 * per_layer
        model, kept = drop_layers(teacher, target)
        assert kept == {"bert.encoder.layer": [0, 3]}
        assert model.num_parameters() == target and model.config.num_hidden_layers == 2
        with torch.no_grad():
            assert model(**_batches(1)[0]).logits.shape == (8, 2)
        assert flops(model, _batches(1)[0]) < flops(teacher, _batches(1)[0])


def test_report_keeps_one_row_per_epochs_factor_and_judges_each():
    import bench_peers

    def row(accuracy, params, factor=None):
        measured = {"accuracy": accuracy, "params": params, "block_params": params // 2, "mb": 1.0, "flops": params}
        measured.update(cpu_b1_ms=10.0, cpu_b32_ms=100.0, ranks={"hidden_size": 12})
        return {**measured, "epochs_factor": factor} if factor else measured

    rows = {"teacher": row(0.85, 1000), "rmtkd": row(0.84, 700), "rmtkd_hidden_long_x8": row(0.80, 190, 8.0)}
    rows.update(rmtkd_hidden=row(0.78, 200), rmtkd_hidden_long_x3=row(0.84, 190, 3.0))
    for key in ("rmtkd_hidden", "rmtkd_hidden_long_x3", "rmtkd_hidden_long_x8"):
        rows[key]["teacher_ref"] = {"accuracy": 0.85, "cpu_b1_ms": 20.0, "cpu_b32_ms": 200.0}
    lines = bench_peers.report(rows)
    table = [line for line in lines if line.startswith("| RMT-KD")]
    assert [line.split(" | ")[0] for line in table] == [
        "| RMT-KD, defaults (bema)",
        "| RMT-KD + hidden width, defaults (bema)",
        "| RMT-KD + hidden width, 3x the epochs",
        "| RMT-KD + hidden width, 8x the epochs",
    ]
    verdicts = [line for line in lines if "whole-model parameters" in line]
    # 80% fewer at 7 points: not met; 81% fewer at 1 point: met; 81% fewer at 5 points: not met.
    assert ["NOT met" not in v for v in verdicts] == [False, True, False]
    del rows["rmtkd"]  # targets are still judged without the plain RMT-KD row
    assert len([line for line in bench_peers.report(rows) if "whole-model parameters" in line]) == 3


class TestMeasure:
    def test_a_row_is_timed_beside_its_reference_and_compared_with_it(self, tmp_path):
        import bench_peers
        from testing_utils import tiny_image_task, tiny_resnet

        from hf_rmtkd import RMTKDTrainingArguments

        args = RMTKDTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=4, report_to=[]
        )
        teacher, student = tiny_resnet(0), tiny_resnet(1)
        task = tiny_image_task()
        teacher_row = bench_peers.measure(teacher, task, args, repeats=2)
        row = bench_peers.measure(student, task, args, repeats=2, reference=teacher)
        assert "reference_ms" not in teacher_row
        assert set(row["reference_ms"]) == {"cpu_b1_ms", "cpu_b32_ms"}
        assert all(row[k] > 0 and row["reference_ms"][k] > 0 for k in ("cpu_b1_ms", "cpu_b32_ms"))
        paired = dict(row["reference_ms"])
        ref = bench_peers.teacher_ref(row, teacher_row)
        # Accuracy from the invocation's teacher; latency from the timing beside the row, which leaves the row.
        assert ref == {"accuracy": teacher_row["accuracy"], **paired}
        assert "reference_ms" not in row

    def test_without_a_paired_timing_the_teacher_row_s_own_latency_is_the_reference(self):
        import bench_peers

        teacher = {"accuracy": 0.9, "params": 10, "cpu_b1_ms": 2.0, "cpu_b32_ms": 20.0}
        assert bench_peers.teacher_ref({"accuracy": 0.8}, teacher) == {
            "accuracy": 0.9,
            "cpu_b1_ms": 2.0,
            "cpu_b32_ms": 20.0,
        }
        paired = {"accuracy": 0.8, "reference_ms": {"cpu_b1_ms": 3.0, "cpu_b32_ms": 30.0}}
        assert bench_peers.teacher_ref(paired, teacher) == {"accuracy": 0.9, "cpu_b1_ms": 3.0, "cpu_b32_ms": 30.0}
