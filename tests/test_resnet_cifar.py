"""CIFAR ResNets: the original checkpoints load with no missing key; conv-block inner channels reduce and round-trip."""

import pytest
import torch
import transformers as tf
from conftest import SHARED_DATA
from testing_utils import random_images, tiny_resnet

import hf_rmtkd
from hf_rmtkd import ResNetCifarConfig
from hf_rmtkd.models.resnet_cifar import load_original_checkpoint
from hf_rmtkd.sites import find_sites
from hf_rmtkd.surgery import reduce_site


class TestResNetCifar:
    def test_bad_depth_raises(self):
        with pytest.raises(ValueError, match="`depth` must be 6 n \\+ 2"):
            ResNetCifarConfig(depth=21)

    def test_block_inner_widths_are_the_default_sites(self):
        sites = find_sites(tiny_resnet())
        assert [(s.name, s.kind, s.dim, s.producers) for s in sites] == [
            (f"layer{i}.0.conv2", "ffn", w, [f"layer{i}.0.conv1", f"layer{i}.0.bn1"])
            for i, w in ((1, 4), (2, 8), (3, 16))
        ]

    def test_redundant_channels_are_removed_exactly(self):
        model = tiny_resnet()
        block = model.layer2[0]
        with torch.no_grad():  # channels 3..7 copy channels 0..2: the inner activation has rank 3
            source = torch.arange(8) % 3
            block.conv1.weight.copy_(block.conv1.weight[source])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(block.bn1, name).copy_(getattr(block.bn1, name)[source])
        images = random_images()
        with torch.no_grad():
            reference = model(images).logits
        report = hf_rmtkd.analyze(model, [random_images(seed=1)], target_modules=["layer2.0.conv2"], progress=False)
        site = report["layer2.0.conv2"]
        assert site.n_samples == 16 * 4 * 4  # one sample per spatial position of conv2's input
        site.rank = 3
        record = reduce_site(model, site)
        assert record.rank == 3 and record.in_features == 8
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == 3
        with torch.no_grad():
            torch.testing.assert_close(model(images).logits, reference, rtol=0, atol=1e-5)

    def test_compress_save_and_reload_with_auto_class(self, tmp_path):
        model = tiny_resnet()
        before = model.num_parameters()
        compressed = hf_rmtkd.compress(model, [random_images(64, seed=2)], progress=False, min_rank=2).eval()
        assert type(compressed).__name__ == "RMTKDForImageClassification"
        assert compressed.num_parameters() < before
        compressed.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        images = random_images(seed=3)
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(pixel_values=images).logits, compressed(pixel_values=images).logits, rtol=0, atol=1e-5
            )
        assert reloaded.num_parameters() == compressed.num_parameters()

    def test_project_method_is_refused_for_conv_blocks(self):
        model = tiny_resnet()
        with pytest.raises(ValueError, match="not defined for the convolutional block 'layer1.0.conv2'"):
            hf_rmtkd.compress(model, [random_images()], ffn_method="project", progress=False)


@pytest.mark.skipif(not (SHARED_DATA / "resnet_cifar10").exists(), reason="needs ../shared/data/resnet_cifar10")
@pytest.mark.parametrize("depth", [20, 56])
def test_original_checkpoints_load_with_no_missing_key(depth):
    path = next((SHARED_DATA / "resnet_cifar10").glob(f"resnet{depth}-*.th"))
    model = load_original_checkpoint(path)
    assert model.config.depth == depth
    assert model.num_parameters() == {20: 269_722, 56: 853_018}[depth]
