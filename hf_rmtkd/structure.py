"""Rebuild a reduced model's shapes from its records alone (the loading step), before the weights load.

`RMTKDConfig.reduced_modules` says, for every reduced module, its original widths, its retained rank and the form
it is stored in (sliced, factorised, or merged back to dense); [`apply_structure`] replaces the base model's modules
with uninitialised ones of exactly those shapes, so `from_pretrained` can load the compressed weights into them.
Computing reduced *weights* from statistics is [`hf_rmtkd.surgery`]'s job.
"""

from __future__ import annotations

from torch import nn

from .hidden_reload import widen_attention
from .layers import LowRankConv2d, LowRankEmbedding, LowRankLinear
from .records import ConvRecord, EmbeddingRecord, HiddenRecord, LinearRecord, ModuleRecord
from .sites import linear_shape
from .surgery import _new_linear_like, _set_module


def apply_structure(model: nn.Module, records: dict[str, ModuleRecord], hidden: HiddenRecord | None = None) -> None:
    """Replace modules so their shapes match `records` (`RMTKDConfig.reduced_modules`) and the hidden-width record
    `hidden` (whose config overrides the model was already built with); weights are left unset.

    Raises:
        `ValueError` naming the module if a record disagrees with the model (missing module or wrong widths).
    """
    if hidden is not None and hidden.attention_width:
        # GPT-2 keeps its attention at the old width (hf_rmtkd.hidden.gpt2).
        widen_attention(model, hidden.attention_width)
    for path, record in records.items():
        try:
            consumer = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(
                f"Reduced module {path!r} recorded in the config does not exist in {type(model).__name__}."
            ) from err
        in_features, out_features = linear_shape(consumer)
        if (in_features, out_features) != (record.in_features, record.out_features):
            raise ValueError(
                f"Reduced module {path!r}: the config records shape (in={record.in_features}, "
                f"out={record.out_features}) but the base model has (in={in_features}, out={out_features})."
            )
        rank = record.rank
        # The mean correction can give a bias-free layer a bias: the record says which.
        bias = record.bias if record.bias is not None else getattr(consumer, "bias", None) is not None
        if isinstance(record, ConvRecord):
            # Merged back to dense where that measured faster (hf_rmtkd.latency): the base model's convolution.
            merged = _new_linear_like(consumer, in_features, out_features, bias) if record.merged else None
            _set_module(model, path, merged or LowRankConv2d.like(consumer, rank, bias))
            continue
        if isinstance(record, EmbeddingRecord):
            reference = next(consumer.parameters())
            table = LowRankEmbedding(in_features, out_features, rank, bias, consumer.padding_idx)
            _set_module(model, path, table.to(device=reference.device, dtype=reference.dtype))
            continue
        if isinstance(record, LinearRecord):
            factory = {"device": consumer.weight.device, "dtype": consumer.weight.dtype}
            if record.merged:
                # Merged back to dense where that measured faster (hf_rmtkd.latency): a plain nn.Linear.
                _set_module(model, path, nn.Linear(in_features, out_features, bias=bias, **factory))
            else:
                _set_module(model, path, LowRankLinear(in_features, out_features, rank, bias).to(**factory))
            continue
        for producer_path in record.producers:
            producer = model.get_submodule(producer_path)
            _set_module(model, producer_path, _new_linear_like(producer, linear_shape(producer)[0], rank))
        _set_module(model, path, _new_linear_like(consumer, rank, out_features, bias))
