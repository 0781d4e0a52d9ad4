"""Memory distillation unit (MDU, SPEC §3) and the ablation aggregators of the paper's Table 5.

Every aggregator's linear map acts on ``[x; c]`` (or on ``c`` alone), so it splits into a query
half ``W_x x`` and a context half ``W_c c``. Because the attended context is a convex combination
``c_i = Σ_j α_ij y_j``, the context half equals ``Σ_j α_ij (W_c y_j)``: it can be projected once
per context item and attended like the context itself (SPEC §9). ``forward`` is the plain form;
``query_terms`` / ``context_terms`` / ``combine`` are the same maths split for the fast scorer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        self.dim = dim
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

    def _halves(self) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """(query weight, context weight, bias) of each linear map, in the order of the terms."""
        d = self.dim
        if self.aggregator == "add":
            return []
        if self.aggregator == "mlp":
            return [(None, self.fuse.weight, self.fuse.bias)]
        maps = [self.gate] + ([self.fuse] if self.aggregator == "ours" else [])
        return [(m.weight[:, :d], m.weight[:, d:], m.bias) for m in maps]

    def query_terms(self, x: Tensor) -> Tensor | None:
        """The query halves ``W_x x + b`` of every map, concatenated on the last axis."""
        halves = self._halves()
        if not halves:
            return None
        terms = [
            F.linear(x, w, b) if w is not None else b.expand(*x.shape[:-1], b.shape[0])
            for w, _, b in halves
        ]
        return torch.cat(terms, dim=-1)

    def context_terms(self, context: Tensor) -> Tensor | None:
        """The context halves ``W_c y`` of every map for each context fragment (no bias)."""
        halves = self._halves()
        if not halves:
            return None
        return torch.cat([F.linear(context, w) for _, w, _ in halves], dim=-1)

    def combine(
        self, x: Tensor, c: Tensor, q_terms: Tensor | None, c_terms: Tensor | None
    ) -> Tensor:
        """``forward(x, c)`` from precomputed halves: ``c_terms`` is the attended ``W_c y``."""
        if self.aggregator == "add":
            out = x + c
        else:
            pre = q_terms + c_terms
            if self.aggregator == "mlp":
                out = x + torch.tanh(pre)
            elif self.aggregator == "ours":
                g, o = torch.sigmoid(pre[..., : self.dim]), torch.tanh(pre[..., self.dim :])
                out = g * x + (1 - g) * o
            else:
                g = torch.sigmoid(pre)
                out = g * x + (1 - g) * c
        return l2norm(out) if self.renorm else out
