"""Reduced module types: the low-rank factorisation `W ~ (W P^T) P` as two dense linears."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """`y = up(down(x))` with `down: in -> rank` (no bias) and `up: rank -> out`: `rank (in + out)` weights.

    Args:
        in_features (`int`): input width `d_in`.
        out_features (`int`): output width `d_out`.
        rank (`int`): inner width `k`.
        bias (`bool`, *optional*, defaults to `True`): bias on `up`.

    Shapes: input `(..., in_features)`, output `(..., out_features)`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
