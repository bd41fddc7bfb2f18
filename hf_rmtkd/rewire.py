"""After a structure change (a reduction, or undoing one), point the optimizer, LR scheduler and DDP wrapper of a
`Trainer` at the model's new parameters: the one place that reaches into accelerate's and the scheduler's internals."""

from __future__ import annotations

from torch import nn

from .optimizer_state import carry_optimizer_state


def rewire_trainer(trainer) -> None:
    """Rebuild `trainer.optimizer` over the current parameters (surviving ones keep their state), re-point the LR
    scheduler at it, re-wrap the model for DDP, and update the callback handler. A no-op before the optimizer exists
    (a reduction at step 0 of a resumed run)."""
    trainer.model.model.train(trainer.model.training)
    if trainer.optimizer is None:
        return
    accelerator = trainer.accelerator
    old = trainer.optimizer
    old_raw = getattr(old, "optimizer", old)
    trainer.optimizer = None
    trainer.create_optimizer()
    new_raw = trainer.optimizer
    carry_optimizer_state(old_raw, new_raw)
    if old in accelerator._optimizers:
        accelerator._optimizers.remove(old)
    trainer.optimizer = accelerator.prepare_optimizer(new_raw)
    scheduler = trainer.lr_scheduler
    if scheduler is not None:
        getattr(scheduler, "scheduler", scheduler).optimizer = new_raw
        if hasattr(scheduler, "optimizers"):
            scheduler.optimizers = [trainer.optimizer]
    if isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel):
        if trainer.model_wrapped in accelerator._models:
            accelerator._models.remove(trainer.model_wrapped)
        trainer.model_wrapped = accelerator.prepare_model(trainer.model)
    trainer.callback_handler.optimizer = trainer.optimizer
    trainer.callback_handler.lr_scheduler = trainer.lr_scheduler
