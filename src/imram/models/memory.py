"""Memory distillation unit (MDU, SPEC §3) and the ablation aggregators of the paper's Table 5."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imram.models.encoders import l2norm


class MemoryDistillation(nn.Module):
    """Fuse a query fragment ``x`` with its attended context ``c`` into the next step's query.

    ``ours``: ``g = σ(W_g[x;c]+b_g)``, ``o = tanh(W_o[x;c]+b_o)``, ``x* = g⊙x + (1−g)⊙o``;
    ``add``: ``x + c``; ``mlp``: ``x + tanh(W c + b)``; ``att``: ``αx + (1−α)c`` with scalar
    ``α = σ(w·[x;c] + b)``; ``gate``: ``βx + (1−β)c`` with vector ``β = σ(W[x;c] + b)``.
    ``renorm`` L2-normalises the result (the published runs did not).
    """

    def __init__(self, dim: int, aggregator: str = "ours", renorm: bool = False) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.renorm = renorm
        if aggregator in ("ours", "gate"):
            self.gate = nn.Linear(2 * dim, dim)
        elif aggregator == "att":
            self.gate = nn.Linear(2 * dim, 1)
        if aggregator == "ours":
            self.fuse = nn.Linear(2 * dim, dim)
        elif aggregator == "mlp":
            self.fuse = nn.Linear(dim, dim)
        elif aggregator not in ("gate", "att", "add"):
            raise ValueError(f"unknown aggregator {aggregator!r}")

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x``, ``c``: ``[..., d]`` (broadcastable) → updated queries ``[..., d]``."""
        x, c = torch.broadcast_tensors(x, c)
        if self.aggregator == "add":
            out = x + c
        elif self.aggregator == "mlp":
            out = x + torch.tanh(self.fuse(c))
        else:
            xc = torch.cat([x, c], dim=-1)
            g = torch.sigmoid(self.gate(xc))
            other = torch.tanh(self.fuse(xc)) if self.aggregator == "ours" else c
            out = g * x + (1 - g) * other
        return l2norm(out) if self.renorm else out
