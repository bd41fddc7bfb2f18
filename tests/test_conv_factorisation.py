"""Factorised convolutions (`convolutions="factorize"`): sites, the MP rank on a planted low-rank output, exact
surgery, the record, save/load with the Auto classes, a second compression, and the trainer option."""

import copy

import pytest
import torch
import transformers as tf
from testing_utils import random_images, tiny_resnet
from torch import nn

import hf_rmtkd
from hf_rmtkd.layers import LowRankConv2d
from hf_rmtkd.model_card import reduced_module_rows
from hf_rmtkd.records import ConvRecord, record_from_dict
from hf_rmtkd.sites import find_sites, select_sites, site_kinds
from hf_rmtkd.surgery import reduce_site


FACTORIZE = site_kinds(convolutions="factorize")


def _plant_rank(conv: nn.Conv2d, rank: int, seed: int = 0) -> None:
    """Make `conv`'s output channels combinations of `rank` of its filters."""
    generator = torch.Generator().manual_seed(seed)
    weight = conv.weight
    basis = weight[:rank].clone()
    mixing = torch.randn(weight.shape[0], rank, generator=generator)
    with torch.no_grad():
        weight.copy_(torch.einsum("or,riyx->oiyx", mixing, basis))


class TestConvSites:
    def test_every_block_conv_is_a_site_and_conv_blocks_are_not(self):
        sites = find_sites(tiny_resnet(), FACTORIZE)
        assert [(s.name, s.kind, s.dim) for s in sites] == [
            (f"layer{i}.0.conv{j}", "conv", w) for i, w in ((1, 4), (2, 8), (3, 16)) for j in (1, 2)
        ]

    def test_a_named_conv_is_a_conv_site_only_when_factorising(self):
        model = tiny_resnet()
        assert [s.kind for s in select_sites(model, ["layer2.0.conv1"], FACTORIZE)] == ["conv"]
        # By default the same name selects the block's inner channels (conv1 is a producer).
        assert [s.kind for s in select_sites(model, ["layer2.0.conv1"])] == ["ffn"]

    def test_bad_convolutions_value_names_the_field(self):
        with pytest.raises(ValueError, match="`convolutions` must be one of .*'factorise'"):
            site_kinds(convolutions="factorise")
        with pytest.raises(ValueError, match="reduction_convolutions"):
            hf_rmtkd.RMTKDTrainingArguments(output_dir="unused", reduction_convolutions="low_rank")

    def test_grouped_convolution_is_refused_by_name(self):
        model = tiny_resnet()
        old = model.layer2[0].conv2
        model.layer2[0].conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        assert "layer2.0.conv2" not in {s.name for s in find_sites(model, FACTORIZE)}
        with pytest.raises(ValueError, match="groups=2"):
            select_sites(model, ["layer2.0.conv2"], FACTORIZE)
        model.layer2[0].conv2 = old


class TestConvSurgery:
    def test_mp_rule_finds_planted_spikes(self):
        # White-noise images through a conv whose kernel rows are orthogonal: with stride = kernel the patches do not
        # overlap, so the output samples are independent with covariance sigma^2 I + A A^T (3 spikes of 10 sigma^2).
        generator = torch.Generator().manual_seed(0)
        conv = nn.Conv2d(16, 24, 3, stride=3, bias=False)
        q, _ = torch.linalg.qr(torch.randn(16 * 9, 16 * 9, generator=generator))
        spikes, _ = torch.linalg.qr(torch.randn(24, 3, generator=generator))
        weight = 0.5 * q[:24] + spikes @ (0.5 * 10**0.5 * q[24:27])
        with torch.no_grad():
            conv.weight.copy_(weight.reshape(24, 16, 3, 3))
        model = nn.Sequential(nn.Sequential(conv))  # "0.0": a path with a block index
        images = [torch.randn(64, 16, 15, 15, generator=generator) for _ in range(2)]
        report = hf_rmtkd.analyze(model, images, convolutions="factorize", progress=False)
        site = report["0.0"]
        assert (site.kind, site.dim, site.n_samples) == ("conv", 24, 2 * 64 * 5 * 5)
        assert site.rank == 3
        assert site.sigma2 == pytest.approx(0.25, rel=0.1)

    def test_exact_on_a_low_rank_output_with_stride_and_bias(self):
        model = tiny_resnet()
        # The block's first conv (stride 2, padding 1), with a bias, its 8 output channels combinations of 3 filters.
        model.layer2[0].conv1 = conv = nn.Conv2d(4, 8, 3, 2, 1, bias=True).eval()
        _plant_rank(conv, rank=3, seed=1)
        with torch.no_grad():
            conv.bias.uniform_(-0.5, 0.5)  # not in the kept span: carried by the mean correction
        images = random_images()
        with torch.no_grad():
            reference = model(images).logits
        report = hf_rmtkd.analyze(
            model, [random_images(seed=2)], target_modules=["layer2.0.conv1"], convolutions="factorize", progress=False
        )
        site = report["layer2.0.conv1"]
        site.rank = 3
        record = reduce_site(model, site)
        assert isinstance(record, ConvRecord) and (record.in_features, record.out_features, record.rank) == (4, 8, 3)
        new = model.layer2[0].conv1
        assert isinstance(new, LowRankConv2d) and new.down.stride == (2, 2) and new.down.padding == (1, 1)
        with torch.no_grad():
            torch.testing.assert_close(model(images).logits, reference, rtol=0, atol=1e-5)

    def test_a_rank_that_saves_nothing_leaves_the_conv_dense(self):
        # A 1 x 1 conv 8 -> 8: rank k costs k (8 + 8) weights against 64, so only k <= 3 saves.
        model = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 1)))
        images = [torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))]
        site = hf_rmtkd.analyze(model, images, convolutions="factorize", progress=False)["0.0"]
        site.rank = 4
        assert reduce_site(model, site) is None and type(model[0][0]) is nn.Conv2d
        site.rank = 3
        assert reduce_site(model, site).rank == 3 and isinstance(model[0][0], LowRankConv2d)
        # The kernel counts: a 3 x 3 conv 4 -> 4 at rank 3 is 3 (4 * 9 + 4) = 120 weights against 144.
        model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)))
        site = hf_rmtkd.analyze(model, [images[0][:, :4]], convolutions="factorize", progress=False)["0.0"]
        site.rank = 3
        assert reduce_site(model, site).rank == 3

    def test_record_round_trips_through_a_dict(self):
        record = ConvRecord(in_features=8, out_features=16, rank=4, bias=True, dim=16)
        again = record_from_dict(record.to_dict())
        assert isinstance(again, ConvRecord) and again == record


class TestConvCompress:
    def test_compress_saves_reloads_and_compresses_again(self, tmp_path):
        model = tiny_resnet()
        before = model.num_parameters()
        compressed = hf_rmtkd.compress(
            model, [random_images(64, seed=2)], convolutions="factorize", progress=False
        ).eval()
        records = compressed.config.reduced_modules
        assert records and all(isinstance(r, ConvRecord) for r in records.values())
        assert compressed.num_parameters() < before
        compressed.save_pretrained(tmp_path / "once")
        reloaded = tf.AutoModelForImageClassification.from_pretrained(tmp_path / "once").eval()
        images = random_images(seed=3)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(images).logits, compressed(images).logits, rtol=0, atol=1e-6)
        assert isinstance(reloaded.model.layer3[0].conv1, LowRankConv2d)
        rows = {row["name"]: row for row in reduced_module_rows(reloaded.config)}
        assert (rows["layer3.0.conv1"]["kind"], rows["layer3.0.conv1"]["form"]) == ("conv", "factorised convolution")
        # A second round refactorises a LowRankConv2d from the dense map it computes, never nesting.
        path = "layer3.0.conv1"
        rank = records[path].rank
        report = hf_rmtkd.analyze(
            reloaded, [random_images(64, seed=4)], target_modules=[path], convolutions="factorize", progress=False
        )
        assert report[path].rank <= rank  # the output of a rank-k factorisation has at most k directions
        site = report[path]
        site.rank = rank - 1
        inner = copy.deepcopy(reloaded.model)  # reduce_site alone writes no record: keep `reloaded` consistent
        assert reduce_site(inner, site).rank == rank - 1
        conv = inner.layer3[0].conv1
        assert isinstance(conv, LowRankConv2d) and conv.rank == rank - 1 and type(conv.down) is nn.Conv2d
        twice = hf_rmtkd.compress(
            reloaded, [random_images(64, seed=4)], target_modules=["layer3.0.conv2"], convolutions="factorize",
            progress=False,
        )  # fmt: skip
        twice.save_pretrained(tmp_path / "twice")
        again = tf.AutoModelForImageClassification.from_pretrained(tmp_path / "twice").eval()
        with torch.no_grad():
            torch.testing.assert_close(again(images).logits, twice.eval()(images).logits, rtol=0, atol=1e-6)


def test_trainer_factorises_block_convolutions_and_saves_a_loadable_model(tmp_path):
    from datasets import Dataset
    from testing_utils import trainer_args

    model = tiny_resnet().train()
    images = random_images(64, seed=5)
    data = Dataset.from_dict(
        {"pixel_values": images.tolist(), "labels": (images[:, 0].mean((1, 2)) > 0).long().tolist()}
    )
    args = trainer_args(
        tmp_path, max_steps=4, reduction_schedule="all_at_once", reduction_convolutions="factorize",
        distillation_hidden_weight=1.0,
    )  # fmt: skip
    trainer = hf_rmtkd.RMTKDTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    records = trainer.model.config.reduced_modules
    assert len(records) == 6 and all(isinstance(r, ConvRecord) for r in records.values())
    trainer.save_model(tmp_path / "saved")
    reloaded = tf.AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    check = random_images(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(check).logits, trainer.model.eval()(check).logits, rtol=0, atol=1e-5)
