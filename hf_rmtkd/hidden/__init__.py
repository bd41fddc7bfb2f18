"""Hidden width: one projection of the whole residual stream, for every registered model family.

* [`family`]: the protocol ([`HiddenFamily`]: stream states, width choice, slice) and the registry by `model_type`.
* One file per family: [`llama`] (RMSNorm decoders, exact), [`gpt2`] (LayerNorm decoder, exact), [`encoder`]
  (post-LN BERT / RoBERTa / MPNet, fitted on the data).
* [`reduce`]: pooled statistics, the MP width (progressive steps), the slice and its typed record, without changing
  the caller's model; [`hf_rmtkd.pipeline`] applies it. Reloading needs only the record (and
  [`hf_rmtkd.hidden_reload`]).
"""

from . import encoder, gpt2, llama  # noqa: F401  (each registers its family)
from .family import FAMILIES, HiddenFamily, SliceResult, family_for, register_family
from .gpt2 import centred_statistics, mean_aligned_basis, slice_gpt2
from .llama import slice_hidden
from .reduce import HiddenReduction, plan_hidden, residual_statistics, step_width, stream_states


__all__ = [
    "FAMILIES",
    "HiddenFamily",
    "HiddenReduction",
    "SliceResult",
    "centred_statistics",
    "family_for",
    "mean_aligned_basis",
    "plan_hidden",
    "register_family",
    "residual_statistics",
    "slice_gpt2",
    "slice_hidden",
    "step_width",
    "stream_states",
]
