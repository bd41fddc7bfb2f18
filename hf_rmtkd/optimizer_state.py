"""Carrying optimizer state across a structural change of the model (a reduction replaces some parameters)."""

from __future__ import annotations

import torch


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Make `new` (built over the reduced model's parameters) continue where `old` was.

    Parameters that survived the reduction keep their state (Adam moments, step); new parameters start fresh. The
    param groups keep their current learning rate, and the LR scheduler's call-order mark is carried over, since the
    schedule has in effect been stepping this optimizer all along.
    """
    for group in new.param_groups:
        for parameter in group["params"]:
            if parameter in old.state:
                new.state[parameter] = old.state[parameter]
    for new_group, old_group in zip(new.param_groups, old.param_groups):
        new_group["lr"] = old_group["lr"]
        new_group["initial_lr"] = old_group.get("initial_lr", old_group["lr"])
    step = new.step

    def tracked_step(*args, **kwargs):
        return step(*args, **kwargs)

    tracked_step._wrapped_by_lr_sched = True
    new.step = tracked_step
    new._opt_called = True
