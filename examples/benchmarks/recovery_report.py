"""The recovery benchmark's store keys and its markdown report: rows grouped over seeds, one verdict per recipe on the
size target, and one per baseline on the equal-parameters target (the recipe it was matched to against it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from recovery_recipes import BASELINES, RECIPES, TARGETS

from hf_rmtkd.reporting import report_header


def row_key(name: str, seed: int, match: str) -> str:
    """A row's key in the store: a baseline's names the row it matches, so one store holds baselines matched to
    several rows (`svd(rmtkd_front_s23@0)@0`); a recipe's is `name@seed`."""
    return f"{name}({match})@{seed}" if name in BASELINES else f"{name}@{seed}"


def is_stored(rows: dict, name: str, seed: int, match: str) -> bool:
    """Whether that row is in the store, a baseline's also under the key of stores written before keys named the
    match (`svd@0`, its match in the row's `matched`)."""
    if row_key(name, seed, match) in rows:
        return True
    legacy = rows.get(f"{name}@{seed}")
    return name in BASELINES and legacy is not None and legacy.get("matched") == match


@dataclass
class RowGroup:
    """The rows of one recipe, or of one baseline matched to one row (`match`, None for a recipe and for baselines
    stored before rows named their match), over seeds."""

    name: str
    match: str | None
    label: str
    seeds: list[dict]

    @property
    def baseline(self) -> bool:
        return self.name in BASELINES

    @property
    def accuracies(self) -> torch.Tensor:
        """Accuracy of each seed, in percent, `(seeds,)` float64."""
        return torch.tensor([100 * r["accuracy"] for r in self.seeds], dtype=torch.float64)

    @property
    def mean(self) -> float:
        return self.accuracies.mean().item()

    @property
    def params(self) -> int:
        return self.seeds[0]["params"]

    def describe(self) -> str:
        """`label (n seeds, mean%, params)`, for a comparison line."""
        count = f"{len(self.seeds)} seed{'s' if len(self.seeds) > 1 else ''}"
        return f"{self.label} ({count}, {self.mean:.2f}%, {self.params:,} params)"


def grouped(rows: dict) -> list[RowGroup]:
    """The store's rows over seeds, recipes first in `RECIPES` order, then baselines, one group per baseline and
    matched row."""
    labels = {**{name: label for name, (label, _) in RECIPES.items()}, **BASELINES}
    found: dict[tuple[str, str | None], list[dict]] = {}
    for key, row in rows.items():
        if "@" not in key or key.startswith("_"):
            continue
        name = key.rsplit("@", 1)[0].split("(")[0]
        if name in labels:
            found.setdefault((name, row.get("matched") if name in BASELINES else None), []).append(row)
    return [
        RowGroup(name, match, labels[name] + (f" (matched to `{match}`)" if match else ""), seeds)
        for order in labels
        for (name, match), seeds in found.items()
        if name == order
    ]


def equal_params_verdicts(groups: list[RowGroup], stderr: float) -> list[str]:
    """One line per baseline group: the recipe of its matched row (every seed of that recipe in the store) against
    it, met when the recipe's mean accuracy is at least the baseline's. `stderr` (points) is the evaluation set's
    standard error, against which the gap is placed."""
    recipes = {g.name: g for g in groups if not g.baseline}
    lines = []
    for baseline in (g for g in groups if g.baseline):
        recipe = recipes.get((baseline.match or "").split("@")[0])
        if recipe is None:
            lines.append(f"- {baseline.label}: no row of its matched recipe in this store.")
            continue
        gap = recipe.mean - baseline.mean
        where = "within" if abs(gap) < stderr else "beyond"
        lines.append(
            f"- {recipe.describe()} against {baseline.describe()}: {gap:+.2f} points, {where} the {stderr:.2f}-point "
            f"standard error: {'met' if gap >= 0 else 'NOT met'}."
        )
    return lines


def report(rows: dict) -> list[str]:
    """Markdown: one line per recipe and baseline (mean and spread over seeds) against the teacher, then the size
    target for each, then the equal-parameters target for each baseline, then the hand notes."""
    teacher = rows["teacher"]
    dev = rows.get("_eval_count", 872)
    share, points = TARGETS[rows.get("_task", "sst2")]
    stderr = 100 * math.sqrt(teacher["accuracy"] * (1 - teacher["accuracy"]) / dev)
    title = rows.get("_title", "SST-2 (full training set), all-MiniLM-L6-v2")
    epoch = rows.get("_teacher_epoch_minutes")
    lines = report_header(f"Recovery at high compression: {title}", rows) + [
        (
            f"Teacher epoch on the training set: {epoch:.1f} min "
            "(wall time of the run that finished it, whatever else shared the machine). "
            if epoch is not None
            else "The teacher was trained in another store (linked in), so its epoch time is not in this one. "
        )
        + f"Evaluation-set standard error of an accuracy near the teacher's: {stderr:.2f} points.",
        "",
        "| recipe | seeds | accuracy (%) | vs teacher (points) | whole params | FLOPs | CPU b1 | CPU b32 | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| teacher | - | {100 * teacher['accuracy']:.2f} | - | {teacher['params']:,} | 1x | 1x | 1x | - |",
    ]
    groups = grouped(rows)
    verdicts = []
    for group in groups:
        acc, seeds = group.accuracies, group.seeds
        spread = f" ± {acc.std().item():.2f}" if len(seeds) > 1 else ""
        drop = group.mean - 100 * teacher["accuracy"]
        row = seeds[0]
        fewer = 1 - group.params / teacher["params"]
        ref = row["teacher_ref"]
        lines.append(
            f"| {group.label} | {len(seeds)} | {group.mean:.2f}{spread} | {drop:+.2f} | "
            f"{group.params:,} ({100 * fewer:.1f}% fewer) | {teacher['flops'] / row['flops']:.1f}x fewer | "
            f"{ref['cpu_b1_ms'] / row['cpu_b1_ms']:.2f}x | {ref['cpu_b32_ms'] / row['cpu_b32_ms']:.2f}x | "
            f"{sum(r['minutes'] for r in seeds) / len(seeds):.0f} |"
        )
        met = "met" if fewer >= share and -drop <= points else "NOT met"
        verdicts.append(f"- {group.label}: {100 * fewer:.1f}% fewer at {drop:+.2f} points: {met}.")
    equal = equal_params_verdicts(groups, stderr)
    notes = rows.get("_notes", [])  # remarks added by hand to results.json, kept across invocations
    return (
        lines
        + ["", f"## Target: >= {share:.0%} fewer whole-model parameters at <= {points:g} point below the teacher", ""]
        + (verdicts or ["- no recipe row yet."])
        + (["", "## Target: at equal parameters, RMT-KD >= every baseline", ""] + equal if equal else [])
        + (["", "\n\n".join(notes)] if notes else [])  # one paragraph per note
    )
