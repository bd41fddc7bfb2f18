"""Latency that follows parameters: keep a factorised layer only where it measures faster than dense.

A rank-`k` factorisation `W ~ U V` of a `d_out x d_in` layer has fewer weights when `k (d_in + d_out) < d_in d_out`,
but it runs two matmuls instead of one, and at small serving shapes (batch 1, short sequences) or awkward ranks the
second launch and the thin inner matrix can cost more than the FLOPs save. [`optimize_for_latency`] times both forms
of every `LowRankLinear` at the serving shape on the model's device and merges back (`W = U V`, one dense
`nn.Linear`, exact up to float rounding) where dense is not slower. The timings and the decision are recorded in the
module's `RMTKDConfig.reduced_modules` entry (`"latency"`, `"merged"`), so the checkpoint reloads with the same
structure.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .layers import LowRankLinear
from .modeling_rmtkd import RMTKDPreTrainedModel
from .surgery import _set_module


def dense_from_low_rank(module: LowRankLinear) -> nn.Linear:
    """The dense `nn.Linear` equal to `module` (`W = up.W @ down.W`, same bias), on its device and dtype."""
    weight = module.up.weight.detach()
    dense = nn.Linear(
        module.in_features,
        module.out_features,
        bias=module.up.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        product = module.up.weight.to(torch.float64) @ module.down.weight.to(torch.float64)
        dense.weight.copy_(product.to(weight.dtype))
        if module.up.bias is not None:
            dense.bias.copy_(module.up.bias)
    return dense.train(module.training)


def _low_rank_modules(model: RMTKDPreTrainedModel, names=None) -> list[tuple[str, LowRankLinear]]:
    if not isinstance(model, RMTKDPreTrainedModel):
        raise TypeError(f"Expected an RMTKD model (from `compress` or `RMTKDTrainer`), got {type(model).__name__}.")
    found = [(p, m) for p, m in model.model.named_modules() if isinstance(m, LowRankLinear)]
    if names is not None:
        unknown = set(names) - {p for p, _ in found}
        if unknown:
            raise ValueError(f"No factorised module at {sorted(unknown)}; factorised: {[p for p, _ in found]}.")
        found = [(p, m) for p, m in found if p in set(names)]
    return found


def merge_low_rank(model: RMTKDPreTrainedModel, names: list[str] | None = None) -> list[str]:
    """Replace factorised layers (all, or those at `names`) by their dense product, in place.

    The config records `merged: True` for each, so `from_pretrained` rebuilds a dense layer there. The retained rank
    stays recorded (the layer still computes a rank-`k` map; only its storage is dense).

    Returns:
        The merged module paths.
    """
    merged = []
    for path, module in _low_rank_modules(model, names):
        _replace_with_dense(model, path, dense_from_low_rank(module))
        merged.append(path)
    return merged


def _replace_with_dense(model: RMTKDPreTrainedModel, path: str, dense: nn.Linear) -> None:
    _set_module(model.model, path, dense)
    model.config.reduced_modules[path].merged = True


@torch.inference_mode()
def time_forward_ms(module: nn.Module, inputs: torch.Tensor | dict, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of one forward, `module(inputs)` or `module(**inputs)`, in milliseconds (CUDA synchronised)."""
    tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    call = (lambda: module(**inputs)) if isinstance(inputs, dict) else (lambda: module(inputs))
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def optimize_for_latency(
    model: RMTKDPreTrainedModel, rows: int = 128, repeats: int = 50, names: list[str] | None = None
) -> dict[str, dict]:
    """Time every factorised layer against its dense product at the serving shape; merge where dense is not slower.

    Args:
        model: an RMTKD model; measured on its current device and dtype (move it to the serving device first).
        rows (`int`, *optional*, defaults to 128): rows of the layer's input at serving time, i.e. batch size times
            sequence length (128 = one 128-token sequence; 32 x 128 = 4096 for batch 32).
        repeats (`int`, *optional*, defaults to 50): timed forwards per form (the median is kept).
        names (`list[str]`, *optional*): only these module paths.

    Returns:
        `{path: {"factorised_ms", "dense_ms", "rows", "device", "merged"}}`, also written into each module's
        `config.reduced_modules` entry under `"latency"`.
    """
    if rows < 1:
        raise ValueError(f"`rows` must be >= 1, got {rows}.")
    decisions = {}
    for path, module in _low_rank_modules(model, names):
        weight = module.up.weight
        inputs = torch.randn(rows, module.in_features, device=weight.device, dtype=weight.dtype)
        dense = dense_from_low_rank(module).eval()
        factorised_ms = time_forward_ms(module, inputs, repeats)
        dense_ms = time_forward_ms(dense, inputs, repeats)
        merge = dense_ms <= factorised_ms
        decisions[path] = {
            "factorised_ms": factorised_ms,
            "dense_ms": dense_ms,
            "rows": rows,
            "device": str(weight.device),
            "merged": merge,
        }
        model.config.reduced_modules[path].latency = dict(decisions[path])
        if merge:
            _replace_with_dense(model, path, dense)
    return decisions
