"""device_resnet56_cifar10.sh, the ResNet-56 script a GPU session runs, end to end on CPU with a stand-in: a random
ResNet-20 in the akamaster checkpoint format and 24 random images a split, so a broken invocation is found here and not
on borrowed device time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from testing_utils import image_blobs, run_device_script, write_image_parquet

from hf_rmtkd import ResNetCifarConfig, ResNetCifarForImageClassification


def _stage(root: Path) -> None:
    """`root/resnet_cifar10/resnet56-4bfd9763.th` (a random ResNet-20 as DataParallel saved it) and
    `root/cifar10_jpeg/{train,test}.parquet`, the layout pack_for_device.py stages."""
    torch.manual_seed(0)
    model = ResNetCifarForImageClassification(ResNetCifarConfig(depth=20))
    (root / "resnet_cifar10").mkdir(parents=True)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, root / "resnet_cifar10" / "resnet56-4bfd9763.th")
    (root / "cifar10_jpeg").mkdir()
    for seed, split in enumerate(("train", "test")):
        write_image_parquet(root / "cifar10_jpeg" / f"{split}.parquet", image_blobs(24, size=32, seed=seed))


def test_the_resnet56_device_script_runs_every_row_end_to_end(tmp_path):
    _stage(tmp_path)
    out, run = tmp_path / "out", tmp_path / "run"
    extra = ["--teacher_epochs", "1", "--max_steps", "1", "--per_device_train_batch_size", "8"]
    extra += ["--calibration_samples", "16", "--latency_repeats", "1", "--dataloader_num_workers", "0"]
    finished = run_device_script("device_resnet56_cifar10.sh", tmp_path, out, run, extra)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    stored = json.loads((out / "results.json").read_text())
    rows = {"rmtkd_conv@0", "rmtkd_conv_q75@0"}
    rows |= {f"{b}(rmtkd_conv@0)@0" for b in ("svd", "layer_drop", "svd_size")} | {"svd_size(rmtkd_conv_q75@0)@0"}
    assert rows | {"teacher"} <= set(stored)
    # The second pair is the smaller one, and its SVD baseline is matched to it, not to the first pair.
    assert stored["rmtkd_conv_q75@0"]["params"] < stored["rmtkd_conv@0"]["params"] < stored["teacher"]["params"]
    assert stored["svd_size(rmtkd_conv_q75@0)@0"]["params"] <= stored["rmtkd_conv_q75@0"]["params"]
    report = (out / "recovery_resnet56_cifar10_gpu.md").read_text()
    assert "CIFAR-10" in report and "0.75 quantile" in report
