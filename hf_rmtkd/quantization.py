"""int8 on top of RMT-KD: dynamic int8 quantization of a (compressed) model for CPU serving, through PyTorch or
through ONNX Runtime on the exported model.

Quantization is a serving-time transform, applied after loading: the RMTKD checkpoint stays float (it is what
`from_pretrained`, the Hub and `trust_remote_code` load), and a quantized model is not saved with `save_pretrained`
(dynamic int8 layers hold packed weights that safetensors cannot store; [`RMTKDPreTrainedModel.save_pretrained`]
refuses it with this advice). For a file to ship, export to ONNX and quantize that ([`export_onnx_int8`]).

Reduced layers quantize like any other: an FFN is a narrower `nn.Linear`, a factorised layer a `LowRankLinear` whose
`down` and `up` are `nn.Linear`, so both factors become int8.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `nn.Linear` layers are dynamic int8 (weights int8 per tensor, activations quantized per
    batch at run time), through `torch.ao.quantization.quantize_dynamic`; `model` itself is unchanged. CPU only.

    PyTorch marks the eager `torch.ao` API deprecated in favour of torchao, whose CPU int8 path measured 26x *slower*
    than float32 here (torchao 0.18, torch 2.13, 2 cores) where `quantize_dynamic` measured 2x faster; the warning is
    silenced for this one call.

    Returns:
        The quantized copy, in eval mode, flagged so `save_pretrained` refuses it (see the module text).
    """
    from torch.ao.quantization import quantize_dynamic

    quantized = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        quantized = quantize_dynamic(quantized, {nn.Linear}, dtype=torch.qint8)
    quantized.__dict__["_rmtkd_int8"] = True
    return quantized


def export_onnx_int8(model: nn.Module, example_inputs: dict[str, torch.Tensor], path: str | Path) -> tuple[Path, Path]:
    """Export `model` to ONNX (`path`, dynamic batch and sequence axes) and write its dynamic int8 version beside it
    (`<stem>.int8.onnx`, ONNX Runtime's `quantize_dynamic`, int8 weights).

    Args:
        model: a Hugging Face or RMTKD model returning `logits`.
        example_inputs: e.g. `{"input_ids": (b, s), "attention_mask": (b, s)}`; their names become the ONNX inputs.

    Returns:
        The float and int8 ONNX paths. The output is named `logits`.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(example_inputs)

    class Logits(nn.Module):  # ONNX export wants tensors out, not a ModelOutput
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            return self.inner(**dict(zip(names, tensors))).logits

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = tuple({0: batch, 1: sequence} if t.dim() == 2 else {0: batch} for t in example_inputs.values())
    torch.onnx.export(
        Logits(model).eval(),
        tuple(example_inputs.values()),
        str(path),
        input_names=names,
        output_names=["logits"],
        dynamic_shapes=(shapes,),  # one entry: the `*tensors` argument
        dynamo=True,
    )
    int8 = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
    return path, int8
