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

import dataclasses
import math

import torch
from torch import nn

from ..analysis import SiteReport, SpectralOptions, analyze_statistics, round_rank
from ..calibration import ActivationStatistics
from ..hidden_reload import gpt2_base, widen_attention
from ..kept_basis import StreamMap
from ..records import HIDDEN_SITE
from ..sites import Site
from .encoder import align_mean_direction
from .family import HiddenFamily, SliceResult, register_family
from .rebuild import float64_state, rebuild


HEAD_NAMES = ("lm_head", "score", "classifier")
SUPPORTED_CLASSES = ("GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification")


def gpt2_states(model: nn.Module) -> list[str]:
    """The residual-stream states of a GPT-2 model: the input of every block and of the final LayerNorm."""
    dot, base = gpt2_base(model)
    return [f"{dot}h.{i}" for i in range(len(base.h))] + [f"{dot}ln_f"]


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
    dot, base = gpt2_base(model)
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


def centred_statistics(stats: ActivationStatistics) -> ActivationStatistics:
    """Statistics of `C x`, `C = I - 1 1^T / d`: the stream once GPT-2's writers are centred (see the module text)."""
    centring = torch.eye(stats.dim, dtype=stats.sum_outer.dtype) - 1.0 / stats.dim
    return ActivationStatistics(centring @ stats.sum_outer @ centring, centring @ stats.sum, stats.count)


def analyze_gpt2(stats: ActivationStatistics, heads: int, options: SpectralOptions) -> SiteReport:
    """MP analysis of GPT-2's centred stream. `rank` is the new width: the MP count plus one for the mean direction,
    rounded up to a multiple of `heads` and `options.rank_multiple` (GPT-2 requires `n_embd % n_head == 0`)."""
    site = Site(HIDDEN_SITE, "hidden", stats.dim)
    report = analyze_statistics(
        site, centred_statistics(stats), dataclasses.replace(options, centered=False, rank_multiple=1)
    )
    width = round_rank(report.rank + 1, report.dim, math.lcm(options.rank_multiple, heads))
    total = float(report.eigenvalues.sum())
    retained = float(report.eigenvalues[: width - 1].sum()) / total if total > 0 else 1.0
    return dataclasses.replace(report, rank=width, retained_variance=retained)


def mean_aligned_basis(eigenvectors: torch.Tensor, width: int) -> torch.Tensor:
    """The basis GPT-2 is sliced with, shape `(d, width)`: the `width - 1` leading `eigenvectors` (shape `(d, d)`,
    columns) made orthogonal to `1_d`, plus `1_d / sqrt(d)`, reflected so that `1_d` maps onto the direction of
    `1_width` (see the module text)."""
    d = eigenvectors.shape[0]
    ones = torch.full((d, 1), 1.0 / math.sqrt(d), dtype=eigenvectors.dtype)
    top = eigenvectors[:, : width - 1]
    top, _ = torch.linalg.qr(top - ones @ (ones.T @ top))
    return align_mean_direction(torch.cat([top, ones], dim=1))


class GPT2Family(HiddenFamily):
    """GPT-2 (LayerNorm pre-norm decoder): writers centred, the all-ones direction kept, attention width kept."""

    name = "gpt2"
    model_types = ("gpt2",)

    def states(self, model: nn.Module) -> list[str]:
        return gpt2_states(model)

    def analyze(self, pooled: ActivationStatistics, model: nn.Module, options: SpectralOptions) -> SiteReport:
        return analyze_gpt2(pooled, model.config.num_attention_heads, options)

    def slice(self, model, report, width, states, calibration_data, options, progress) -> SliceResult:
        # `width` - 1 MP directions and the all-ones direction (see `analyze_gpt2`).
        basis = mean_aligned_basis(report.eigenvectors, width)
        new, overrides = slice_gpt2(model, basis)
        # The student's stream is the centred teacher stream, projected.
        stream_map = StreamMap(basis - basis.mean(dim=0, keepdim=True), compare_final=False)
        return SliceResult(new, overrides, stream_map, {"attention_width": report.dim})


register_family(GPT2Family())
