"""The hidden-width site for post-LN encoders (BERT, RoBERTa, MPNet): an approximation that distillation recovers.

In a post-LN encoder the residual stream is the output of a LayerNorm: the embeddings' norm, then `LN1(attention +
x)` and `LN2(FFN + x)` in every layer. The stream is projected onto `Q` (`d x k`, the top eigenvectors of its pooled
uncentred covariance, as for decoders): embeddings, FFN inputs and outputs and the heads' readers absorb `Q`
exactly. Three parts cannot, and are approximated from the calibration data:

- **The norms.** `LayerNorm_d` centres over the `d` coordinates and scales elementwise; neither commutes with a
  rotation. Two free rotations inside the kept subspace take care of most of it: the subspace is turned to lie as
  close as possible to `k` stream coordinates (orthogonal Procrustes), so elementwise weights act on nearly the same
  coordinates, and then so that the all-ones vector projects onto the all-ones vector, so that `LayerNorm_k`'s
  centring removes what `LayerNorm_d`'s did (exact when the all-ones direction is kept). Then each new norm's weight
  and bias are the per-coordinate least-squares fit of `Q^T LayerNorm_d(x)` (the teacher's projected output) on
  `LayerNorm_k(Q^T x)` without affine (the new model's normalised input), over the calibration tokens. At `k = d`
  this is exact for the identity, and for any rotation when the norm weights are equal (tested); what is left is the off-diagonal part of
  `Q^T diag(g) Q`, for self-distillation to recover.
- **The attention heads.** BERT ties the head size to `hidden_size / heads`, so every head shrinks from `h` to
  `r = k / heads` dimensions. Per head, the bilinear score form `W_q^T W_k` and the value-output map `W_o W_v`
  (biases as an extra input coordinate) are replaced by their best rank-`r` approximations in the metric of the
  layer input's covariance `S` (truncated SVD of `S^(1/2) W_q^T W_k S^(1/2)` and of `W_o W_v S^(1/2)`), and the
  queries are rescaled by `sqrt(r / h)` for the new `1 / sqrt(r)` score scaling. Exact when `r >= h`.
- **The pooler / classification head.** Its `d` tanh units must become `k`: the `k` units with the largest
  pre-activation RMS times the norm of their outgoing weights are kept (a coordinate selection, exact at `k = d`).

The result is a plain model of the same class with `hidden_size = k`; the record stores the override.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..calibration import ActivationStatistics, flatten_samples, run_calibration, sum_across_processes
from ..kept_basis import StreamMap
from .family import HiddenFamily, SliceResult, register_family, top_directions
from .rebuild import float64_state, rebuild


# Paths inside one encoder layer: query, key, value, attention output, norm 1, FFN in, FFN out, norm 2.
_LAYER_PATHS = {
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"),
    "mpnet": ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
              "attention.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"),
}  # fmt: skip
ENCODER_FAMILIES = {"bert": "bert", "roberta": "bert", "mpnet": "mpnet"}


class EncoderLayout:
    """Where the stream is read and written in a supported post-LN encoder with its head.

    Attributes:
        prefix: the base model's attribute (`"bert"`, `"roberta"`, `"mpnet"`), or `""` for a base model.
        layers: one tuple of module paths per layer, in `_LAYER_PATHS` order.
        norms: every LayerNorm whose output is the stream (embeddings, then per layer norm 1 and norm 2).
        states: modules whose input is a stream state, one per norm (layer inputs, FFN inputs, the final reader).
        tanh_block: `(dense, out)` of a pooler or classification head (`out` may be `None`), or `None`.
        readers: Linear heads reading the final stream directly (token classification).
    """

    def __init__(self, model: nn.Module):
        config = model.config
        family = ENCODER_FAMILIES[config.model_type]
        self.prefix = model.base_model_prefix if hasattr(model, model.base_model_prefix) else ""
        base = getattr(model, self.prefix) if self.prefix else model
        dot = f"{self.prefix}." if self.prefix else ""
        self.embeddings = f"{dot}embeddings"
        count = len(base.encoder.layer)
        self.layers = [tuple(f"{dot}encoder.layer.{i}.{p}" for p in _LAYER_PATHS[family]) for i in range(count)]
        self.norms = [f"{self.embeddings}.LayerNorm"] + [n for paths in self.layers for n in (paths[4], paths[7])]
        self.readers: list[str] = []
        self.tanh_block = None
        classifier = getattr(model, "classifier", None)
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            self.tanh_block = (f"{dot}pooler.dense", "classifier" if isinstance(classifier, nn.Linear) else None)
            final = f"{dot}pooler"
        elif classifier is not None and hasattr(classifier, "out_proj"):
            self.tanh_block, final = ("classifier.dense", "classifier.out_proj"), "classifier"
        elif isinstance(classifier, nn.Linear):
            self.readers, final = ["classifier"], "classifier"
        else:
            raise TypeError(
                f"{type(model).__name__}: the hidden-width site of post-LN encoders supports the base model with a "
                "pooler and the sequence- and token-classification heads."
            )
        heads = {n for n, _ in model.named_children()} - {self.prefix, "dropout", "classifier"}
        if self.prefix and heads:
            raise TypeError(
                f"{type(model).__name__}: heads {sorted(heads)} are not supported by the hidden-width site."
            )
        # The state after norm j is the input of: layer i (after the embeddings' or layer i-1's norm 2), FFN i (after
        # norm 1 of layer i), and the final reader (after the last norm 2).
        self.states = [state for i in range(count) for state in (f"{dot}encoder.layer.{i}", self.layers[i][5])]
        self.states.append(final)


class NormFitCollector:
    """Forward hooks on LayerNorms accumulating the per-coordinate regression of `Q^T LN_d(x)` on `LN_k(Q^T x)`.

    Sums per norm, each of shape `(k,)`, in float64: `n`, `n^2`, `t`, `n t` (with `n` the normalised projected input
    and `t` the projected output), and the token count.
    """

    def __init__(self, model: nn.Module, norm_names: list[str], basis: torch.Tensor, max_samples: int | None):
        self.basis = basis.to(torch.float64)
        self.max_samples = max_samples
        self.mask = None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in norm_names]

    def _hook(self, name: str):
        def hook(module, args, output):
            taken = self.counts.get(name, 0)
            if self.max_samples is not None and taken >= self.max_samples:
                return
            x = flatten_samples(args[0], self.mask, False)
            t = flatten_samples(output, self.mask, False)
            if self.max_samples is not None:
                x, t = x[: self.max_samples - taken], t[: self.max_samples - taken]
            q = self.basis.to(x.device)
            y = x.to(torch.float64) @ q
            n = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + module.eps)
            t = t.to(torch.float64) @ q
            sums = torch.stack([n.sum(0), (n * n).sum(0), t.sum(0), (n * t).sum(0)]).cpu()
            self.sums[name] = self.sums.get(name, 0) + sums
            self.counts[name] = taken + x.shape[0]

        return hook

    def end_batch(self) -> None:
        pass

    def full(self) -> bool:
        return self.max_samples is not None and all(self.counts.get(n, 0) >= self.max_samples for n in self.sums)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per norm, the least-squares `(weight, bias)`, each of shape `(k,)`."""
        result = {}
        for name in sorted(self.sums):
            count = torch.tensor([float(self.counts[name])], dtype=torch.float64)
            sums, count = sum_across_processes([self.sums[name], count])
            s_n, s_nn, s_t, s_nt = sums / count
            var = s_nn - s_n * s_n
            weight = torch.where(var > 1e-12, (s_nt - s_n * s_t) / var.clamp_min(1e-12), torch.zeros_like(var))
            result[name] = (weight, s_t - weight * s_n)
        return result


def align_to_coordinates(basis: torch.Tensor) -> torch.Tensor:
    """The same subspace, rotated to be as close as possible (orthogonal Procrustes) to the `k` stream coordinates
    it weighs most (largest rows of `basis`): elementwise norm weights then act on nearly the same coordinates.

    Args:
        basis (`torch.Tensor` of shape `(d, k)`): orthonormal columns.

    Returns:
        `basis @ R`, `R` orthogonal `(k, k)`; `basis` itself when it already selects coordinates.
    """
    k = basis.shape[1]
    kept = (basis * basis).sum(1).topk(k).indices.sort().values
    u, _, vh = torch.linalg.svd(basis[kept].T)  # Q^T S, with S selecting `kept`
    return basis @ (u @ vh)


def align_mean_direction(basis: torch.Tensor) -> torch.Tensor:
    """The same subspace, rotated so that the all-ones vector of the stream projects onto the all-ones vector of the
    kept coordinates: then `LayerNorm_k`'s centring removes the projection of `LayerNorm_d`'s (exactly when the
    all-ones direction lies in the subspace).

    Args:
        basis (`torch.Tensor` of shape `(d, k)`): orthonormal columns.

    Returns:
        `basis @ H`, with `H` the Householder reflection taking `basis^T 1_d` to the direction of `1_k`.
    """
    d, k = basis.shape
    w = basis.T @ torch.ones(d, dtype=basis.dtype, device=basis.device)
    v = w / w.norm() - torch.ones_like(w) / math.sqrt(k)
    if w.norm() < 1e-12 or v.norm() < 1e-12:
        return basis
    return basis - 2 * torch.outer(basis @ v, v) / (v @ v)


def encoder_basis(basis: torch.Tensor) -> torch.Tensor:
    """The basis [`slice_encoder`] slices with, shape `(d, k)` float64 CPU: `basis` aligned to the stream coordinates,
    then to the mean direction. The student's stream is approximately the teacher's times this matrix."""
    return align_mean_direction(align_to_coordinates(basis.to("cpu", torch.float64)))


def _metric(stats: ActivationStatistics, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`S^(1/2)` and `S^(-1/2)` of the augmented uncentred covariance of `z = [Q^T x; 1]`, shape `(k+1, k+1)`."""
    k = basis.shape[1]
    cov = torch.empty(k + 1, k + 1, dtype=torch.float64)
    cov[:k, :k] = basis.T @ stats.covariance(centered=False) @ basis
    cov[:k, k] = cov[k, :k] = basis.T @ stats.mean
    cov[k, k] = 1.0
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(values.max() * 1e-10)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def _augmented(state: dict, name: str, basis: torch.Tensor) -> torch.Tensor:
    """`[W Q, b]` of a Linear reading the stream, shape `(out, k+1)`."""
    return torch.cat([state[f"{name}.weight"] @ basis, state[f"{name}.bias"][:, None]], dim=1)


def _reduce_heads(state, paths, basis, root, inv_root, heads: int, new_head: int) -> None:
    """Rank-`new_head` per-head query/key and value/output maps in the metric of the layer input (see module doc)."""
    query, key, value, output = paths[:4]
    wq, wk, wv = (_augmented(state, p, basis) for p in (query, key, value))
    wo = basis.T @ state[f"{output}.weight"]  # (k, all_head)
    old_head = wq.shape[0] // heads
    new = {p: [] for p in (query, key, value)}
    new_o = []
    for h in range(heads):
        rows = slice(h * old_head, (h + 1) * old_head)
        u, s, vh = torch.linalg.svd(root @ wq[rows].T @ wk[rows] @ root)
        half = s[:new_head].sqrt()
        new[query].append((half[:, None] * u[:, :new_head].T) @ inv_root * math.sqrt(new_head / old_head))
        new[key].append((half[:, None] * vh[:new_head]) @ inv_root)
        u, s, vh = torch.linalg.svd(wo[:, rows] @ wv[rows] @ root, full_matrices=False)
        half = s[:new_head].sqrt()
        new[value].append((half[:, None] * vh[:new_head]) @ inv_root)
        new_o.append(u[:, :new_head] * half)
    for path, blocks in new.items():
        stacked = torch.cat(blocks)
        state[f"{path}.weight"], state[f"{path}.bias"] = stacked[:, :-1], stacked[:, -1]
    state[f"{output}.weight"] = torch.cat(new_o, dim=1)
    state[f"{output}.bias"] = basis.T @ state[f"{output}.bias"]


def _select_units(state, block, stats: ActivationStatistics, basis, k: int) -> None:
    """Keep the `k` tanh units of `block = (dense, out)` with the largest pre-activation RMS x outgoing weight norm."""
    dense, out = block
    weight, bias = state[f"{dense}.weight"], state[f"{dense}.bias"]
    # E[(w x + b)^2] = w E[x x^T] w^T + 2 b w E[x] + b^2, per unit, on the old stream.
    second = ((weight @ stats.covariance(centered=False)) * weight).sum(1)
    rms = (second + 2 * bias * (weight @ stats.mean) + bias**2).clamp_min(0).sqrt()
    importance = rms * (state[f"{out}.weight"].norm(dim=0) if out else 1.0)
    kept = importance.topk(k).indices.sort().values
    state[f"{dense}.weight"], state[f"{dense}.bias"] = weight[kept] @ basis, bias[kept]
    if out:
        state[f"{out}.weight"] = state[f"{out}.weight"][:, kept]


@torch.no_grad()
def slice_encoder(
    model: nn.Module,
    basis: torch.Tensor,
    stats: dict[str, ActivationStatistics],
    calibration_data,
    max_samples: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """A new post-LN encoder of the same class whose stream is `basis^T x`, its norms fitted on `calibration_data`.

    Args:
        model: a BERT, RoBERTa or MPNet base model, sequence or token classifier.
        basis (`torch.Tensor` of shape `(d, k)`): orthonormal columns; `k` a multiple of the number of heads.
        stats: statistics of the stream states, keyed by `EncoderLayout(model).states` (from the MP analysis).
        calibration_data: batches as for [`hf_rmtkd.collect_statistics`]; one more pass fits the norms.
        max_samples (`int`, *optional*): cap on tokens per norm for the fit.

    Returns:
        The new model (same device, dtype and train/eval mode) and the config overrides that rebuild it.
    """
    layout = EncoderLayout(model)
    config = model.config
    d, k = basis.shape
    heads = config.num_attention_heads
    if k % heads:
        raise ValueError(f"The kept width {k} must be a multiple of the {heads} attention heads.")
    q = encoder_basis(basis)
    collector = NormFitCollector(model, layout.norms, q, max_samples)
    run_calibration(model, calibration_data, collector, progress)
    norm_fits = collector.fits()
    state = float64_state(model)
    for name in [n for n in state if n.startswith(f"{layout.embeddings}.") and n.endswith("embeddings.weight")]:
        state[name] = state[name] @ q
    for i, paths in enumerate(layout.layers):
        root, inv_root = _metric(stats[layout.states[2 * i]], q)
        _reduce_heads(state, paths, q, root, inv_root, heads, k // heads)
        state[f"{paths[5]}.weight"] = state[f"{paths[5]}.weight"] @ q
        state[f"{paths[6]}.weight"] = q.T @ state[f"{paths[6]}.weight"]
        state[f"{paths[6]}.bias"] = q.T @ state[f"{paths[6]}.bias"]
    for name, (weight, bias) in norm_fits.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    for reader in layout.readers:
        state[f"{reader}.weight"] = state[f"{reader}.weight"] @ q
    if layout.tanh_block:
        _select_units(state, layout.tanh_block, stats[layout.states[-1]], q, k)
    overrides = {"hidden_size": k}
    return rebuild(model, overrides, state), overrides


class EncoderFamily(HiddenFamily):
    """Post-LN encoders (BERT, RoBERTa, MPNet): approximated, the norms fitted on a second pass over the data."""

    name = "post-LN encoder"
    model_types = tuple(ENCODER_FAMILIES)
    exact = False

    def states(self, model: nn.Module) -> list[str]:
        return EncoderLayout(model).states

    def slice(self, model, report, width, states, calibration_data, options, progress) -> SliceResult:
        top = top_directions(report, width)
        new, overrides = slice_encoder(model, top, states, calibration_data, options.max_samples, progress)
        return SliceResult(new, overrides, StreamMap(encoder_basis(top), compare_final=True))


register_family(EncoderFamily())
