"""Reduced module types: the low-rank factorisation `W ~ (W P^T) P` as two dense linears, a factorised embedding
table, and a factorised convolution."""

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


class LowRankEmbedding(nn.Module):
    """`up(down(ids))`: a `(num_embeddings, rank)` table, then `rank -> embedding_dim`: `rank (V + d)` weights
    instead of `V d`. The ALBERT factorisation, here with the kept basis of the table's output covariance as `up`.

    Args:
        num_embeddings (`int`): vocabulary size `V`.
        embedding_dim (`int`): output width `d`.
        rank (`int`): inner width `k`.
        bias (`bool`, *optional*, defaults to `True`): bias on `up` (the mean correction of the dropped directions).
        padding_idx (`int`, *optional*): as `nn.Embedding`'s, on the `down` table (its row stays zero).

    Shapes: input `(...)` token ids, output `(..., embedding_dim)`.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, rank: int, bias: bool = True, padding_idx: int | None = None
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.down = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.up = nn.Linear(rank, embedding_dim, bias=bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(input_ids))

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """`up(down(x))`: a `k x k` convolution `in_channels -> rank` (no bias) with the original kernel, stride, padding
    and dilation, then a `1 x 1` convolution `rank -> out_channels`: `rank (in_channels kh kw + out_channels)`
    weights instead of `in_channels out_channels kh kw`.

    Args:
        in_channels (`int`), out_channels (`int`): channels of the convolution it replaces.
        rank (`int`): inner channels `k`.
        kernel_size, stride, padding, dilation: as the replaced `nn.Conv2d`'s (on `down`).
        bias (`bool`, *optional*, defaults to `True`): bias on `up`.

    Shapes: input `(batch, in_channels, H, W)`, output `(batch, out_channels, H', W')` as the replaced convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.down = nn.Conv2d(in_channels, rank, kernel_size, stride, padding, dilation, bias=False)
        self.up = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @classmethod
    def like(cls, conv: nn.Module, rank: int, bias: bool) -> LowRankConv2d:
        """An uninitialised factorisation with the channels and geometry (kernel, stride, padding, dilation) of
        `conv` (an `nn.Conv2d` or a `LowRankConv2d`), on its device and dtype."""
        source = conv.down if isinstance(conv, LowRankConv2d) else conv  # a second factorisation keeps the geometry
        geometry = (source.kernel_size, source.stride, source.padding, source.dilation)
        reference = next(conv.parameters())
        new = cls(conv.in_channels, conv.out_channels, rank, *geometry, bias=bias)
        return new.to(device=reference.device, dtype=reference.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"
