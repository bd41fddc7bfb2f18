"""Post-training baselines for decoders at a given parameter count: PCA slicing (SliceGPT's construction) and
whitened truncated SVD (SVD-LLM's construction)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hf_rmtkd.calibration import collect_statistics
from hf_rmtkd.layers import LowRankLinear
from hf_rmtkd.surgery import saves_parameters


LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def linear_sites(model: nn.Module) -> list[str]:
    """Every linear layer inside the decoder layers of a Llama-family model."""
    return [f"model.layers.{i}.{name}" for i in range(len(model.model.layers)) for name in LLAMA_LINEARS]


def sliced_params(model: nn.Module, width: int) -> int:
    """Parameters of `model` sliced to a hidden width `width` (built on the meta device: no memory, no weights)."""
    config = copy.deepcopy(model.config)
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    config.hidden_size, config.head_dim, config.tie_word_embeddings = width, head_dim, False
    with torch.device("meta"):
        return type(model)(config).num_parameters()


def width_for_params(model: nn.Module, target: int, multiple: int) -> int:
    """The largest multiple of `multiple` whose sliced model has at most `target` parameters."""
    width = model.config.hidden_size
    while width > multiple and sliced_params(model, width) > target:
        width -= multiple
    return width


def _cholesky(second: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a second-moment matrix, with the smallest ridge (relative 1e-6, then x10) that makes a
    rank-deficient one (fewer tokens than features, dead units) positive definite."""
    scale = float(second.diagonal().mean()) or 1.0
    eye = torch.eye(second.shape[0], dtype=second.dtype)
    for exponent in range(-6, 1):
        lower, info = torch.linalg.cholesky_ex(second + 10.0**exponent * scale * eye)
        if int(info) == 0:
            return lower
    raise ValueError("the second moment is not positive definite even with a ridge of its mean variance")


@torch.no_grad()
def whitened_svd(model: nn.Module, calibration, target_params: int, progress: bool = False) -> nn.Module:
    """SVD-LLM's construction: every linear site `W` (out x in) is factorised as `(U_k S_k)(V_k^T L^-1)` from the SVD
    of `W L`, `L` the Cholesky factor of the input's uncentred second moment (so truncation minimises the output
    error on the calibration data), with one rank ratio for all sites chosen to reach `target_params`."""
    compressed = copy.deepcopy(model)
    names = linear_sites(compressed)
    stats, _ = collect_statistics(compressed, calibration, names, None, progress)
    factors = {}
    for name in names:
        weight = compressed.get_submodule(name).weight.detach().double()
        second = stats[name].covariance(centered=False)
        lower = _cholesky(second)
        u, s, vh = torch.linalg.svd(weight @ lower, full_matrices=False)
        factors[name] = (u * s, torch.linalg.solve_triangular(lower, vh, upper=False, left=False))
    full = compressed.num_parameters()
    dense = sum(compressed.get_submodule(n).weight.numel() for n in names)
    # Each site keeps rank k = ratio * in * out / (in + out): the same share of its weights.
    ratio = max(0.0, 1.0 - (full - target_params) / dense)
    for name in names:
        module = compressed.get_submodule(name)
        out_features, in_features = module.weight.shape
        rank = max(1, int(ratio * in_features * out_features / (in_features + out_features)))
        if not saves_parameters(in_features, out_features, rank):
            continue
        up, down = factors[name]
        low = LowRankLinear(in_features, out_features, rank, bias=module.bias is not None)
        low.down.weight.copy_(down[:rank].to(low.down.weight.dtype))
        low.up.weight.copy_(up[:, :rank].to(low.up.weight.dtype))
        if module.bias is not None:
            low.up.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(compressed.get_submodule(parent), child, low.to(module.weight.device))
    return compressed
