"""Latency that follows parameters: keep a factorised layer only where it measures faster than dense.

A rank-`k` factorisation `W ~ U V` of a `d_out x d_in` layer has fewer weights when `k (d_in + d_out) < d_in d_out`,
but it runs two matmuls instead of one, and at small serving shapes (batch 1, short sequences) or awkward ranks the
second launch and the thin inner matrix can cost more than the FLOPs save. [`optimize_for_latency`] times both forms
of every factorised layer (`LowRankLinear`, and `LowRankConv2d` from `convolutions="factorize"`) at the serving shape
on the model's device and merges back (`W = U V`, one dense `nn.Linear` or one `nn.Conv2d` of the original kernel,
stride and padding, exact up to float rounding) where dense is not slower. The timings and the decision are recorded
in the module's `RMTKDConfig.reduced_modules` entry (`"latency"`, `"merged"`), so the checkpoint reloads with the same
structure. A merged layer holds the dense layer's parameters again: it trades the saving for speed.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .layers import LowRankConv2d, LowRankLinear
from .modeling_rmtkd import RMTKDPreTrainedModel
from .sites import linear_shape
from .surgery import _new_linear_like, _set_module, weight_and_bias


FACTORISED = (LowRankLinear, LowRankConv2d)


def dense_from_low_rank(module: LowRankLinear | LowRankConv2d) -> nn.Linear | nn.Conv2d:
    """The dense layer equal to `module` (`W = up.W @ down.W`, same bias), on its device and dtype: an `nn.Linear`,
    or for a `LowRankConv2d` an `nn.Conv2d` with `down`'s kernel, stride, padding and dilation."""
    if not isinstance(module, FACTORISED):
        raise TypeError(f"Expected a LowRankLinear or LowRankConv2d, got {type(module).__name__}.")
    reference = module.down if isinstance(module, LowRankConv2d) else module.up
    bias = module.up.bias is not None
    dense = _new_linear_like(reference, *linear_shape(module), bias)
    # The product in float64 (on the CPU, as surgery computes it), then back to the layer's dtype and device.
    weight, bias_value = weight_and_bias(module)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dense.weight.dtype))
        if bias:
            dense.bias.copy_(bias_value.to(dense.bias.dtype))
    return dense.train(module.training)


def _low_rank_modules(model: RMTKDPreTrainedModel, names=None) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, RMTKDPreTrainedModel):
        raise TypeError(f"Expected an RMTKD model (from `compress` or `RMTKDTrainer`), got {type(model).__name__}.")
    found = [(p, m) for p, m in model.model.named_modules() if isinstance(m, FACTORISED)]
    if names is not None:
        unknown = set(names) - {p for p, _ in found}
        if unknown:
            raise ValueError(f"No factorised module at {sorted(unknown)}; factorised: {[p for p, _ in found]}.")
        found = [(p, m) for p, m in found if p in set(names)]
    return found


def merge_low_rank(model: RMTKDPreTrainedModel, names: list[str] | None = None) -> list[str]:
    """Replace factorised layers (all, or those at `names`; linear and convolutional) by their dense product, in place.

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


def _replace_with_dense(model: RMTKDPreTrainedModel, path: str, dense: nn.Module) -> None:
    _set_module(model.model, path, dense)
    model.config.reduced_modules[path].merged = True


def time_forward_ms(module: nn.Module, inputs: torch.Tensor | dict, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of one forward, `module(inputs)` or `module(**inputs)`, in milliseconds (CUDA synchronised)."""
    return time_round_robin_ms({"module": module}, inputs, repeats, warmup)["module"]


@torch.inference_mode()
def time_round_robin_ms(
    modules: dict[str, nn.Module], inputs: torch.Tensor | dict, repeats: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Median wall time of one forward of each module on the same `inputs`, in milliseconds, timed in turn.

    Each round runs every module once, in the order given, so a change in the machine's speed while timing (another
    process, clock scaling, a warm cache) falls on all of them alike and their ratios stay comparable. Timing one
    module's repeats and then the other's puts any such drift into the ratio.

    Args:
        modules: `{name: module}`; each is called as `module(inputs)`, or `module(**inputs)` for a dict.
        inputs: one batch, a tensor or the modules' keyword inputs; on the modules' device.
        repeats: timed rounds (the median over them is kept); `warmup` untimed rounds come first.

    Returns:
        `{name: median milliseconds}`, CUDA synchronised around each forward when the inputs are on a GPU.

    Raises:
        `ValueError` if `modules` is empty or `repeats < 1`.
    """
    if not modules:
        raise ValueError("`modules` must name at least one module to time.")
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    times = {name: [] for name in modules}
    for i in range(warmup + repeats):
        for name, module in modules.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(**inputs) if isinstance(inputs, dict) else module(inputs)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def optimize_for_latency(
    model: RMTKDPreTrainedModel,
    rows: int = 128,
    repeats: int = 50,
    names: list[str] | None = None,
    example_inputs: dict | None = None,
) -> dict[str, dict]:
    """Time every factorised layer against its dense product at the serving shape; merge where dense is not slower.

    Args:
        model: an RMTKD model; measured on its current device and dtype (move it to the serving device first).
        rows (`int`, *optional*, defaults to 128): rows of a linear layer's input at serving time, i.e. batch size
            times sequence length (128 = one 128-token sequence; 32 x 128 = 4096 for batch 32). Not used when
            `example_inputs` is given.
        repeats (`int`, *optional*, defaults to 50): timed forwards per form, the two forms
            in turn so that drift in the machine's speed falls on both (the median is kept).
        names (`list[str]`, *optional*): only these module paths.
        example_inputs (`dict`, *optional*): one serving batch, the model's keyword inputs (e.g.
            `{"pixel_values": (1, 3, 32, 32) tensor}`). The model runs once on it and every factorised layer is timed
            on the input it received there. Required when the model has factorised convolutions, whose input shape
            (channels and the feature map's size after earlier strides) only a forward knows.

    Returns:
        `{path: {"factorised_ms", "dense_ms", "input_shape", "device", "merged"}}` (and `"rows"` for a linear layer),
        also written into each module's `config.reduced_modules` entry under `"latency"`.

    Raises:
        `ValueError` if `rows < 1`, or if a factorised convolution is to be timed without `example_inputs`.
    """
    if rows < 1:
        raise ValueError(f"`rows` must be >= 1, got {rows}.")
    found = _low_rank_modules(model, names)
    served = _served_inputs(model, found, example_inputs) if example_inputs is not None else {}
    decisions = {}
    for path, module in found:
        inputs = served.get(path)
        if inputs is None and isinstance(module, LowRankConv2d):
            raise ValueError(
                f"{path!r} is a factorised convolution: pass `example_inputs` (one serving batch, e.g. "
                "{'pixel_values': torch.randn(1, 3, 32, 32)}) so it is timed on the feature map it really sees."
            )
        if inputs is None:
            weight = module.up.weight
            inputs = torch.randn(rows, module.in_features, device=weight.device, dtype=weight.dtype)
        dense = dense_from_low_rank(module).eval()
        timed = time_round_robin_ms({"factorised": module, "dense": dense}, inputs, repeats)
        factorised_ms, dense_ms = timed["factorised"], timed["dense"]
        merge = dense_ms <= factorised_ms
        decisions[path] = {
            "factorised_ms": factorised_ms,
            "dense_ms": dense_ms,
            "input_shape": list(inputs.shape),
            **({"rows": inputs.shape[:-1].numel()} if isinstance(module, LowRankLinear) else {}),
            "device": str(inputs.device),
            "merged": merge,
        }
        model.config.reduced_modules[path].latency = dict(decisions[path])
        if merge:
            _replace_with_dense(model, path, dense)
    return decisions


@torch.inference_mode()
def _served_inputs(model: RMTKDPreTrainedModel, found: list[tuple[str, nn.Module]], example_inputs) -> dict:
    """The input each factorised layer receives when `model` runs on `example_inputs`, by path."""
    if not isinstance(example_inputs, dict):
        raise ValueError(
            f"`example_inputs` must be a dict of the model's keyword inputs, got {type(example_inputs).__name__}."
        )
    seen = {}

    def keep(path):
        return lambda _module, args: seen.setdefault(path, args[0].detach().clone())

    handles = [module.register_forward_pre_hook(keep(path)) for path, module in found]
    was_training = model.training
    try:
        model.eval()(**example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen
