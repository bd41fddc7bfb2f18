"""Hidden width of pre-norm RMSNorm decoders (Llama, Mistral, Qwen2): exact up to the dropped directions.

The residual stream `x` (width `d`) is observed at the input of every decoder layer and of the final norm; the MP
rule on its pooled, uncentred covariance gives `k`, and the top-`k` eigenvectors `Q` (`d x k`, orthonormal columns)
define the new stream `z = Q^T x`. Everything that writes to the stream (token embeddings, attention output and MLP
down projections) is multiplied by `Q^T` on the left; everything that reads it through an RMSNorm (attention
Q/K/V, MLP gate/up, the head) absorbs the norm's weight and `Q` on the right. RMSNorm is rotation-invariant up to
its width: `z / rms_k(z)` equals `sqrt(d/k) Q^T x / rms_d(x)` when `rms_k` uses `eps * d / k`, so the new norms get
weight 1 and `eps * d / k`, and the readers a factor `sqrt(d/k)`. With `k = d` the model is the same function (a
rotation of its stream); with `k < d` the only change is the dropped directions (SliceGPT with one `Q` shared by
all layers). The head dimension is kept (`head_dim` set explicitly), the embeddings are untied from the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kept_basis import StreamMap
from ..output_error import reader_errors
from .family import HiddenFamily, SliceResult, register_family, top_directions
from .rebuild import float64_state, rebuild


def _parts(model: nn.Module):
    prefix = model.base_model_prefix
    base = getattr(model, prefix, model)
    if not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise TypeError(f"{type(model).__name__} does not have a Llama-family decoder layout (`layers`, `norm`).")
    head = next(
        (getattr(model, n) for n in ("lm_head", "score") if isinstance(getattr(model, n, None), nn.Linear)), None
    )
    return prefix if base is not model else "", base, head


def norm_readers(model: nn.Module) -> list[tuple[list[str], str]]:
    """Per RMSNorm of the stream, `(paths of the linear layers that read its output, the norm's path)`: every layer's
    Q/K/V (input norm) and gate/up (post-attention norm), and the head, if any (final norm). The one place that says
    who reads the stream; slicing folds `diag(g) Q` into these readers, the output-error budget weighs them."""
    prefix, base, head = _parts(model)
    dot = f"{prefix}." if prefix else ""
    groups = []
    for i in range(len(base.layers)):
        layer = f"{dot}layers.{i}."
        groups.append(([f"{layer}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")], f"{layer}input_layernorm"))
        groups.append(([f"{layer}mlp.{p}" for p in ("gate_proj", "up_proj")], f"{layer}post_attention_layernorm"))
    if head is not None:
        groups.append(([next(n for n, m in model.named_modules() if m is head)], f"{dot}norm"))
    return groups


@torch.no_grad()
def slice_hidden(model: nn.Module, basis: torch.Tensor) -> tuple[nn.Module, dict]:
    """A new model of the same class whose residual stream is `basis^T x`.

    Args:
        model: a Llama-family model (`...ForCausalLM`, `...ForSequenceClassification` or the base model).
        basis (`torch.Tensor` of shape `(d, k)`): orthonormal columns spanning the kept directions.

    Returns:
        The new model (same device and dtype, eval/train mode kept) and the config overrides that rebuild it.
    """
    prefix, base, _ = _parts(model)
    config = model.config
    d, k = basis.shape
    scale = math.sqrt(d / k)
    q = basis.to(torch.float64).cpu()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    overrides = {
        "hidden_size": k,
        "head_dim": head_dim,
        "rms_norm_eps": config.rms_norm_eps * d / k,
        "tie_word_embeddings": False,
    }
    state = float64_state(model)
    dot = f"{prefix}." if prefix else ""

    def writer(name):  # rows of a module that writes into the stream: W (d, *) -> Q^T W (k, *)
        state[name] = q.T @ state[name]

    def reader(name, norm):  # W (*, d) reading RMSNorm(x) with weight g -> W diag(g) Q * sqrt(d / k)
        state[name] = (state[name] * state[norm][None, :]) @ q * scale

    state[f"{dot}embed_tokens.weight"] = state[f"{dot}embed_tokens.weight"] @ q
    for i in range(len(base.layers)):
        for name in (f"{dot}layers.{i}.self_attn.o_proj", f"{dot}layers.{i}.mlp.down_proj"):
            writer(f"{name}.weight")
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = q.T @ state[f"{name}.bias"]
    groups = norm_readers(model)
    for readers, norm in groups:
        for name in readers:
            reader(f"{name}.weight", f"{norm}.weight")
    for _, norm in groups:  # after every reader took its weight: the new norms are plain
        state[f"{norm}.weight"] = torch.ones(k, dtype=torch.float64)
    state[f"{dot}norm.weight"] = torch.ones(k, dtype=torch.float64)  # also without a head
    return rebuild(model, overrides, state), overrides


class LlamaFamily(HiddenFamily):
    """Pre-norm RMSNorm decoders: `...ForCausalLM`, `...ForSequenceClassification` or the base model."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def states(self, model: nn.Module) -> list[str]:
        prefix, base, _ = _parts(model)
        dot = f"{prefix}." if prefix else ""
        return [f"{dot}layers.{i}" for i in range(len(base.layers))] + [f"{dot}norm"]

    def budget_inputs(self, model: nn.Module) -> list[str]:
        # A norm's output is its first reader's input.
        return [readers[0] for readers, _ in norm_readers(model)]

    def output_errors(self, model, report, statistics) -> torch.Tensor:
        """The mean over the norms' readers (every layer's Q/K/V and gate/up, the head) of their relative output
        errors ([`hf_rmtkd.output_error.reader_errors`]): each reader weighs the same, whatever its scale."""
        module = model.get_submodule
        errors = [
            reader_errors(
                torch.cat([module(r).weight.detach() for r in readers]), module(norm).weight.detach(),
                statistics[readers[0]].sum_outer, report.eigenvectors,
            )
            for readers, norm in norm_readers(model)
        ]  # fmt: skip
        return torch.stack(errors).mean(0)

    def slice(self, model, report, width, states, calibration_data, options, progress) -> SliceResult:
        top = top_directions(report, width)
        new, overrides = slice_hidden(model, top)
        return SliceResult(new, overrides, StreamMap(top, compare_final=False))


register_family(LlamaFamily())
