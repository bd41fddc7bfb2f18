"""What every hidden-width slicer shares: the weights as float64 CPU tensors to transform, and a model of the same
class rebuilt with config overrides that loads the transformed weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def float64_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` as detached float64 CPU tensors (the slicing arithmetic runs in float64)."""
    return {name: t.detach().to("cpu", torch.float64) for name, t in model.state_dict().items()}


def rebuild(
    model: nn.Module,
    overrides: dict,
    state: dict[str, torch.Tensor],
    prepare: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A new model of `model`'s class from its config plus `overrides`, loaded from `state`.

    `prepare` reshapes the fresh model before loading (GPT-2's attention width). The result takes `model`'s device,
    dtype and train/eval mode.

    Raises:
        `RuntimeError` naming the keys if a parameter is left unloaded or `state` holds a key the model lacks
        (buffers the model computes itself, such as rotary frequencies, may be absent).
    """
    config = model.config
    reference = next(model.parameters())
    new = type(model)(config.__class__.from_dict({**config.to_dict(), **overrides}))
    if prepare is not None:
        prepare(new)
    new = new.to(device=reference.device, dtype=reference.dtype)
    missing, unexpected = new.load_state_dict({n: t.to(reference.dtype) for n, t in state.items()}, strict=False)
    parameters = dict(new.named_parameters(remove_duplicate=False))
    missing = [name for name in missing if name in parameters]
    if missing or unexpected:
        raise RuntimeError(f"Hidden-width slicing left keys unmatched: missing {missing}, unexpected {unexpected}.")
    return new.train(model.training)
