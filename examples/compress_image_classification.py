"""Fine-tune a CIFAR-10 ResNet on the JPEG copy of CIFAR-10, compress it with RMTKDTrainer, and report before/after.

RMT-KD's CNN site: the inner channels of every residual block (conv1 -> BN -> ReLU -> conv2), with the activation
covariance taken over spatial positions. The checkpoints are akamaster/pytorch_resnet_cifar10's (ResNet-20/56), the
data the parquet files of `cifar10_jpeg` (JPEG bytes and labels). From the repository root, with ../shared/data:

    python examples/compress_image_classification.py \\
        --checkpoint ../shared/data/resnet_cifar10/resnet56-4bfd9763.th --data_dir ../shared/data/cifar10_jpeg \\
        --output_dir outputs/resnet56-rmtkd --results_file examples/benchmarks/results/resnet56_cifar10_jpeg.md

A GPU makes this minutes; on 2 CPU cores use `--max_train_samples 5000 --finetune_epochs 1 --num_train_epochs 1`.
Every `RMTKDTrainingArguments` field is a flag too (`--distillation_alpha 0.5 --reduction_estimator mp_fit ...`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.example_data import CifarImages, read_split
from hf_rmtkd.latency import time_forward_ms
from hf_rmtkd.model_card import model_size_mb
from hf_rmtkd.models.resnet_cifar import load_original_checkpoint
from hf_rmtkd.reporting import accuracy, machine_line, write_results
from hf_rmtkd.training_args import plain_training_args


@dataclass
class ModelArguments:
    checkpoint: str = field(metadata={"help": "akamaster ResNet checkpoint, e.g. resnet56-4bfd9763.th."})
    finetune_epochs: float = field(default=15.0, metadata={"help": "Plain fine-tuning epochs on the JPEG data."})
    finetune_learning_rate: float = field(default=1e-3)


@dataclass
class DataArguments:
    data_dir: str = field(metadata={"help": "Folder with train.parquet and test.parquet (JPEG bytes and label)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded subset of the training set."})
    max_eval_samples: int | None = field(default=None)


@dataclass
class ScriptArguments:
    results_file: str | None = field(default=None, metadata={"help": "Markdown file for the before/after table."})
    latency_repeats: int = field(default=30)


def measure(model, trainer, eval_set, repeats: int) -> dict:
    metrics = trainer.evaluate(eval_set)
    row = {"accuracy": metrics["eval_accuracy"], "params": sum(p.numel() for p in model.parameters())}
    row["mb"] = model_size_mb(model)
    model.eval()
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        model.to(device)
        for batch in (1, 32):
            images = torch.randn(batch, 3, 32, 32, device=device)
            row[f"{device}{batch}"] = time_forward_ms(model, {"pixel_values": images}, repeats)
    model.to(trainer.args.device)
    return row


def main(model_args: ModelArguments, data: DataArguments, script: ScriptArguments, args: RMTKDTrainingArguments):
    start = time.perf_counter()
    model = load_original_checkpoint(model_args.checkpoint)
    mean, std = model.config.image_mean, model.config.image_std
    train_x, train_y = read_split(Path(data.data_dir) / "train.parquet", data.max_train_samples, args.seed)
    test_x, test_y = read_split(Path(data.data_dir) / "test.parquet", data.max_eval_samples, args.seed)
    train = CifarImages(train_x, train_y, mean, std, train=True)
    test = CifarImages(test_x, test_y, mean, std, train=False)

    # 1. The teacher: the published checkpoint fine-tuned on the JPEG copy (plain Trainer, cross-entropy only).
    teacher_trainer = Trainer(
        model=model,
        args=plain_training_args(args, model_args.finetune_epochs, model_args.finetune_learning_rate),
        train_dataset=train,
        compute_metrics=accuracy,
    )
    published = teacher_trainer.evaluate(test)["eval_accuracy"]
    teacher_trainer.train()
    before = measure(model, teacher_trainer, test, script.latency_repeats)

    # 2. RMT-KD: every block's inner channels, shallow to deep, each reduction followed by self-distillation.
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=train, compute_metrics=accuracy)
    trainer.train()
    trainer.save_model()
    after = measure(trainer.model, trainer, test, script.latency_repeats)
    lines = report(model_args, data, args, published, before, after, time.perf_counter() - start)
    write_results(script.results_file, lines)


def report(model_args, data, args, published: float, before: dict, after: dict, seconds: float) -> list[str]:
    """The before/after table as markdown lines."""
    name = Path(model_args.checkpoint).name.split("-")[0]
    rows = [
        (
            "accuracy (%)",
            f"{100 * before['accuracy']:.2f}",
            f"{100 * after['accuracy']:.2f}",
            f"{100 * (after['accuracy'] - before['accuracy']):+.2f} points",
        ),
        (
            "parameters",
            f"{before['params']:,}",
            f"{after['params']:,}",
            f"{after['params'] / before['params']:.3f}x ({100 * (1 - after['params'] / before['params']):.1f}% fewer)",
        ),
        ("size (MB)", f"{before['mb']:.2f}", f"{after['mb']:.2f}", f"{after['mb'] / before['mb']:.3f}x"),
    ]
    for key in [k for k in before if k.startswith(("cpu", "cuda"))]:
        device, batch = ("CPU", key[3:]) if key.startswith("cpu") else ("GPU", key[4:])
        rows.append(
            (
                f"{device} latency, batch {batch} (ms)",
                f"{before[key]:.2f}",
                f"{after[key]:.2f}",
                f"{before[key] / after[key]:.2f}x faster",
            )
        )
    return [
        f"# {name} on CIFAR-10 (JPEG): fine-tuned teacher vs RMTKDTrainer",
        "",
        machine_line(),
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Data: {data.data_dir}, train {data.max_train_samples or 'all 50,000'}, test "
        f"{data.max_eval_samples or 'all 10,000'} images. Published checkpoint before fine-tuning: "
        f"{100 * published:.2f}% on this test set. Teacher: {model_args.finetune_epochs:g} epochs of plain fine-tuning; "
        f"RMT-KD: {args.num_train_epochs:g} epochs, alpha {args.distillation_alpha}, estimator "
        f"{args.reduction_estimator}, schedule {args.reduction_schedule}. Wall time {seconds / 60:.1f} min.",
        "",
        "| | teacher | RMT-KD | ratio |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
    ]


if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, DataArguments, ScriptArguments, RMTKDTrainingArguments))
    parser.set_defaults(
        output_dir="outputs/resnet-cifar10-rmtkd",
        num_train_epochs=15,
        learning_rate=1e-3,
        weight_decay=5e-4,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=512,
        lr_scheduler_type="cosine",
        calibration_samples=512,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=0,
    )
    main(*parser.parse_args_into_dataclasses())
