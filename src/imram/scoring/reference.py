"""A deliberately plain per-pair scorer written straight from the equations (design
§attention, §memory, §matching).

It loops over every (image, caption) pair, slices each caption to its true length, and shares
no code with the batched scorer beyond the model's parameters. Tests use it as the oracle; it
is far too slow for anything else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imram.models.interface import EmbeddingModel, RetrievalModel

# The encoders' 1e-8, restated on purpose: the oracle shares no code with what it checks.
EPS = 1e-8


def _unit(x: Tensor) -> Tensor:
    return x / (torch.sqrt((x * x).sum(dim=-1, keepdim=True)) + EPS)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine, denominator clamped at EPS."""
    den = torch.sqrt((a * a).sum(-1)) * torch.sqrt((b * b).sum(-1))
    return (a * b).sum(-1) / den.clamp_min(EPS)


def _attend(x: Tensor, y: Tensor, lam: float, norm: str, sim: str) -> Tensor:
    """CAU for one pair: x ``[n, d]`` queries, y ``[m, d]`` context → ``[n, d]``."""
    z = _unit(x) @ _unit(y).T if sim == "cosine" else x @ y.T
    if norm == "clipped_l2norm":
        z = torch.where(z > 0, z, 0.1 * z)
    else:
        z = torch.where(z > 0, z, torch.zeros_like(z))
    column_norm = torch.sqrt((z * z).sum(dim=0, keepdim=True))
    z_bar = z / (column_norm + EPS)
    alpha = torch.softmax(lam * z_bar, dim=1)
    return alpha @ y


def _memory(module: nn.Module, x: Tensor, c: Tensor) -> Tensor:
    """MDU for one pair, from the equations with the module's weights."""
    agg = module.aggregator
    if agg == "add":
        out = x + c
    elif agg == "mlp":
        out = x + torch.tanh(c @ module.fuse.weight.T + module.fuse.bias)
    else:
        xc = torch.cat([x, c], dim=1)
        g = torch.sigmoid(xc @ module.gate.weight.T + module.gate.bias)
        if agg == "ours":
            o = torch.tanh(xc @ module.fuse.weight.T + module.fuse.bias)
            out = g * x + (1 - g) * o
        else:
            out = g * x + (1 - g) * c
    return _unit(out) if module.renorm else out


def _branch(x0: Tensor, y: Tensor, memory: nn.Module | None, lam: float, config) -> Tensor:
    """Σ_k F_k for one pair and one branch."""
    total = x0.new_zeros(())
    x = x0
    for k in range(config.steps):
        c = _attend(x, y, lam, config.attn_norm, config.attn_sim)
        cos = _cosine(x0, c)
        if config.pooling == "lse":
            total = total + torch.log(torch.exp(config.lambda_lse * cos).sum()) / config.lambda_lse
        else:
            total = total + cos.mean()
        if k + 1 < config.steps:
            x = _memory(memory, x, c)
    return total


def reference_similarity(
    model: RetrievalModel, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor
) -> Tensor:
    """Score every pair one at a time → ``[n_images, n_captions]``, for any registered model."""
    config = model.config
    n_img, n_cap = image_emb.shape[0], caption_emb.shape[0]
    rows = []
    for i in range(n_img):
        row = []
        for j in range(n_cap):
            if isinstance(model, EmbeddingModel):  # one vector per item
                row.append((image_emb[i] * caption_emb[j]).sum())
                continue
            v = image_emb[i]
            t = caption_emb[j, : int(lengths[j])]
            score = image_emb.new_zeros(())
            if config.branch in ("text", "full"):
                score = score + _branch(t, v, model.text_memory, config.lambda_softmax, config)
            if config.branch in ("image", "full"):
                score = score + _branch(v, t, model.image_memory, config.image_lambda, config)
            row.append(score)
        rows.append(torch.stack(row))
    return torch.stack(rows)
