"""The hidden-width site for GPT-2: a pre-LN decoder with LayerNorm, sliced exactly up to the dropped directions.

LayerNorm is not rotation-invariant, but on a zero-mean stream it is an RMSNorm followed by its affine map, which
is (SliceGPT). So:

1. Every writer of the residual stream (token and position embeddings, the attention and MLP `c_proj`) is centred:
   its output minus its mean over the `d` coordinates. Every reader goes through a LayerNorm, which subtracts that
   mean anyway, so the function is unchanged and the stream `x` is now orthogonal to `1_d`.
2. The kept basis `Q` (`d x w`) is `w - 1` MP directions of the centred stream plus `1_d / sqrt(d)`, rotated by a
   Householder reflection so that `Q^T 1_d` points along `1_w`. Then `z = Q^T x` has zero mean for *every* `x`
   orthogonal to `1_d`, so `LayerNorm_w(z)` is `sqrt(w / d)` times `Q^T` of `LayerNorm_d`'s normalised `x` when
   `x` lies in the span of `Q`, with `eps * d / w`.
3. The readers (`c_attn`, `c_fc`, the head) absorb the old norms' weight `g` and `Q` on the input side and the old
   norms' bias into their own bias; the new norms get weight 1. A head without a bias (`lm_head`, `score`) receives
   the old final-norm bias through the new final norm's bias `1_w`: a normalised vector has zero mean, so the head's
   component along `1_w` only ever sees that bias.

GPT-2 ties the attention width to `n_embd`; the attention keeps its width and heads (only `c_attn`'s input and
`c_proj`'s output shrink), so the record stores `attention_width` and [`widen_attention`] rebuilds those modules on
reload. `n_inner` is set explicitly and the embeddings are untied from the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from .hidden_rebuild import float64_state, rebuild


GPT2_FAMILIES = ("gpt2",)
HEAD_NAMES = ("lm_head", "score", "classifier")
SUPPORTED_CLASSES = ("GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification")


def _base(model: nn.Module) -> tuple[str, nn.Module]:
    base = getattr(model, "transformer", model)
    if getattr(base.config, "add_cross_attention", False):
        raise TypeError("The hidden-width site does not support GPT-2 with cross-attention.")
    return ("transformer." if base is not model else ""), base


def gpt2_states(model: nn.Module) -> list[str]:
    """The residual-stream states of a GPT-2 model: the input of every block and of the final LayerNorm."""
    dot, base = _base(model)
    return [f"{dot}h.{i}" for i in range(len(base.h))] + [f"{dot}ln_f"]


def widen_attention(model: nn.Module, attention_width: int) -> None:
    """Rebuild every block's attention at `attention_width` (its original `n_embd`) reading and writing the model's
    narrower stream: `c_attn` `(n_embd -> 3 * attention_width)`, `c_proj` `(attention_width -> n_embd)`. Weights are
    left unset (they are loaded next)."""
    _, base = _base(model)
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


@torch.no_grad()
def slice_gpt2(model: nn.Module, basis: torch.Tensor) -> tuple[nn.Module, dict]:
    """A new GPT-2 model of the same class whose residual stream is `basis^T x` (`x` centred, see the module text).

    Args:
        model: `GPT2Model`, `GPT2LMHeadModel`, `GPT2ForSequenceClassification` or `GPT2ForTokenClassification`.
        basis (`torch.Tensor` of shape `(d, w)`): orthonormal columns with `basis^T 1_d` along `1_w` and
            `1_d` in their span (see `hf_rmtkd.hidden.mean_aligned_basis`); `w` a multiple of `n_head`.

    Returns:
        The new model (same device and dtype, train/eval mode kept) and the config overrides that rebuild it (with
        [`widen_attention`] at the old width `d`).
    """
    dot, base = _base(model)
    config = model.config
    d, w = basis.shape
    if w % config.n_head:
        raise ValueError(f"The new GPT-2 width must be a multiple of n_head={config.n_head}, got {w}.")
    if type(model).__name__ not in SUPPORTED_CLASSES:
        raise TypeError(f"The hidden-width site supports {SUPPORTED_CLASSES}, got {type(model).__name__}.")
    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Linear)]
    scale = math.sqrt(d / w)
    q = basis.to(torch.float64).cpu()
    # The attention keeps the width it had (the original n_embd, also when this is a later, progressive step).
    attention_width = base.h[0].attn.c_proj.weight.shape[0]
    overrides = {
        "n_embd": w,
        "n_inner": config.n_inner or 4 * d,
        "layer_norm_epsilon": config.layer_norm_epsilon * d / w,
        "tie_word_embeddings": False,
    }
    state = float64_state(model)

    def centred(rows):  # rows of stream vectors, minus their mean over the d coordinates
        return rows - rows.mean(dim=-1, keepdim=True)

    def read(prefix, norm):  # Conv1D (d, out) reading LayerNorm(x) with weight g, bias b
        weight, g, b = state[f"{prefix}.weight"], state[f"{norm}.weight"], state[f"{norm}.bias"]
        state[f"{prefix}.bias"] = state[f"{prefix}.bias"] + b @ weight
        state[f"{prefix}.weight"] = scale * q.T @ (g[:, None] * weight)
        state[f"{norm}.weight"], state[f"{norm}.bias"] = torch.ones(w, dtype=q.dtype), torch.zeros(w, dtype=q.dtype)

    for name in (f"{dot}wte.weight", f"{dot}wpe.weight"):
        state[name] = centred(state[name]) @ q
    for i in range(len(base.h)):
        block = f"{dot}h.{i}."
        read(f"{block}attn.c_attn", f"{block}ln_1")
        read(f"{block}mlp.c_fc", f"{block}ln_2")
        for writer in (f"{block}attn.c_proj", f"{block}mlp.c_proj"):
            state[f"{writer}.weight"] = centred(state[f"{writer}.weight"]) @ q
            state[f"{writer}.bias"] = centred(state[f"{writer}.bias"]) @ q
    g, b = state[f"{dot}ln_f.weight"], state[f"{dot}ln_f.bias"]
    state[f"{dot}ln_f.weight"], state[f"{dot}ln_f.bias"] = torch.ones(w, dtype=q.dtype), torch.zeros(w, dtype=q.dtype)
    for name in heads:
        weight = state[f"{name}.weight"]  # nn.Linear (out, d)
        new_weight = scale * (weight * g[None, :]) @ q
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"] + weight @ b
        else:
            # Normalised vectors have zero mean: the head's component along 1_w reads only the norm's bias 1_w.
            new_weight = new_weight - new_weight.mean(dim=1, keepdim=True) + (weight @ b)[:, None] / w
            state[f"{dot}ln_f.bias"] = torch.ones(w, dtype=q.dtype)
        state[f"{name}.weight"] = new_weight
    return rebuild(model, overrides, state, prepare=lambda new: widen_attention(new, attention_width)), overrides
