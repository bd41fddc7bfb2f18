"""What reloading a hidden-width checkpoint needs beyond the config overrides (GPT-2 keeps its attention width).

Imported by `structure.apply_structure`, so it is copied beside every checkpoint for `trust_remote_code`: it must stay a
flat module importing only torch, transformers and the standard library (`transformers` copies `from .x import`
files of one folder, not packages; the slicing itself lives in [`hf_rmtkd.hidden`]).
"""

from __future__ import annotations

from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D


def gpt2_base(model: nn.Module) -> tuple[str, nn.Module]:
    base = getattr(model, "transformer", model)
    if getattr(base.config, "add_cross_attention", False):
        raise TypeError("The hidden-width site does not support GPT-2 with cross-attention.")
    return ("transformer." if base is not model else ""), base


def widen_attention(model: nn.Module, attention_width: int) -> None:
    """Rebuild every block's attention at `attention_width` (its original `n_embd`) reading and writing the model's
    narrower stream: `c_attn` `(n_embd -> 3 * attention_width)`, `c_proj` `(attention_width -> n_embd)`. Weights are
    left unset (they are loaded next)."""
    _, base = gpt2_base(model)
    config = base.config
    wide = config.__class__.from_dict({**config.to_dict(), "n_embd": attention_width})
    for i, block in enumerate(base.h):
        old = block.attn
        factory = {"device": old.c_attn.weight.device, "dtype": old.c_attn.weight.dtype}
        attention = GPT2Attention(wide, layer_idx=i)
        # Share the model's config so set_attn_implementation and friends still reach this module.
        attention.config = old.config
        attention.c_attn = Conv1D(3 * attention_width, config.n_embd)
        attention.c_proj = Conv1D(config.n_embd, attention_width)
        block.attn = attention.to(**factory).train(old.training)
