"""Recovery of a compressed real decoder by distillation: SmolLM2-135M on WikiText-2, on CPU (or a GPU when lent).

For each compression plan (the MP rule, the MP rule with a per-site output-error budget) the teacher is compressed
with `hf_rmtkd.compress` exactly as in `bench_decoder.py`, its perplexity measured, and then `RMTKDTrainer`
distils it from the uncompressed teacher (`distillation_teacher="external"`, no further reductions:
`alpha * CE + (1 - alpha) * KL` on next-token logits) for `--max_steps` optimizer steps on 256-token windows of the
WikiText-2 validation split that follow the calibration tokens. Perplexity is always scored on the raw test split,
which neither calibration nor recovery sees. Rows: perplexity before and after, whole-model parameters, greedy
generations, recovery minutes and tokens.

Resumable: rows accumulate in `<output_dir>/results.json`; a plan already there is skipped.

    python examples/benchmarks/bench_decoder_recovery.py --data_dir ../shared/data/wikitext2 \
        --plans "mp+budget 0.1,mp" --max_steps 80 --per_device_train_batch_size 4 --learning_rate 1e-4 --warmup_steps 8 \
        --output_dir outputs/decoder-recovery --report_to none --save_strategy no --logging_steps 10 \
        --results_file examples/benchmarks/results/decoder_recovery_smollm2.md
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_decoder import (
    TARGET,
    calibration_set,
    generation_lines,
    generations,
    load_teacher,
    perplexity,
    timed_compress,
    token_windows,
    verdict,
)
from bench_peers import trainable
from transformers import HfArgumentParser

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.reporting import machine_line, open_store, publish, report_header


@dataclass
class DecoderRecoveryArguments:
    data_dir: str = field(default="", metadata={"help": "Folder with wiki.test.raw and valid.tokens."})
    plans: str = field(
        default="mp,mp+budget 0.03",
        metadata={"help": "Comma-separated: 'mp' (compress defaults) or 'mp+budget B' (max_output_error=B)."},
    )
    calibration_tokens: int = field(default=16384, metadata={"help": "Calibration tokens (valid split)."})
    sequence_length: int = field(default=256, metadata={"help": "Tokens per sequence and eval window."})
    eval_windows: int = field(default=16, metadata={"help": "Non-overlapping test windows scored."})
    new_tokens: int = field(default=24, metadata={"help": "Greedy tokens per prompt."})
    results_file: str | None = field(default=None)

    def __post_init__(self):
        self.plan_kwargs()  # a misspelt plan fails before the model loads
        if not (Path(self.data_dir) / "wiki.test.raw").is_file():
            raise ValueError(f"`data_dir` {self.data_dir!r} has no wiki.test.raw (see ../shared/data/wikitext2).")

    def plan_kwargs(self) -> dict[str, dict]:
        """`compress` keyword arguments of every plan, by the plan's row name."""
        plans = {}
        for plan in [p.strip() for p in self.plans.split(",") if p.strip()]:
            if plan == "mp":
                plans[plan] = {}
            elif plan.startswith("mp+budget "):
                try:
                    plans[plan] = {"max_output_error": float(plan.split(" ", 1)[1])}
                except ValueError:
                    raise ValueError(
                        f"`plans` entry {plan!r}: the budget must be a number, as in 'mp+budget 0.03'."
                    ) from None
            else:
                raise ValueError(f"`plans` entry {plan!r} is unknown; allowed: 'mp' or 'mp+budget <float>'.")
        return plans


def recovery_windows(tokenizer, text: str, bench: DecoderRecoveryArguments, count: int) -> list[dict]:
    """`count` training examples: the 256-token windows of `text` after the calibration tokens, labels = inputs."""
    skip = bench.calibration_tokens // bench.sequence_length
    windows = token_windows(tokenizer, text, bench.sequence_length, skip + count)[skip:]
    if len(windows) < count:
        raise ValueError(f"The validation split holds {len(windows)} windows after calibration; {count} needed.")
    return [{"input_ids": w[0], "labels": w[0]} for w in windows]


def main(bench: DecoderRecoveryArguments, args: RMTKDTrainingArguments) -> None:
    store, rows = open_store(args.output_dir)
    teacher, tokenizer = load_teacher()
    data = Path(bench.data_dir)
    valid = (data / "valid.tokens").read_text()
    calibration_ids, calibration = calibration_set(tokenizer, valid, bench.sequence_length, bench.calibration_tokens)
    windows = token_windows(tokenizer, (data / "wiki.test.raw").read_text(), bench.sequence_length, bench.eval_windows)
    examples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    train = recovery_windows(tokenizer, valid, bench, examples)
    if "teacher" not in rows:
        rows["teacher"] = {"ppl": perplexity(teacher, windows), "params": teacher.num_parameters()}
        rows["teacher"]["generations"] = generations(teacher, tokenizer, bench.new_tokens)
    for name, kwargs in bench.plan_kwargs().items():
        key = f"{name}, {args.max_steps} steps"
        if key in rows:
            continue
        model, cost = timed_compress(teacher, calibration, **kwargs)
        before = perplexity(model, windows)
        began = time.perf_counter()
        recovery_args = dataclasses.replace(
            args,
            output_dir=str(Path(args.output_dir) / key.replace(",", "").replace(" ", "_")),
            reduction_schedule="none",
            distillation_teacher="external",
        )
        trainer = RMTKDTrainer(model=trainable(model), args=recovery_args, train_dataset=train, teacher_model=teacher)
        trainer.train()
        minutes = (time.perf_counter() - began) / 60
        model = trainer.model.eval()
        last = [h for h in trainer.state.log_history if "kl_loss" in h]
        rows[key] = {
            "ppl_before": before,
            "ppl": perplexity(model, windows),
            "params": model.num_parameters(),
            "recovery_minutes": minutes,
            "recovery_tokens": examples * bench.sequence_length,
            "generations": generations(model, tokenizer, bench.new_tokens),
            "losses": {k: v for k, v in (last[-1] if last else {}).items() if k.endswith("loss")},
            **cost,
        }
        store.write_text(json.dumps(rows, indent=1))
        del model, trainer
    rows.setdefault("_runs", []).append(" ".join(sys.argv))
    rows["_machine"] = machine_line()
    rows["_setup"] = (
        f"Teacher: SmolLM2-135M-Instruct, 4-bit GGUF (Q4_1) dequantized to float32 on load. Calibration: "
        f"{len(calibration_ids) * bench.sequence_length:,} tokens of the WikiText-2 validation split; recovery: the "
        f"validation windows after them, batch {args.per_device_train_batch_size} x {bench.sequence_length} tokens, "
        f"lr {args.learning_rate:g}, alpha {args.distillation_alpha}, T {args.distillation_temperature}, from the "
        f"uncompressed teacher; perplexity on {len(windows)} windows of {bench.sequence_length} tokens from the start "
        "of wiki.test.raw."
    )
    publish(store, rows, report(rows), bench.results_file)


def report(rows: dict) -> list[str]:
    """Markdown: perplexity before and after recovery against the teacher's, parameters, then the generations."""
    teacher = rows["teacher"]
    lines = report_header("Recovery of a compressed decoder: SmolLM2-135M on WikiText-2", rows) + [
        "",
        f"Teacher perplexity: {teacher['ppl']:.1f} at {teacher['params']:,} parameters.",
        "",
        "| row | perplexity before -> after recovery | vs teacher after | whole params | recovery tokens | minutes |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, row in rows.items():
        if name.startswith("_") or name == "teacher":
            continue
        fewer = 1 - row["params"] / teacher["params"]
        ratio = row["ppl"] / teacher["ppl"]
        lines.append(
            f"| {name} | {row['ppl_before']:.1f} -> {row['ppl']:.1f} | {ratio:.2f}x | {row['params']:,} "
            f"({100 * fewer:.1f}% fewer) | {row['recovery_tokens']:,} | {row['recovery_minutes']:.0f} |"
        )
        verdicts.append(verdict(name, row, teacher))
    lines += ["", TARGET, ""] + (verdicts or ["- no row yet."]) + generation_lines(rows)
    notes = rows.get("_notes", [])  # remarks added by hand to results.json, kept across invocations
    return lines + (["", "\n\n".join(notes)] if notes else [])


if __name__ == "__main__":
    bench, args = HfArgumentParser((DecoderRecoveryArguments, RMTKDTrainingArguments)).parse_args_into_dataclasses()
    main(bench, args)
