"""Which sites reduce when: grouping by layer, the step schedule, and `ReductionCallback` (resumable state)."""

from __future__ import annotations

import re

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .sites import Site


# Shortest path prefix that ends in a numeric component: the repeated block a site sits in.
_BLOCK_PREFIX = re.compile(r"^(.*?\.\d+)\.")


def layer_groups(sites: list[Site], schedule: str) -> list[list[str]]:
    """Site names grouped per reduction: one group per block, shallow to deep, a single group, or none.

    A site's block is its path up to the first numeric component (`bert.encoder.layer.3`, `layer2.0`); blocks come in
    the order of `sites` (forward order). Sites outside any numbered block form a last group of their own.
    """
    if schedule == "none":
        return []
    if schedule == "all_at_once":
        return [[s.name for s in sites]] if sites else []
    by_block: dict[str, list[str]] = {}
    loose = []
    for site in sites:
        match = _BLOCK_PREFIX.match(site.name)
        if match:
            by_block.setdefault(match.group(1), []).append(site.name)
        else:
            loose.append(site.name)
    return list(by_block.values()) + ([loose] if loose else [])


def reduction_steps(
    num_groups: int, max_steps: int, warmup: int = 0, recovery: int | None = None, span: float = 0.5
) -> list[int]:
    """Global steps (completed optimizer steps) at which each group is reduced, before that step's update.

    With `recovery` the reductions are `recovery` steps apart from `warmup` on; otherwise they are spread evenly over
    `[warmup, span * max_steps)`. Steps at or past `max_steps` are dropped (those groups are never reduced).
    """
    if num_groups == 0:
        return []
    if recovery is None:
        end = max(warmup + 1, int(span * max_steps))
        interval = max(1, (end - warmup) // num_groups)
    else:
        interval = recovery
    steps = [warmup + i * interval for i in range(num_groups)]
    return [s for s in steps if s < max_steps]


class ReductionCallback(TrainerCallback, ExportableState):
    """Runs the scheduled reductions of an [`RMTKDTrainer`] at the start of optimizer steps.

    Its state (`steps`, `groups`, `completed`, `stopped`, `history`, `metric_before`) is exported into
    `trainer_state.json` with every checkpoint, so a resumed run continues the same schedule.
    """

    def __init__(
        self, trainer=None, steps=None, groups=None, completed=0, stopped=False, history=None, metric_before=None
    ):
        self.trainer = trainer
        self.steps: list[int] | None = steps
        self.groups: list[list[str]] | None = groups
        self.completed = completed
        self.stopped = stopped
        self.history: list[dict] = list(history or [])
        self.metric_before: float | None = metric_before

    def state(self) -> dict:
        return {
            "args": {},
            "attributes": {
                "steps": self.steps,
                "groups": self.groups,
                "completed": self.completed,
                "stopped": self.stopped,
                "history": self.history,
                "metric_before": self.metric_before,
            },
        }

    def load_attributes(self, attributes: dict) -> None:
        """Restore the schedule's position from a checkpoint's exported state."""
        for key, value in attributes.items():
            setattr(self, key, value)

    @property
    def pending(self) -> bool:
        return not self.stopped and self.steps is not None and self.completed < len(self.steps)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.steps is None:
            self.groups = self.trainer.reduction_groups()
            self.steps = reduction_steps(
                len(self.groups),
                state.max_steps,
                args.reduction_warmup_steps,
                args.reduction_recovery_steps,
                args.reduction_span,
            )

    def on_step_begin(self, args, state, control, **kwargs):
        while self.pending and state.global_step >= self.steps[self.completed]:
            if not self.trainer.run_reduction(self.completed, self.groups[self.completed]):
                self.stopped = True
                break
            self.completed += 1

    def on_train_end(self, args, state, control, **kwargs):
        if self.history and args.reduction_max_metric_drop is not None:
            self.trainer.check_metric_budget(final=True)
