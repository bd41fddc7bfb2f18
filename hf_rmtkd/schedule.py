"""Which sites reduce when, and the stop rules: grouping by layer, the step schedule, and `ReductionCallback`, which
owns the schedule, the stop rules and the metric budget's search (its state is resumable)."""

from __future__ import annotations

import logging
import re

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .records import HIDDEN_SITE
from .sites import Site


logger = logging.getLogger(__name__)


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
    """Runs the scheduled reductions of an [`RMTKDTrainer`] at the start of optimizer steps, and the stop rules.

    The trainer only performs a reduction (`run_reduction`), undoes the last one (`undo_reduction`) and measures the
    budget metric (`budget_metric`); this callback decides when, and whether to go on:

    * `reduction_target_params`: no further reduction once the model is small enough.
    * `reduction_max_metric_drop`: before each further reduction (after the last one's recovery) and at the end of
      training, the metric is compared with its value before the last reduction. Over budget, the reduction is undone
      and retried with a gentler rank, by bisection of the relaxation `r` in [0, 1) (`r` moves every site's rank
      that share of the way from the MP rank back to the full width): `r = 1/2, 3/4, ...`, up to
      `reduction_budget_retries` tries, each taking the slot of one recovery period (the later reductions move back
      by one period; those that no longer fit in training are not done). A try that passes is kept; when the tries
      are spent the reduction is undone and the schedule stops. Cost: one evaluation per check and per try.

    Every decision is logged (`rmtkd/...` keys) and a stop is also a warning; `summary()` is the run's final word.
    Its state is exported into `trainer_state.json` with every checkpoint, so a resumed run continues the schedule.
    """

    def __init__(
        self,
        trainer=None,
        steps=None,
        groups=None,
        completed=0,
        stopped=False,
        history=None,
        metric_before=None,
        stop_reason=None,
        tries=0,
    ):
        self.trainer = trainer
        self.steps: list[int] | None = steps
        self.groups: list[list[str]] | None = groups
        self.completed = completed
        self.stopped = stopped
        self.history: list[dict] = list(history or [])
        self.metric_before: float | None = metric_before
        self.stop_reason: str | None = stop_reason
        self.tries = tries

    def state(self) -> dict:
        names = ("steps", "groups", "completed", "stopped", "history", "metric_before", "stop_reason", "tries")
        return {"args": {}, "attributes": {name: getattr(self, name) for name in names}}

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
        if self.steps and args.reduction_max_metric_drop is not None and self.metric_before is None:
            # Measured now, before any training: a misspelt `reduction_metric` fails here, not at the first reduction.
            metric = self.trainer.budget_metric()
            self.metric_before = metric if self.steps[0] <= state.global_step else None

    def _steps_left(self, index: int) -> int:
        """Hidden-width steps from `index` on (progressive width)."""
        return sum(1 for group in self.groups[index:] if group == [HIDDEN_SITE]) or 1

    def _reduce(self, index: int, relaxation: float = 0.0) -> None:
        args = self.trainer.args
        if args.reduction_max_metric_drop is not None and self.metric_before is None:
            self.metric_before = self.trainer.budget_metric()
        entry = self.trainer.run_reduction(index, self.groups[index], self._steps_left(index), relaxation)
        self.history.append({**entry, "relaxation": relaxation, "try": self.tries})

    def _stop(self, reason: str) -> None:
        self.stopped, self.stop_reason = True, reason
        logger.warning(
            "RMT-KD: the reduction schedule stopped after %d of %d reductions: %s. Training goes on without further "
            "reductions.",
            sum(1 for h in self.history if not h.get("undone")),
            len(self.groups or []),
            reason,
        )

    def _over_budget(self) -> float | None:
        """The drop of the budget metric since before the last reduction if it is over budget, else `None`."""
        args = self.trainer.args
        now = self._last_metric = self.trainer.budget_metric()
        drop = (self.metric_before - now) if args.reduction_metric_greater_is_better else (now - self.metric_before)
        self.trainer.log({"rmtkd/metric_drop": drop, "rmtkd/metric_drop_index": float(self.history[-1]["index"])})
        return drop if drop > args.reduction_max_metric_drop else None

    def on_step_begin(self, args, state, control, **kwargs):
        while self.pending and state.global_step >= self.steps[self.completed]:
            if self.history and args.reduction_max_metric_drop is not None and not self.history[-1].get("undone"):
                drop = self._over_budget()
                if drop is not None:
                    if self._retry(drop, state.global_step):
                        return
                    continue
                # Passed: the metric now is the next reduction's "before".
                self.tries, self.metric_before = 0, self._last_metric
            target = args.reduction_target_params
            if target is not None and self.trainer.model.num_parameters() <= target:
                self.trainer.log({"rmtkd/stopped_at_target_params": float(self.trainer.model.num_parameters())})
                self.stopped, self.stop_reason = True, f"the model reached reduction_target_params={target}"
                return
            self._reduce(self.completed)
            self.completed += 1

    def _retry(self, drop: float, step: int) -> bool:
        """Undo the last reduction; retry it gentler if tries are left (returns `True`), else stop (`False`)."""
        args, last = self.trainer.args, self.history[-1]
        self.trainer.undo_reduction()
        last["undone"], last["metric_drop"] = True, drop
        self.trainer.log(
            {"rmtkd/undone_reduction": float(last["index"]), "rmtkd/undone_relaxation": last["relaxation"]}
        )
        if self.tries >= args.reduction_budget_retries:
            self._stop(
                f"reduction {last['index']} cost {drop:.4g} in {args.reduction_metric} (budget "
                f"{args.reduction_max_metric_drop:g}) and was undone after {self.tries} gentler tries"
            )
            return False
        self.tries += 1
        relaxation = 1.0 - 0.5**self.tries
        # The retry takes this slot; the later reductions move back by one recovery period.
        index = last["index"]
        period = self.steps[index + 1] - self.steps[index] if index + 1 < len(self.steps) else 1
        self.steps = self.steps[: self.completed] + [s + period for s in self.steps[self.completed :]]
        self.trainer.log({"rmtkd/budget_try": float(self.tries), "rmtkd/relaxation": relaxation})
        self._reduce(index, relaxation)
        return True

    def on_train_end(self, args, state, control, **kwargs):
        if self.history and args.reduction_max_metric_drop is not None and not self.history[-1].get("undone"):
            drop = self._over_budget()
            if drop is not None:
                self.trainer.undo_reduction(final=True)
                self.history[-1].update(undone=True, metric_drop=drop)
                self._stop(
                    f"the last reduction cost {drop:.4g} in {args.reduction_metric} (budget "
                    f"{args.reduction_max_metric_drop:g}) at the end of training and was undone"
                )
        summary = self.summary()
        (logger.warning if self.stopped else logger.info)("RMT-KD summary: %s", summary)

    def summary(self) -> str:
        """One line: reductions done of those scheduled, parameters before and after, and why the schedule stopped."""
        done = [h for h in self.history if not h.get("undone")]
        scheduled = len(self.groups or [])
        if not self.history:
            return f"no reduction was done ({scheduled} scheduled)" + (
                f"; {self.stop_reason}" if self.stop_reason else ""
            )
        before, after = self.history[0]["params_before"], self.trainer.model.num_parameters()
        text = f"{len(done)} of {scheduled} scheduled reductions kept; parameters {before:,} -> {after:,}"
        text += f" ({100 * (1 - after / before):.1f}% fewer)"
        return text + (f"; stopped: {self.stop_reason}" if self.stopped else "")
