"""Apply retained ranks to a model: locate, replace and resize modules. No statistics are gathered here.

The entry point is `reduce_site`, which computes the reduced weights of one analysed site (the data-driven step);
rebuilding reduced *shapes* from config records alone (the loading step) is [`hf_rmtkd.structure.apply_structure`].

FFN inner width (`kind="ffn"`), `d_ff -> k`, two methods:

* `"select"` (default): keep `k` neurons chosen by pivoted Cholesky on the post-activation covariance `C`, and
  fold the least-squares reconstruction of the dropped neurons into the output layer:
  `h ~ mu + B (h_S - mu_S)` with `B = C[:, S] C[S, S]^-1`, so `W2' = W2 B` and `b2' = b2 + W2 (mu - B mu_S)`. The
  kept neurons are computed exactly (no approximation through the activation function); the only error is the
  linear reconstruction of the dropped ones, which is optimal in mean square on the calibration data.
* `"project"` (the paper's fold): `P` = top-`k` eigenvectors, `W1' = P W1`, `b1' = P b1`, `W2' = W2 P^T`. This does
  not commute with the elementwise activation, so it is an approximation that self-distillation must recover.

Convolutional blocks (a ResNet basic block: `conv1 -> bn1 -> ReLU -> conv2`) are `kind="ffn"` sites too, with the
covariance taken over spatial positions: `"select"` keeps `k` channels of `conv1`/`bn1` and mixes the dropped ones
into `conv2`'s kernels. The mean correction becomes a bias of `conv2`; it is exact away from the image border, where
zero padding sees part of the constant (a small approximation that distillation recovers). `"project"` is not
defined there (BatchNorm and ReLU sit between the convolutions).

Linear factorisation (`kind="linear"`): with `P` the top-`k` eigenvectors of the input covariance,
`W x ~ (W P^T) P x + W (mu - P^T P mu)`: exact on the retained subspace and in the mean. It is applied only where it
saves parameters, `k (d_in + d_out) < d_in d_out`. A `LowRankLinear` site (a second compression) is refactorised the
same way from the dense map `up.W down.W` it computes, when the new rank is lower than its own; it stays one
`LowRankLinear` (never nested).

Convolution (`kind="conv"`, with `convolutions="factorize"`): the statistics are of the convolution's *output*
over spatial positions. With `U` the top-`k` eigenvectors of that covariance and `mu` its mean,
`y ~ U U^T y + (I - U U^T) mu`: a convolution with the original kernel `U^T W` to `k` channels, then a `1 x 1`
convolution `U` whose bias carries `U U^T b` and the mean of the dropped directions
([`~hf_rmtkd.layers.LowRankConv2d`]). Among all rank-`k` maps of the layer this is the one with the least mean-square
output error on the calibration data (the data-aware counterpart of truncating the weight's SVD); it is exact at
every position, the border included. Applied only where it saves parameters, `k (C_in kh kw + C_out) <
C_in C_out kh kw`.

Embedding table (`kind="embedding"`): the statistics are of the table's *output* (the rows the calibration tokens
look up, so frequent tokens weigh more). With `U` the top-`k` eigenvectors of that covariance and `mu` its mean,
`E[t] ~ U U^T E[t] + (I - U U^T) mu`: a `(V, k)` table `E U` and a `k -> d` linear map `U` whose bias carries the
mean of the dropped directions ([`~hf_rmtkd.layers.LowRankEmbedding`]). Tokens the calibration never looked up are
kept only through the retained directions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import LowRankConv2d, LowRankEmbedding, LowRankLinear
from .records import (
    ConvRecord,
    EmbeddingRecord,
    FFNRecord,
    LinearRecord,
    ModuleRecord,
    provenance_of,
)
from .sites import SITE_KINDS, linear_shape


FFN_METHODS = ("select", "project")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    # A new module starts in training mode; BatchNorm would then switch to batch statistics in an eval-mode model.
    module.train(getattr(parent, child).training)
    setattr(parent, child, module)


def weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as `(out_features, in_features)` float64 (`(out, in, kh, kw)` for a convolution), and the bias."""
    # Surgery runs on the CPU in float64, beside the statistics; `_assign` copies results back to the module's device.
    if isinstance(module, LowRankLinear):
        # Re-reducing a factorised layer: start from the dense map it computes, `up.W down.W`.
        down, _ = weight_and_bias(module.down)
        weight, bias = weight_and_bias(module.up)
        return weight @ down, bias
    if isinstance(module, LowRankConv2d):
        down, _ = weight_and_bias(module.down)
        up, bias = weight_and_bias(module.up)
        return torch.einsum("ok,kiyx->oiyx", up[:, :, 0, 0], down), bias
    weight = module.weight.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(module, Conv1D):
        weight = weight.T
    bias = module.bias.detach().to(device="cpu", dtype=torch.float64) if module.bias is not None else None
    return weight, bias


def _new_linear_like(module: nn.Module, in_features: int, out_features: int, bias: bool | None = None) -> nn.Module:
    """A module of the same type, device and dtype as `module`, with new widths (values uninitialised).

    `bias` defaults to whether `module` has one; `Conv1D` always has a bias. Convolutions keep their kernel, stride
    and padding; a `BatchNorm2d` gets `out_features` channels.
    """
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(
            out_features, module.eps, module.momentum, module.affine, module.track_running_stats, **factory
        )
    if isinstance(module, nn.Conv2d):
        bias = module.bias is not None if bias is None else bias
        return nn.Conv2d(
            in_features,
            out_features,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            bias,
            module.padding_mode,
            **factory,
        )
    if isinstance(module, Conv1D):
        new = Conv1D(out_features, in_features)
        return new.to(**factory)
    bias = module.bias is not None if bias is None else bias
    return nn.Linear(in_features, out_features, bias=bias, **factory)


def _assign(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Write a `(out, in)` weight (and bias) into an `nn.Linear` or `Conv1D`."""
    with torch.no_grad():
        target = weight.T if isinstance(module, Conv1D) else weight
        module.weight.copy_(target.to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype) if bias is not None else torch.zeros_like(module.bias))


def _inputs_per_rank(module: nn.Module, in_features: int) -> int:
    """Input-side weights per unit of rank of a factorisation: `C_in kh kw` for a convolution, else `in_features`."""
    conv = module.down if isinstance(module, LowRankConv2d) else module
    return conv.weight[0].numel() if isinstance(conv, nn.Conv2d) else in_features


def saves_parameters(in_features: int, out_features: int, rank: int) -> bool:
    """Whether a rank-`k` factorisation has fewer weights than the dense layer."""
    return rank * (in_features + out_features) < in_features * out_features


def pivoted_cholesky(cov: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of `k` coordinates picked greedily by largest residual variance (pivoted Cholesky), shape `(k,)`."""
    d = cov.shape[0]
    diag = cov.diagonal().clone()
    factors = torch.zeros(d, k, dtype=cov.dtype)
    picked = []
    for j in range(k):
        i = int(torch.argmax(diag))
        if diag[i] <= 0:
            # Remaining coordinates are exact linear combinations of those picked: any will do.
            rest = [c for c in range(d) if c not in set(picked)]
            picked.extend(rest[: k - j])
            break
        column = (cov[:, i] - factors[:, :j] @ factors[i, :j]) / diag[i].sqrt()
        factors[:, j] = column
        diag = diag - column**2
        diag[i] = -float("inf")
        picked.append(i)
    return torch.tensor(picked, dtype=torch.long)


def _sliced_channels(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a producer (`Linear`, `Conv1D`, `Conv2d`, `BatchNorm2d`) keeping only the output units `keep`."""
    new = _new_linear_like(module, linear_shape(module)[0], len(keep))
    if isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, name) is not None:
                    getattr(new, name).copy_(getattr(module, name)[keep])
            if module.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new
    w1, b1 = weight_and_bias(module)
    _assign(new, w1[keep], b1[keep] if b1 is not None else None)
    return new


def _mix_inputs(weight: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """`weight` applied after `mixing`: `(out, d)` x `(d, k)` -> `(out, k)`; convolution kernels channel-wise."""
    return torch.einsum("ocyx,cj->ojyx", weight, mixing) if weight.dim() == 4 else weight @ mixing


def _response_to_constant(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Output of the layer for a constant input `value` of shape `(d,)` (a convolution: away from the border)."""
    return weight.sum(dim=(2, 3)) @ value if weight.dim() == 4 else weight @ value


def _reduce_ffn(model: nn.Module, site, centered: bool, method: str) -> bool:
    stats, k = site.statistics, site.rank
    consumer = model.get_submodule(site.name)
    w2, b2 = weight_and_bias(consumer)
    producers = [(p, model.get_submodule(p)) for p in site.producers]
    if method == "project" and isinstance(consumer, nn.Conv2d):
        raise ValueError(
            f"`ffn_method='project'` is not defined for the convolutional block {site.name!r} (BatchNorm and ReLU sit "
            "between its convolutions); use 'select'."
        )
    if method == "select":
        cov = stats.covariance(centered)
        keep = pivoted_cholesky(cov, k)
        scale = float(cov.diagonal().mean())
        if scale > 0:
            ridge = 1e-8 * scale * torch.eye(k, dtype=cov.dtype)
            # B = C[:, S] C[S, S]^-1, via a solve on the symmetric (k, k) block.
            mixing = torch.linalg.solve(cov[keep][:, keep] + ridge, cov[keep, :]).T
        else:
            # Zero covariance (a dead layer): the dropped neurons are constant, so only the mean term below carries
            # them; there is nothing to reconstruct from the kept ones (and the solve would be singular).
            mixing = torch.zeros(cov.shape[0], k, dtype=cov.dtype)
        new_w2 = _mix_inputs(w2, mixing)
        new_b2 = b2
        if centered:
            mu = stats.mean
            offset = _response_to_constant(w2, mu - mixing @ mu[keep])
            new_b2 = offset if b2 is None else b2 + offset
        for path, module in producers:
            _set_module(model, path, _sliced_channels(module, keep))
    else:
        projection = site.eigenvectors[:, :k].T  # (k, d_ff), orthonormal rows
        new_w2, new_b2 = w2 @ projection.T, b2
        for path, module in producers:
            w1, b1 = weight_and_bias(module)
            new = _new_linear_like(module, w1.shape[1], k)
            _assign(new, projection @ w1, projection @ b1 if b1 is not None else None)
            _set_module(model, path, new)
    new_consumer = _new_linear_like(consumer, k, w2.shape[0], bias=new_b2 is not None)
    _assign(new_consumer, new_w2, new_b2)
    _set_module(model, site.name, new_consumer)
    return new_b2 is not None


def _reduce_linear(model: nn.Module, site, centered: bool) -> bool:
    module = model.get_submodule(site.name)
    weight, bias = weight_and_bias(module)
    projection = site.eigenvectors[:, : site.rank].T  # (k, d_in)
    new_bias = bias
    if centered:
        mu = site.statistics.mean
        offset = weight @ (mu - projection.T @ (projection @ mu))
        new_bias = offset if bias is None else bias + offset
    reference = next(module.parameters())
    factory = {"device": reference.device, "dtype": reference.dtype}
    new = LowRankLinear(weight.shape[1], weight.shape[0], site.rank, bias=new_bias is not None).to(**factory)
    with torch.no_grad():
        new.down.weight.copy_(projection.to(new.down.weight.dtype))
        new.up.weight.copy_((weight @ projection.T).to(new.up.weight.dtype))
        if new_bias is not None:
            new.up.bias.copy_(new_bias.to(new.up.bias.dtype))
    _set_module(model, site.name, new)
    return new_bias is not None


def embedding_table(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(V, d)` table an `nn.Embedding` or `LowRankEmbedding` looks rows up in (float64, CPU) and its bias."""
    if isinstance(module, LowRankEmbedding):
        table = module.down.weight.detach().to(device="cpu", dtype=torch.float64)
        up, bias = weight_and_bias(module.up)
        return table @ up.T, bias
    return module.weight.detach().to(device="cpu", dtype=torch.float64), None


def _kept_output_bias(site, bias: torch.Tensor | None, centered: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a site cut on its own output `y = f(x) + b`: the kept basis `U` `(d, k)` and the bias of `U U^T y`, which
    is `U U^T b` plus, centred, the dropped directions' mean `(I - U U^T) mu` (`None` when there is neither)."""
    basis = site.eigenvectors[:, : site.rank]  # orthonormal columns
    new_bias = None if bias is None else basis @ (basis.T @ bias)
    if centered:
        mu = site.statistics.mean
        offset = mu - basis @ (basis.T @ mu)
        new_bias = offset if new_bias is None else new_bias + offset
    return basis, new_bias


def _reduce_embedding(model: nn.Module, site, centered: bool) -> bool:
    module = model.get_submodule(site.name)
    table, bias = embedding_table(module)
    basis, new_bias = _kept_output_bias(site, bias, centered)  # (d, k)
    reference = next(module.parameters())
    new = LowRankEmbedding(table.shape[0], table.shape[1], site.rank, new_bias is not None, module.padding_idx)
    new = new.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        new.down.weight.copy_((table @ basis).to(new.down.weight.dtype))
        new.up.weight.copy_(basis.to(new.up.weight.dtype))
        if new_bias is not None:
            new.up.bias.copy_(new_bias.to(new.up.bias.dtype))
    _set_module(model, site.name, new)
    return new_bias is not None


def _reduce_conv(model: nn.Module, site, centered: bool) -> bool:
    module = model.get_submodule(site.name)
    weight, bias = weight_and_bias(module)  # (C_out, C_in, kh, kw)
    basis, new_bias = _kept_output_bias(site, bias, centered)  # (C_out, k)
    new = LowRankConv2d.like(module, site.rank, bias=new_bias is not None)
    with torch.no_grad():
        new.down.weight.copy_(torch.einsum("ok,oiyx->kiyx", basis, weight).to(new.down.weight.dtype))
        new.up.weight.copy_(basis[:, :, None, None].to(new.up.weight.dtype))
        if new_bias is not None:
            new.up.bias.copy_(new_bias.to(new.up.bias.dtype))
    _set_module(model, site.name, new)
    return new_bias is not None


def _check_site_matches(model: nn.Module, site, in_features: int) -> None:
    """Refuse an analysis whose widths are not the model's (a stale report, or one from another model)."""
    widths = {site.name: in_features}
    widths.update({p: linear_shape(model.get_submodule(p))[1] for p in site.producers})
    wrong = {path: width for path, width in widths.items() if width != site.dim}
    if wrong:
        raise ValueError(
            f"Site {site.name!r} was analysed at width {site.dim}, but the model now has {wrong}: the report was "
            "computed on another model or before the model changed. Analyse this model again."
        )


def reduce_site(model: nn.Module, site, centered: bool = True, ffn_method: str = "select") -> ModuleRecord | None:
    """Reduce one analysed site of `model` in place.

    Args:
        model (`nn.Module`): the model whose module paths `site` refers to.
        site ([`~hf_rmtkd.analysis.SiteReport`]): analysis with statistics and the retained `rank`.
        centered (`bool`, *optional*, defaults to `True`): whether the statistics were centred (bias correction).
        ffn_method (`str`, *optional*, defaults to `"select"`): `"select"` or `"project"` (see module docstring).

    Returns:
        The config record of the reduction, or `None` when the site was left dense (a factorisation that would not
        save parameters, or a rank equal to the width) or a `LowRankLinear` already at `site.rank` or lower.

    Raises:
        `ValueError` if `site`'s width is not the module's (the report is stale or from another model).
    """
    if ffn_method not in FFN_METHODS:
        raise ValueError(f"`ffn_method` must be one of {FFN_METHODS}, got {ffn_method!r}.")
    module = model.get_submodule(site.name)
    in_features, out_features = linear_shape(module)
    # A kind that reads outputs (a token table, a factorised convolution) is analysed at its output width.
    _check_site_matches(model, site, out_features if SITE_KINDS[site.kind].reads_output else in_features)
    if site.rank >= site.dim:
        return None
    provenance = provenance_of(site)
    if site.kind == "ffn":
        bias = _reduce_ffn(model, site, centered, ffn_method)
        shape = {"in_features": in_features, "out_features": out_features, "rank": site.rank, "bias": bias}
        return FFNRecord(**shape, **provenance, producers=list(site.producers), ffn_method=ffn_method)
    reduce, factorised, record = _FACTORISATIONS[site.kind]
    if not saves_parameters(_inputs_per_rank(module, in_features), out_features, site.rank):
        return None
    if isinstance(module, factorised) and site.rank >= module.rank:
        return None  # already at this rank or lower
    bias = reduce(model, site, centered)
    return record(in_features=in_features, out_features=out_features, rank=site.rank, bias=bias, **provenance)


# Factorising kinds: the surgery, the module it leaves, and its record.
_FACTORISATIONS = {
    "linear": (_reduce_linear, LowRankLinear, LinearRecord),
    "embedding": (_reduce_embedding, LowRankEmbedding, EmbeddingRecord),
    "conv": (_reduce_conv, LowRankConv2d, ConvRecord),
}
# The module a factorising record leaves at its path (an FFN record leaves narrower dense modules instead).
FACTORISED_MODULES = {kind: module for kind, (_, module, _) in _FACTORISATIONS.items()}
