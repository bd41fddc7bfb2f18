"""The peers RMT-KD is measured against, and the measurements: truncated SVD, activation PCA, layer dropping.

Each baseline starts from the same fine-tuned teacher and is then distilled from it with the same budget as RMT-KD
(`RMTKDTrainer` with `reduction_schedule="none"` and the teacher as external teacher, in `bench_peers.py`).

* `svd_like`: every module RMT-KD reduced is replaced by a truncated SVD of its weight (`W ~ U_r S_r V_r^T`, two
  dense layers; a conv `C_in -> C_out` becomes `C_in -> r` with the same kernel, then a 1x1 conv `r -> C_out`). The
  rank is RMT-KD's for a factorised linear layer (same parameters); for an FFN or conv block, whose inner width RMT-KD
  shrinks, both of the block's layers are factorised at the one rank that gives the block RMT-KD's parameter count.
* `svd_to_size`: every linear and convolution layer and the token table truncated to one shared fraction of its
  parameters so that the whole model reaches a parameter count: the baseline for rows whose width or token table
  RMT-KD reduced, which `svd_like` cannot follow site by site, and SVD with its own (uniform) allocation of ranks.
* `pca_energy`: RMT-KD's own sites and surgery, with the rank of each site set by the energy rule (the smallest `k`
  whose top eigenvalues hold 95% of the activation variance) instead of the MP edge: the "no random-matrix theory"
  ablation.
* `drop_layers`: DistilBERT-style: keep evenly spaced blocks (always the first, which may change the width) of every
  stack of repeated blocks, as many as bring the parameter count closest to a target.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_rmtkd.analysis import SpectralOptions, analyze_sites
from hf_rmtkd.compression import to_rmtkd
from hf_rmtkd.layers import LowRankEmbedding
from hf_rmtkd.pipeline import apply_report
from hf_rmtkd.sites import select_sites


_IN_BLOCK = re.compile(r"\.\d+\.")


# -- truncated SVD ---------------------------------------------------------------------------------------------------
def svd_factor(module: nn.Module, rank: int) -> nn.Sequential:
    """`module` (an `nn.Linear` or `nn.Conv2d`) as two layers through a rank-`rank` truncated SVD of its weight."""
    weight = module.weight.detach().to(torch.float64).flatten(1)  # (out, in * kh * kw)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    first_w, second_w = root[:, None] * vh[:rank], u[:, :rank] * root
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, module.out_features, bias=has_bias)
    elif isinstance(module, nn.Conv2d):
        first = nn.Conv2d(
            module.in_channels, rank, module.kernel_size, module.stride, module.padding, module.dilation, bias=False
        )
        second = nn.Conv2d(rank, module.out_channels, 1, bias=has_bias)
    else:
        raise TypeError(f"svd_factor handles nn.Linear and nn.Conv2d, got {type(module).__name__}.")
    factory = {"dtype": module.weight.dtype, "device": module.weight.device}
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(first.weight.shape))
        second.weight.copy_(second_w.reshape(second.weight.shape))
        if has_bias:
            second.bias.copy_(module.bias)
    return nn.Sequential(first, second).to(**factory)


def _factorable(model: nn.Module, paths: list[str]) -> list[str]:
    return [p for p in paths if isinstance(model.get_submodule(p), (nn.Linear, nn.Conv2d))]


def _unit_cost(module: nn.Module) -> int:
    """Weights per unit of rank of a factorised layer: `d_in * kh * kw + d_out`."""
    weight = module.weight
    return weight[0].numel() + weight.shape[0]


def svd_like(teacher: nn.Module, reduced_modules: dict[str, dict], compressed: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of `teacher` with every site in `reduced_modules` replaced by a parameter-matched truncated SVD.

    Args:
        teacher: the fine-tuned Hugging Face model (paths as in `reduced_modules`).
        reduced_modules: `RMTKDConfig.reduced_modules` of the RMT-KD result.
        compressed: the RMT-KD result's inner model, to read each site's parameter budget from.

    Returns:
        The factorised model and `{site: svd rank}`.
    """
    model, ranks = copy.deepcopy(teacher), {}
    for name, record in reduced_modules.items():
        paths = list(getattr(record, "producers", [])) + [name]
        budget = sum(p.numel() for path in paths for p in compressed.get_submodule(path).parameters())
        layers = _factorable(model, paths)
        fixed = sum(p.numel() for path in paths if path not in layers for p in model.get_submodule(path).parameters())
        biases = sum(model.get_submodule(p).bias.numel() for p in layers if model.get_submodule(p).bias is not None)
        cost = sum(_unit_cost(model.get_submodule(p)) for p in layers)
        rank = max(1, (budget - fixed - biases) // cost)
        for path in layers:
            parent, _, child = path.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model, child, svd_factor(model.get_submodule(path), rank)
            )
        ranks[name] = int(rank)
    return model, ranks


def svd_embedding(embedding: nn.Embedding, rank: int) -> LowRankEmbedding:
    """A token table `(V, d)` as `LowRankEmbedding` through its rank-`rank` truncated SVD (`U_r S_r` rows, `V_r^T` up)."""
    u, s, vh = torch.linalg.svd(embedding.weight.detach().to(torch.float64), full_matrices=False)
    low = LowRankEmbedding(embedding.num_embeddings, embedding.embedding_dim, rank, bias=False)
    with torch.no_grad():
        low.down.weight.copy_(u[:, :rank] * s[:rank])
        low.up.weight.copy_(vh[:rank].T)
    return low.to(embedding.weight.dtype)


def _area(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1]


def svd_to_size(
    teacher: nn.Module, target_params: int, skip: tuple[str, ...] = ("classifier",)
) -> tuple[nn.Module, dict]:
    """A copy of `teacher` with every linear and convolution layer and the token table truncated by SVD to one
    shared fraction of its parameters, the largest fraction that brings the whole model to at most `target_params`.

    What a user without RMT-KD does to hit a parameter budget: no calibration, no per-site choice. A weight of
    `d_out` rows and `d_in` columns (a convolution's columns are `C_in * kh * kw`) at rank `r` costs `r (d_in + d_out)`,
    so a fraction `f` of its `d_in d_out` weights is rank `floor(f d_in d_out / (d_in + d_out))`; weights whose rank
    would not fall below that are left dense. What the rounding leaves under the target goes, one rank at a time, to
    the weights furthest below the fraction.

    Args:
        teacher: any model; its `nn.Linear` and `nn.Conv2d` modules and its input token table are the candidates,
            except the modules named in `skip` and everything under them; position tables stay dense.
        target_params: the whole-model parameter count to reach (the matched row's).
        skip: module paths kept dense with their submodules: the task head by default (a CNN's stem and head are
            passed by the caller, a rank-4 stem being a bottleneck no user would build).

    Returns:
        The factorised model and `{module path: rank}`.

    Raises:
        ValueError: when even rank 1 everywhere stays above `target_params`.
    """
    total = sum(p.numel() for p in teacher.parameters())
    try:
        table = teacher.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # an image model has no token table
        table = None

    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in skip)

    shapes = {
        # (rows, columns) of the weight as a matrix: a convolution's kernel is flattened into its columns.
        name: (module.weight.shape[0], module.weight[0].numel())
        for name, module in teacher.named_modules()
        if (isinstance(module, (nn.Linear, nn.Conv2d)) or module is table) and not skipped(name)
    }

    def ranks(fraction: float) -> dict[str, int]:
        plan = {}
        for name, (rows, cols) in shapes.items():
            rank = max(1, int(fraction * rows * cols / (rows + cols)))
            if rank * (rows + cols) < rows * cols:
                plan[name] = rank
        return plan

    def count(plan: dict[str, int]) -> int:
        return total - sum(shapes[n][0] * shapes[n][1] - r * sum(shapes[n]) for n, r in plan.items())

    if count(ranks(0.0)) > target_params:
        raise ValueError(
            f"Truncated SVD at rank 1 everywhere keeps {count(ranks(0.0)):,} > {target_params:,} parameters."
        )
    low, high = 0.0, 1.0
    for _ in range(40):  # bisection on the shared fraction: the count is monotone in it
        middle = (low + high) / 2
        low, high = (middle, high) if count(ranks(middle)) <= target_params else (low, middle)
    plan = ranks(low)
    # Integer ranks leave the count short of the target (2% of ResNet-56's at half its size): the rest is spent one
    # rank at a time on the weight furthest below the shared fraction, which keeps the allocation uniform.
    while True:
        spare = target_params - count(plan)
        options = [
            n for n, r in plan.items() if sum(shapes[n]) <= spare and (r + 1) * sum(shapes[n]) < _area(shapes[n])
        ]
        if not options:
            break
        plan[min(options, key=lambda n: plan[n] * sum(shapes[n]) / _area(shapes[n]))] += 1
    model = copy.deepcopy(teacher)
    for path, rank in plan.items():
        module = model.get_submodule(path)
        new = svd_embedding(module, rank) if isinstance(module, nn.Embedding) else svd_factor(module, rank)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model, plan


# -- activation PCA with an energy rule -----------------------------------------------------------------------------
def energy_rank(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest `k` whose top-`k` eigenvalues (descending) hold at least `energy` of their sum."""
    values = eigenvalues.clamp_min(0)
    share = values.cumsum(0) / values.sum()
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1


def pca_energy(teacher: nn.Module, calibration, target_modules=None, energy: float = 0.95, seed: int = 0):
    """A copy of `teacher` reduced at RMT-KD's sites with the energy rule instead of the MP edge (one shot)."""
    model = to_rmtkd(copy.deepcopy(teacher))
    sites = select_sites(model.model, target_modules)
    report = analyze_sites(model.model, calibration, sites, SpectralOptions(seed=seed), progress=True)
    for site in report.values():
        site.rank = min(site.dim, energy_rank(site.eigenvalues, energy))
    apply_report(model, report)
    return model, {name: site.rank for name, site in report.items()}


# -- layer dropping ------------------------------------------------------------------------------------------------
def block_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every `nn.ModuleList`/`nn.Sequential` of at least 2 children of one type named 0, 1, ... (encoder layers, stages)."""
    stacks = []
    for name, module in model.named_modules():
        children = list(module.children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) >= 2:
            if len({type(c) for c in children}) == 1 and not isinstance(children[0], (nn.Linear, nn.Conv2d)):
                stacks.append((name, module))
    return stacks


def _keep(n: int, m: int) -> list[int]:
    """`m` evenly spaced indices of `range(n)`, always including 0."""
    return sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)}) if m > 1 else [0]


def drop_layers(teacher: nn.Module, target_params: int) -> tuple[nn.Module, dict]:
    """A copy of `teacher` keeping the same share of every block stack, the share that lands closest to `target_params`."""
    stacks = block_stacks(teacher)
    sizes = {name: [sum(p.numel() for p in child.parameters()) for child in stack] for name, stack in stacks}
    total = sum(p.numel() for p in teacher.parameters())

    def plan(share: int) -> dict[str, list[int]]:
        return {name: _keep(len(blocks), max(1, round(len(blocks) * share / 100))) for name, blocks in sizes.items()}

    def count(kept: dict[str, list[int]]) -> int:
        return total - sum(sum(b) - sum(b[i] for i in kept[name]) for name, b in sizes.items())

    kept = min((plan(share) for share in range(1, 101)), key=lambda k: abs(count(k) - target_params))
    model = copy.deepcopy(teacher)
    for name, keep in kept.items():
        stack = model.get_submodule(name)
        children = [list(stack.children())[i] for i in keep]
        new = nn.Sequential(*children) if isinstance(stack, nn.Sequential) else nn.ModuleList(children)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers") and len(kept) == 1:
        config.num_hidden_layers = len(next(iter(kept.values())))
    return model, kept


# -- measurements ----------------------------------------------------------------------------------------------------
def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(whole model, inside repeated blocks: encoder layers or residual stages)."""
    named = list(model.named_parameters())
    return sum(p.numel() for _, p in named), sum(p.numel() for n, p in named if _IN_BLOCK.search(f".{n}"))


@torch.no_grad()
def flops(model: nn.Module, inputs: dict) -> int:
    """FLOPs of one forward on `inputs` (matmuls and convolutions, as counted by torch's FlopCounterMode)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(**inputs)
    return counter.get_total_flops()
