"""IMRAM (Chen et al., CVPR 2020): iterative matching with recurrent attention memory (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from imram.config import ModelConfig
from imram.models.attention import (
    attend,
    attention_from_scores,
    fragment_cosine,
    pool_fragments,
    raw_scores,
)
from imram.models.encoders import build_encoders, length_mask
from imram.models.memory import MemoryDistillation


@dataclass
class BranchTrace:
    """What one branch computed at every step, for ``explain`` (query items Q, context items C).

    ``attention[k]``: ``[Q, C, n, m]`` weights of step k+1; ``fragment_scores``: ``[Q, C, K, n]``
    cosine of each original query fragment with its attended context; ``step_scores``:
    ``[Q, C, K]`` the pooled score F_k.
    """

    attention: list[Tensor]
    fragment_scores: Tensor
    step_scores: Tensor


def iterative_matching(
    query: Tensor,
    context: Tensor,
    *,
    steps: int,
    lam: float,
    memory: MemoryDistillation | None,
    norm: str = "clipped_l2norm",
    sim: str = "dot",
    pooling: str = "avg",
    lambda_lse: float = 6.0,
    query_mask: Tensor | None = None,
    context_mask: Tensor | None = None,
    trace: bool = False,
) -> Tensor | BranchTrace:
    """Run K RAM steps for every (query item, context item) pair → ``[Q, C, K]`` step scores F_k.

    Step k attends the current queries over the fixed context, scores the attended context
    against the *original* query fragments, then updates the queries with the memory unit.
    The update is computed exactly but restructured (SPEC §9): the memory's context halves are
    projected once per context item and attended together with the context, its query halves
    are per query item at step 1, and there is no update after the last step.
    """
    if steps > 1 and memory is None:
        raise ValueError("more than one step needs a memory distillation unit")
    base = raw_scores(query, context)  # x⁽⁰⁾ · y, reused by every step's cosine
    gram = context @ context.transpose(-1, -2)
    query_norm = torch.linalg.vector_norm(query, dim=-1)
    if steps > 1:
        d = context.shape[-1]
        c_terms = memory.context_terms(context)
        parts = ([context] if memory.needs_context else []) + (
            [c_terms] if c_terms is not None else []
        )
        values = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        first_terms = memory.query_terms(query)
    current = query
    scores, weights_per_step, fragments = [], [], []
    for k in range(steps):
        raw = base if (k == 0 and sim == "dot") else raw_scores(current, context, sim)
        weights = attention_from_scores(raw, lam, norm, query_mask, context_mask)
        cosines = fragment_cosine(base, weights, gram, query_norm)
        scores.append(pool_fragments(cosines, query_mask, pooling, lambda_lse))
        if trace:
            weights_per_step.append(weights)
            fragments.append(cosines)
        if k + 1 < steps:
            attended = attend(weights, values)
            c = attended[..., :d] if memory.needs_context else None
            pre = attended[..., d:] if memory.needs_context else attended
            if pre.shape[-1] == 0:
                pre = None
            if k == 0:
                if first_terms is not None:
                    pre = pre + first_terms[None]
                current = memory.combine(query[None], c, pre)
            else:
                current = memory.combine(current, c, memory.query_terms(current, add_to=pre))
    step_scores = torch.stack(scores, dim=-1).transpose(0, 1)
    if not trace:
        return step_scores
    if query_mask is not None:
        fragments = [f.masked_fill(~query_mask[None], 0.0) for f in fragments]
    weights_per_step = [w.transpose(0, 1) for w in weights_per_step]
    fragment_scores = torch.stack(fragments, dim=2).transpose(0, 1)
    return BranchTrace(weights_per_step, fragment_scores, step_scores)


class IMRAM(nn.Module):
    """Text-IMRAM (words query regions), Image-IMRAM (regions query words), or both summed."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder, self.text_encoder = build_encoders(config)
        need_memory = config.steps > 1
        self.text_memory = self._memory() if need_memory and self.uses("text") else None
        self.image_memory = self._memory() if need_memory and self.uses("image") else None

    def _memory(self) -> MemoryDistillation:
        return MemoryDistillation(self.config.embed_dim, self.config.aggregator, self.config.renorm)

    def uses(self, branch: str) -> bool:
        """Whether the ``text`` or ``image`` branch contributes to the score."""
        return self.config.branch in (branch, "full")

    def encode_images(self, features: Tensor) -> Tensor:
        """``[N, R, img_dim]`` raw region features → ``[N, R, d]`` unit region vectors."""
        return self.image_encoder(features)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``[B, L]`` token ids → ``[B, L, d]`` unit word vectors (zero past each length)."""
        return self.text_encoder(tokens, lengths)[0]

    def _branches(
        self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor, trace: bool
    ) -> dict[str, Tensor | BranchTrace]:
        cfg = self.config
        mask = length_mask(lengths.to(caption_emb.device), caption_emb.shape[1])
        common = dict(
            steps=cfg.steps,
            norm=cfg.attn_norm,
            sim=cfg.attn_sim,
            pooling=cfg.pooling,
            lambda_lse=cfg.lambda_lse,
            trace=trace,
        )
        out: dict[str, Tensor | BranchTrace] = {}
        if self.uses("text"):
            out["text"] = iterative_matching(
                caption_emb,
                image_emb,
                lam=cfg.lambda_softmax,
                memory=self.text_memory,
                query_mask=mask,
                **common,
            )
        if self.uses("image"):
            out["image"] = iterative_matching(
                image_emb,
                caption_emb,
                lam=cfg.image_lambda,
                memory=self.image_memory,
                context_mask=mask,
                **common,
            )
        return out

    def step_scores(self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor) -> Tensor:
        """Per-step scores ``[n_images, n_captions, K]``, the branches summed (Eq. 10)."""
        branches = self._branches(image_emb, caption_emb, lengths, trace=False)
        total = 0
        for name, scores in branches.items():
            total = total + (scores.transpose(0, 1) if name == "text" else scores)
        return total

    def similarity(self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor) -> Tensor:
        """Scores of every image against every caption of a block → ``[n_images, n_captions]``."""
        return self.step_scores(image_emb, caption_emb, lengths).sum(dim=-1)

    @torch.no_grad()
    def explain(
        self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor
    ) -> dict[str, BranchTrace]:
        """Per-branch attention weights and fragment scores of every step, for a block.

        ``text`` traces are indexed ``[caption, image, …]`` (words attend over regions);
        ``image`` traces ``[image, caption, …]`` (regions attend over words).
        """
        return self._branches(image_emb, caption_emb, lengths, trace=True)
