"""A benchmark row killed mid-training resumes from its last checkpoint instead of starting over."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_utils import BENCHMARKS, tiny_image_task, tiny_resnet

from hf_rmtkd import RMTKDTrainingArguments


sys.path.insert(0, str(BENCHMARKS))
import bench_recovery  # noqa: E402


def _args(tmp_path):
    return RMTKDTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=2, save_steps=1, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, report_to=[], disable_tqdm=True,
    )  # fmt: skip


def _mark(checkpoint: Path, value: float) -> None:
    """Write `value` into the classifier bias of the checkpoint's weights: only a run that resumes from it sees it."""
    weights = load_file(checkpoint / "model.safetensors")
    key = next(k for k in weights if k.endswith("linear.bias"))
    weights[key] = torch.full_like(weights[key], value)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})


def test_a_baseline_row_resumes_from_its_last_checkpoint(tmp_path):
    teacher, task, args = tiny_resnet(0), tiny_image_task(), _args(tmp_path)
    target = int(0.6 * teacher.num_parameters())
    run = lambda: bench_recovery.run_baseline("svd_size", 0, teacher, task, args, {}, "rmtkd_conv@0", target)  # noqa: E731
    model, _ = run()
    folder = tmp_path / "svd_size-rmtkd_conv-seed0-seed0"
    assert bench_recovery.last_checkpoint(folder) == str(folder / "checkpoint-2")
    assert not (_bias(model) == 7.0).all()
    _mark(folder / "checkpoint-2", 7.0)
    # Same row again: it finds step 2 of 2 done and trains no further, so it ends on the checkpoint's weights.
    model, _ = run()
    assert (_bias(model) == 7.0).all()


def test_a_baseline_row_keeps_its_trained_weights_for_later(tmp_path):
    teacher, task, args = tiny_resnet(0), tiny_image_task(), _args(tmp_path)
    target = int(0.6 * teacher.num_parameters())
    row = ("svd_size", 0, teacher, task, args, {}, "rmtkd_conv@0", target)
    with pytest.raises(FileNotFoundError, match="saved no weights"):
        bench_recovery.load_baseline(*row)
    trained, _ = bench_recovery.run_baseline(*row)
    bench_recovery.drop_checkpoints(tmp_path / "svd_size-rmtkd_conv-seed0-seed0")
    loaded = bench_recovery.load_baseline(*row)
    untrained, _ = bench_recovery.build_baseline("svd_size", teacher, task, args, {}, "rmtkd_conv@0", target)
    images = task.inputs(4, "cpu")
    with torch.no_grad():
        expected = trained.eval()(**images).logits
        assert torch.equal(loaded(**images).logits, expected)
        assert not torch.allclose(untrained.eval()(**images).logits, expected)


def _bias(model) -> torch.Tensor:
    return next(v for k, v in model.state_dict().items() if k.endswith("linear.bias"))


def test_no_folder_or_no_checkpoint_means_a_fresh_start(tmp_path):
    assert bench_recovery.last_checkpoint(tmp_path / "missing") is None
    assert bench_recovery.last_checkpoint(tmp_path) is None


def test_a_recipe_row_resumes_with_its_reductions_rebuilt(tmp_path):
    teacher, task, args = tiny_resnet(0), tiny_image_task(), _args(tmp_path)
    args.calibration_samples = 12
    model, detail = bench_recovery.run_recipe("rmtkd_conv", 0, teacher, task, args)
    folder = tmp_path / "rmtkd_conv-seed0"
    assert bench_recovery.last_checkpoint(folder) == str(folder / "checkpoint-2")
    _mark(folder / "checkpoint-2", 7.0)
    resumed, again = bench_recovery.run_recipe("rmtkd_conv", 0, teacher, task, args)
    # The reduced structure is rebuilt from the checkpoint's record, and its weights are the checkpoint's.
    assert again["ranks"] == detail["ranks"] and again["ranks"]
    assert (_bias(resumed) == 7.0).all()


def test_a_stored_row_s_checkpoints_are_dropped_and_its_model_kept(tmp_path):
    args = _args(tmp_path)
    folder = bench_recovery.row_folder(args, "rmtkd_conv", 1, "")
    assert folder == tmp_path / "rmtkd_conv-seed1"
    assert bench_recovery.row_folder(args, "svd", 0, "rmtkd_conv@1") == tmp_path / "svd-rmtkd_conv-seed1-seed0"
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"0")
    (folder / "model.safetensors").write_bytes(b"0")
    bench_recovery.drop_checkpoints(folder)
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
    assert bench_recovery.last_checkpoint(folder) is None
