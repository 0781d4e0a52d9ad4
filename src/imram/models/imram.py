"""IMRAM (Chen et al., CVPR 2020): iterative matching with a recurrent attention memory
(design §matching)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from imram.models.attention import (
    attend,
    attention_from_scores,
    fragment_cosine,
    per_pair,
    pool_fragments,
    raw_scores,
)
from imram.models.encoders import length_mask
from imram.models.interface import CrossAttentionModel
from imram.models.memory import MemoryDistillation
from imram.models.registry import register_model
from imram.models.towers import build_encoders
from imram.models.workspace import gather, scratch
from imram.precision import at_least_fp32
from imram.schema import ModelConfig


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


@dataclass
class QuerySide:
    """What a query item contributes to every pair, computed once: its fragments ``emb
    [Q, n, d]``, their norms, and the memory's step-1 query terms ``W_x x⁽⁰⁾`` (or None)."""

    emb: Tensor
    norm: Tensor
    first_terms: Tensor | None

    def take(
        self, rows: Tensor, length: int, emb: Tensor | None = None, slot: str | None = None
    ) -> QuerySide:
        """Items ``rows``, their fragments cut to ``length`` (``emb``: those fragments, when
        already gathered; ``slot``: gather into scratch buffers, see :func:`gather`)."""
        first = None
        if self.first_terms is not None:
            first = gather(self.first_terms[:, :length], rows, slot and f"{slot}.first")
        if emb is None:
            emb = gather(self.emb[:, :length], rows, slot and f"{slot}.emb")
        return QuerySide(emb, gather(self.norm[:, :length], rows, slot and f"{slot}.norm"), first)

    def per_pair(self) -> QuerySide:
        """Item p as the only query of pair p (``[P, 1, n, …]``), for aligned pairs."""
        first = None if self.first_terms is None else self.first_terms[:, None]
        return QuerySide(self.emb[:, None], self.norm[:, None], first)


@dataclass
class ContextSide:
    """What a context item contributes to every pair, computed once: its fragments ``emb
    [C, m, d]``, their Gram matrices, and the values each update attends (or None at K=1):
    the fragments themselves and/or the memory's context terms ``W_c y + b``."""

    emb: Tensor
    gram: Tensor
    values: Tensor | None

    def take(
        self, rows: Tensor, length: int, emb: Tensor | None = None, slot: str | None = None
    ) -> ContextSide:
        """Items ``rows``, their fragments cut to ``length`` (``emb``, ``slot``: as
        :meth:`QuerySide.take`)."""
        values = None
        if self.values is not None:
            values = gather(self.values[:, :length], rows, slot and f"{slot}.values")
        if emb is None:
            emb = gather(self.emb[:, :length], rows, slot and f"{slot}.emb")
        gram = gather(self.gram[:, :length, :length], rows, slot and f"{slot}.gram")
        return ContextSide(emb, gram, values)


def prepare_query(query: Tensor, memory: MemoryDistillation | None, steps: int) -> QuerySide:
    """The per-query-item half of :func:`iterative_matching`."""
    first = memory.query_terms(query) if steps > 1 and memory is not None else None
    return QuerySide(query, torch.linalg.vector_norm(query, dim=-1), first)


def prepare_context(context: Tensor, memory: MemoryDistillation | None, steps: int) -> ContextSide:
    """The per-context-item half of :func:`iterative_matching`."""
    with torch.autocast(context.device.type, enabled=False):  # once per item: keep it fp32
        full = at_least_fp32(context)
        gram = full @ full.transpose(-1, -2)
    if steps == 1 or memory is None:
        return ContextSide(context, gram, None)
    c_terms = memory.context_terms(context)
    parts = ([context] if memory.needs_context else []) + ([c_terms] if c_terms is not None else [])
    return ContextSide(context, gram, torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])


def iterative_matching(
    query: Tensor | QuerySide,
    context: Tensor | ContextSide,
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
    The update is computed exactly but restructured (design §cost): the memory's context halves are
    projected once per context item and attended together with the context, its query halves
    are per query item at step 1, and there is no update after the last step. Either side may
    be passed already prepared (:func:`prepare_query`, :func:`prepare_context`) so that a
    gallery scored in blocks computes each item's half once.
    """
    if steps > 1 and memory is None:
        raise ValueError("more than one step needs a memory distillation unit")
    q = query if isinstance(query, QuerySide) else prepare_query(query, memory, steps)
    ctx = context if isinstance(context, ContextSide) else prepare_context(context, memory, steps)
    with torch.autocast(q.emb.device.type, enabled=False):  # per item, in every score: fp32
        query32, context32 = at_least_fp32(q.emb), at_least_fp32(ctx.emb)
        base = raw_scores(query32, context32)  # x⁽⁰⁾ · y, reused by every step's cosine
        step1 = base if sim == "dot" else raw_scores(query32, context32, sim)
    current = q.emb
    scores, weights_per_step, fragments = [], [], []
    for k in range(steps):
        raw = step1 if k == 0 else raw_scores(current, ctx.emb, sim)
        weights = attention_from_scores(raw, lam, norm, query_mask, context_mask)
        cosines = fragment_cosine(base, weights, ctx.gram, q.norm)
        scores.append(pool_fragments(cosines, query_mask, pooling, lambda_lse))
        if trace:
            weights_per_step.append(weights)
            fragments.append(cosines)
        if k + 1 < steps:
            first = q.first_terms if k == 0 else None
            current = _update(memory, current, weights, ctx.values, first, slot=k % 2)
    step_scores = torch.stack(scores, dim=-1).transpose(0, 1)
    if not trace:
        return step_scores
    if query_mask is not None:
        fragments = [f.masked_fill(~per_pair(query_mask, 2), 0.0) for f in fragments]
    weights_per_step = [w.transpose(0, 1) for w in weights_per_step]
    fragment_scores = torch.stack(fragments, dim=2).transpose(0, 1)
    return BranchTrace(weights_per_step, fragment_scores, step_scores)


def _update(
    memory: MemoryDistillation,
    current: Tensor,
    weights: Tensor,
    values: Tensor,
    first_terms: Tensor | None,
    slot: int,
) -> Tensor:
    """One memory update of every pair's queries from its attention ``weights``.

    At step 1 the queries are per item (``[Q, n, d]``, or ``[C, 1, n, d]`` for aligned pairs)
    and their terms ``first_terms`` are added inside the attention product (when the values are
    the terms alone); later the queries are per pair and their terms are one GEMM. Without
    autograd the pre-activations go into the scratch buffer ``slot`` (alternating, since the
    queries live in the previous one).
    """
    d = memory.dim
    fused = first_terms is not None and not memory.needs_context
    out = None
    if not torch.is_grad_enabled() and not torch.is_autocast_enabled(values.device.type):
        shape = (*weights.shape[:3], values.shape[-1])
        out = scratch(f"update{slot}", shape, values)
    attended = attend(weights, values, add=first_terms if fused else None, out=out)
    c = attended[..., :d] if memory.needs_context else None
    pre = attended[..., d:] if memory.needs_context else attended
    if pre.shape[-1] == 0:
        pre = None
    if first_terms is not None and not fused:
        pre = pre + per_pair(first_terms, 3)
    if first_terms is None and current.dim() == 4:
        pre = memory.query_terms(current, add_to=pre)
    return memory.combine(per_pair(current, 3), c, pre)


def _take_side(
    side: QuerySide | ContextSide | None,
    rows: Tensor,
    length: int,
    whole: Tensor,
    gathered: Tensor,
    slot: str | None,
) -> QuerySide | ContextSide | None:
    """``side.take``, reusing ``gathered`` (the rows of ``whole``) when the side's fragments
    are ``whole`` itself, as prepared sides' are."""
    if side is None:
        return None
    return side.take(rows, length, gathered if side.emb is whole else None, slot)


@dataclass
class PreparedImages:
    """An image block's per-item halves of both branches (:meth:`IMRAM.prepare_images`):
    the regions as the text branch's context and as the image branch's queries."""

    emb: Tensor
    as_context: ContextSide | None
    as_query: QuerySide | None

    def take(self, rows: Tensor, slot: str | None = None) -> PreparedImages:
        """Images ``rows`` (repeats allowed: one per pair to score), each tensor gathered once
        (into scratch buffers named after ``slot`` when given, see :func:`gather`)."""
        n = self.emb.shape[1]
        emb = gather(self.emb, rows, slot and f"{slot}.emb")
        context = _take_side(self.as_context, rows, n, self.emb, emb, slot and f"{slot}.context")
        query = _take_side(self.as_query, rows, n, self.emb, emb, slot and f"{slot}.query")
        return PreparedImages(emb, context, query)


@dataclass
class PreparedCaptions:
    """A caption block's per-item halves of both branches (:meth:`IMRAM.prepare_captions`):
    the words as the text branch's queries and as the image branch's context."""

    emb: Tensor
    lengths: Tensor
    as_query: QuerySide | None
    as_context: ContextSide | None

    def take(self, rows: Tensor, slot: str | None = None) -> PreparedCaptions:
        """Captions ``rows`` (e.g. one block of a prepared chunk, or one per pair to score),
        cut to their longest, each tensor gathered once (``slot``: as
        :meth:`PreparedImages.take`)."""
        lengths = self.lengths[rows]
        n = int(lengths.max())
        emb = gather(self.emb[:, :n], rows, slot and f"{slot}.emb")
        query = _take_side(self.as_query, rows, n, self.emb, emb, slot and f"{slot}.query")
        context = _take_side(self.as_context, rows, n, self.emb, emb, slot and f"{slot}.context")
        return PreparedCaptions(emb, lengths, query, context)


def _summed(branches: dict[str, Tensor]) -> Tensor:
    """The branches' step scores summed, image-major ``[n_images, n_captions, K]`` (Eq. 10)."""
    total = 0
    for name, scores in branches.items():
        total = total + (scores.transpose(0, 1) if name == "text" else scores)
    return total


class IMRAM(CrossAttentionModel):
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

    def prepare_images(self, image_emb: Tensor, steps: int | None = None) -> PreparedImages:
        """Compute the images' per-item terms once, for scoring them against many caption
        blocks; :meth:`similarity` accepts the result in place of ``image_emb``. ``steps``:
        the steps the terms serve (default the model's)."""
        steps = steps or self.config.steps
        return PreparedImages(
            image_emb,
            prepare_context(image_emb, self.text_memory, steps) if self.uses("text") else None,
            prepare_query(image_emb, self.image_memory, steps) if self.uses("image") else None,
        )

    def prepare_captions(
        self, caption_emb: Tensor, lengths: Tensor, steps: int | None = None
    ) -> PreparedCaptions:
        """Compute the captions' per-item terms once, for scoring them against many image
        blocks; :meth:`similarity` accepts the result (or a :meth:`PreparedCaptions.take` of
        it) in place of ``caption_emb``. ``steps``: as :meth:`prepare_images`."""
        steps = steps or self.config.steps
        n = int(lengths.max())
        caption_emb = caption_emb[:, :n]
        return PreparedCaptions(
            caption_emb,
            lengths,
            prepare_query(caption_emb, self.text_memory, steps) if self.uses("text") else None,
            prepare_context(caption_emb, self.image_memory, steps) if self.uses("image") else None,
        )

    def _branches(
        self,
        image_emb: Tensor | PreparedImages,
        caption_emb: Tensor | PreparedCaptions,
        lengths: Tensor,
        trace: bool,
        paired: bool = False,
        steps: int | None = None,
    ) -> dict[str, Tensor | BranchTrace]:
        """Each branch's step scores ``[Q, C, K]`` (or trace) for every (query, context) pair;
        ``paired``: for image p with caption p only (each item the one query of its pair,
        ``[1, P, K]``); ``steps``: the first ``steps`` of the model's K only."""
        cfg = self.config
        steps = steps or cfg.steps
        if not isinstance(image_emb, PreparedImages):
            image_emb = self.prepare_images(image_emb, steps)
        if not isinstance(caption_emb, PreparedCaptions):
            caption_emb = self.prepare_captions(caption_emb, lengths, steps)
        lengths = caption_emb.lengths
        mask = length_mask(lengths.to(caption_emb.emb.device), caption_emb.emb.shape[1])
        common = dict(
            steps=steps,
            norm=cfg.attn_norm,
            sim=cfg.attn_sim,
            pooling=cfg.pooling,
            lambda_lse=cfg.lambda_lse,
            trace=trace,
        )
        words, regions = caption_emb.as_query, image_emb.as_query
        query_mask = mask
        if paired:
            words = None if words is None else words.per_pair()
            regions = None if regions is None else regions.per_pair()
            query_mask = mask[:, None]
        out: dict[str, Tensor | BranchTrace] = {}
        if self.uses("text"):
            out["text"] = iterative_matching(
                words,
                image_emb.as_context,
                lam=cfg.lambda_softmax,
                memory=self.text_memory,
                query_mask=query_mask,
                **common,
            )
        if self.uses("image"):
            out["image"] = iterative_matching(
                regions,
                caption_emb.as_context,
                lam=cfg.image_lambda,
                memory=self.image_memory,
                context_mask=mask,
                **common,
            )
        return out

    def step_scores(
        self,
        image_emb: Tensor | PreparedImages,
        caption_emb: Tensor | PreparedCaptions,
        lengths: Tensor,
    ) -> Tensor:
        """Per-step scores ``[n_images, n_captions, K]``, the branches summed (Eq. 10)."""
        return _summed(self._branches(image_emb, caption_emb, lengths, trace=False))

    def similarity(
        self,
        image_emb: Tensor | PreparedImages,
        caption_emb: Tensor | PreparedCaptions,
        lengths: Tensor,
    ) -> Tensor:
        """Scores of every image against every caption of a block → ``[n_images, n_captions]``.

        Either side may be prepared (:meth:`prepare_images`, :meth:`prepare_captions`); the
        lengths of prepared captions are their own.
        """
        return self.step_scores(image_emb, caption_emb, lengths).sum(dim=-1)

    def first_step_similarity(
        self,
        image_emb: Tensor | PreparedImages,
        caption_emb: Tensor | PreparedCaptions,
        lengths: Tensor,
    ) -> Tensor:
        """Step-1 scores ``[n_images, n_captions]`` (F_1, the branches summed): the first
        column of :meth:`step_scores` without the memory's work, a cheap proxy of the K-step
        score for shortlists (a twentieth of a K=3 pair's cost at d=256)."""
        return _summed(self._branches(image_emb, caption_emb, lengths, False, steps=1))[..., 0]

    def pair_similarity(
        self,
        image_emb: Tensor | PreparedImages,
        caption_emb: Tensor | PreparedCaptions,
        lengths: Tensor,
    ) -> Tensor:
        """Scores ``[P]`` of image p with caption p: the diagonal of :meth:`similarity`, by the
        same maths, at the cost of P pairs instead of P² (a shortlist, mined negatives)."""
        branches = self._branches(image_emb, caption_emb, lengths, trace=False, paired=True)
        return sum(scores[0] for scores in branches.values()).sum(dim=-1)

    def score_terms(self) -> int:
        """How many averaged cosines a score sums: K steps of each branch used (Eq. 10)."""
        return self.config.steps * (2 if self.config.branch == "full" else 1)

    @torch.no_grad()
    def explain(
        self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor
    ) -> dict[str, BranchTrace]:
        """Per-branch attention weights and fragment scores of every step, for a block.

        ``text`` traces are indexed ``[caption, image, …]`` (words attend over regions);
        ``image`` traces ``[image, caption, …]`` (regions attend over words).
        """
        return self._branches(image_emb, caption_emb, lengths, trace=True)


register_model("imram_full", IMRAM, branch="full")
register_model("imram_text", IMRAM, branch="text")
register_model("imram_image", IMRAM, branch="image")
