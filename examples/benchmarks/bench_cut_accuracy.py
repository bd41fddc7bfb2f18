"""Accuracy at the cut, before any training: RMT-KD's channel selection (or factorised convolutions) against truncated
SVD at the same per-block parameters and against truncated SVD at one shared fraction of every block convolution
(its own rank allocation) at the same whole-model parameters, on a CIFAR ResNet. Separates what each structure loses
when cut from what it learns back in recovery.

    python examples/benchmarks/bench_cut_accuracy.py --teacher outputs/recovery-cifar10-cpu/teacher \\
        --data_dir ../shared/data/cifar10_jpeg --target_modules '.*layer[23]\\.\\d+\\.conv1' \\
        --results_file examples/benchmarks/results/cut_accuracy_resnet56_cifar10.md
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peers import svd_like, svd_to_size
from tasks import RESNET_DENSE_MODULES
from transformers import AutoModelForImageClassification, HfArgumentParser, default_data_collator

import hf_rmtkd
from hf_rmtkd.example_data import CifarImages, read_split
from hf_rmtkd.reporting import machine_line, write_results


STRUCTURES = {"channels": "channel selection", "factorize": "factorised convolutions, output PCA"}


@dataclass
class CutArguments:
    teacher: str = field(
        metadata={"help": "A fine-tuned CIFAR ResNet folder (bench_recovery's `<output_dir>/teacher`)."}
    )
    data_dir: str = field(metadata={"help": "CIFAR-10 JPEG folder with train.parquet and test.parquet."})
    target_modules: str | None = field(default=None, metadata={"help": "Sites to reduce (regex); default all."})
    convolutions: str = field(
        default="channels",
        metadata={"help": "'channels' (inner channels kept) or 'factorize' (each conv factorised)."},
    )
    estimator: str = field(default="bema", metadata={"help": "Noise-level estimator of the MP edge (see `analyze`)."})
    tau: float = field(default=0.5, metadata={"help": "Quantile for the 'quantile' and 'mp_fit' estimators."})
    calibration_samples: int = field(default=2000, metadata={"help": "Training images for the spectra."})
    eval_samples: int = field(default=3000, metadata={"help": "Test images scored (the first ones)."})
    results_file: str | None = field(default=None, metadata={"help": "Markdown file for the table."})


def accuracy(model, batches) -> float:
    """Top-1 accuracy in % of `model` over `batches` of `pixel_values` (B, 3, 32, 32) and `labels` (B,)."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in batches:
            right += (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    return 100 * right / total


def main(args: CutArguments) -> None:
    teacher = AutoModelForImageClassification.from_pretrained(args.teacher).eval()
    mean, std = teacher.config.image_mean, teacher.config.image_std
    root = Path(args.data_dir)

    def loader(split, n):
        x, y = read_split(root / f"{split}.parquet", None, 0)
        images = CifarImages(x[:n], y[:n], mean, std, train=False)
        return list(torch.utils.data.DataLoader(images, batch_size=250, collate_fn=default_data_collator))

    calibration, test = loader("train", args.calibration_samples), loader("test", args.eval_samples)
    total = sum(p.numel() for p in teacher.parameters())
    ours = hf_rmtkd.compress(
        copy.deepcopy(teacher),
        calibration,
        target_modules=args.target_modules,
        progress=False,
        convolutions=args.convolutions,
        estimator=args.estimator,
        tau=args.tau,
    )
    svd, _ = svd_like(teacher, ours.config.reduced_modules, ours.model)
    uniform, _ = svd_to_size(teacher, sum(p.numel() for p in ours.parameters()), skip=RESNET_DENSE_MODULES)
    lines = [
        "# Accuracy at the cut, before any training",
        "",
        machine_line(),
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Teacher {args.teacher}; {args.calibration_samples:,} training images for the spectra; the first "
        f"{args.eval_samples:,} test images scored. MP edge: estimator {args.estimator!r} (tau {args.tau:g}).",
        "",
        "| model | accuracy (%) | whole params |",
        "|---|---|---|",
    ]
    for name, model in (
        ("teacher", teacher),
        (f"RMT-KD, MP ranks ({STRUCTURES[args.convolutions]})", ours),
        ("truncated SVD, same per-block parameters", svd),
        ("truncated SVD, one shared fraction of every block convolution, same whole-model parameters", uniform),
    ):
        params = sum(p.numel() for p in model.parameters())
        lines.append(
            f"| {name} | {accuracy(model, test):.2f} | {params:,} ({100 * (1 - params / total):.1f}% fewer) |"
        )
    write_results(args.results_file, lines)


if __name__ == "__main__":
    main(*HfArgumentParser(CutArguments).parse_args_into_dataclasses())
