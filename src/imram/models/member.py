"""MEMBER (Li et al., IEEE TIP 2021): memory banks enrich fragments, embeddings stay independent.

This is a reconstruction from the paper's abstract alone; no public implementation exists. The
abstract says: global memory banks enable fine-grained alignment and fusion in the embedding
paradigm; image (text) features are enriched with relevant text (image) features stored in the
text (image) memory bank; retrieval stays as efficient as an embedding model. Everything beyond
that is our choice, and each choice is a config option so that the alternatives can be compared:

- **Memorize** (``member_bank``, ``member_bank_size`` S): ``queue`` keeps per modality a FIFO of
  the S most recent detached unit fragment vectors (regions; real words only) of training
  batches, in buffers saved with the weights; ``kmeans`` keeps S centroids of every fragment
  seen in training (online k-means, :func:`kmeans_update`: a global summary, not the latest
  batches); ``learned`` keeps S trained slots per modality.
- **Associate**: every region attends over the text bank and every word over the image bank with
  the cross-modal attention unit (``attn_norm``, ``attn_sim``; λ is ``image_lambda`` for regions
  and ``lambda_softmax`` for words, the same λ as IMRAM's two directions).
- **Fuse** (``member_fusion``): ``residual`` (the default) keeps VSE++'s vectors — the mean of
  the projected regions, the GRU's final state (``text_pool: last``) or word mean — and adds the
  item's recalled memory (the bank slots weighted by its fragments' mean attention) through a
  learned gate per dimension that starts closed, so a fresh MEMBER scores exactly as VSE++ with
  the same weights and the memory must earn its weight in training (``member_memory``:
  ``relative`` scales the memory to the vector's length first, so a gate value is the memory's
  share of it; ``centered`` subtracts the bank's mean slot first; ``raw`` adds it as recalled,
  which with diffuse attention is about 1 % of that length; ``member_gate_scale`` multiplies the
  gate parameters, so that Adam opens them that many times faster); ``fragments`` fuses every
  fragment with its attended slots by a memory distillation unit per modality (``aggregator``,
  ``renorm``) and pools the fused fragments by their ``mean`` or a learned ``attention``
  pooling (``member_pool``).

An image's embedding depends only on that image and the bank, a caption's only on that caption
and the bank, so a gallery is embedded once and searched like VSE++.

A queue or k-means bank is written only in training mode. The fragments of a training step are
staged, not written, and committed when the next training step of either modality begins: the
captions of a batch then never attend over the regions of their own images (which no test
gallery offers), and staging happens in ``encode_images`` / ``encode_captions``, so the trainer
needs no change. The staged fragments are buffers too, so a resumed run continues exactly. A
bank with no filled slot adds nothing: its fragments pass to pooling unchanged (``fragments``)
or it recalls zeros (``residual``). When ``torchrun`` training splits a batch
across ranks, each rank stages the whole batch's fragments (gathered in rank order), so every
rank's bank is the one a single process would hold.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imram.distributed import batch_is_sharded, gather_uneven
from imram.models.attention import attend, attention_from_scores, raw_scores
from imram.models.encoders import l2norm, length_mask, masked_mean
from imram.models.interface import EmbeddingModel
from imram.models.memory import MemoryDistillation
from imram.models.registry import register_model
from imram.models.towers import build_encoders
from imram.schema import ModelConfig

MODALITIES = ("image", "text")
# Fragments a kmeans bank may take from one training step (a batch of 128 × 49 regions is
# 6,272): the step's last ones, beyond the bank's own size.
KMEANS_STAGED = 4096


@torch.no_grad()
def kmeans_update(bank: Tensor, filled: int, fragments: Tensor, ema: float) -> int:
    """One online k-means step of ``bank [S, d]`` (its first ``filled`` rows are centroids)
    with unit ``fragments [n, d]``; returns the new number of centroids.

    Empty slots first take fragments as they come; every other fragment is assigned to its
    nearest centroid by cosine, and each centroid that got fragments moves to
    ``ema·c + (1−ema)·mean(its fragments)``, scaled back to unit length, so the bank keeps a
    summary of every fragment seen in training, not only the latest ones.
    """
    size = bank.shape[0]
    take = min(size - filled, fragments.shape[0])
    bank[filled : filled + take] = fragments[:take]
    filled += take
    rest = fragments[take:]
    if rest.shape[0] == 0:
        return filled
    centroids = bank[:filled]
    nearest = (rest @ centroids.T).argmax(dim=1)
    sums = torch.zeros_like(centroids).index_add_(0, nearest, rest)
    hits = torch.bincount(nearest, minlength=filled)
    moved = hits > 0
    means = sums[moved] / hits[moved, None].to(sums.dtype)
    centroids[moved] = l2norm(ema * centroids[moved] + (1 - ema) * means)
    return filled


class AttentionPool(nn.Module):
    """Weights an item's real fragments by ``softmax(w · tanh(W x + b))`` and sums them, so the
    model can learn which fragments carry the item rather than averaging all alike."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, fragments: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[N, n, d]`` fragments (``mask [N, n]`` True on real ones) → ``[N, d]``."""
        logits = self.score(torch.tanh(self.hidden(fragments))).squeeze(-1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        return torch.einsum("nk,nkd->nd", weights.to(fragments.dtype), fragments)


class MEMBER(EmbeddingModel):
    """Regions and words enriched from the other modality's memory bank, pooled to one vector."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, size = config.embed_dim, config.member_bank_size
        self.image_encoder, self.text_encoder = build_encoders(config)
        self.residual = config.member_fusion == "residual"
        if self.residual:  # closed gates: VSE++'s vectors, untouched, until training opens them
            self.image_gate = nn.Parameter(torch.zeros(d))
            self.text_gate = nn.Parameter(torch.zeros(d))
            self.image_memory = self.text_memory = None
            self.region_pool = self.word_pool = None
        else:
            self.image_memory = MemoryDistillation(d, config.aggregator, config.renorm)
            self.text_memory = MemoryDistillation(d, config.aggregator, config.renorm)
            attention = config.member_pool == "attention"
            self.region_pool = AttentionPool(d) if attention else None
            self.word_pool = AttentionPool(d) if attention else None
        self.uses_queue = config.member_bank in ("queue", "kmeans")
        staged = size if config.member_bank == "queue" else max(size, KMEANS_STAGED)
        for name in MODALITIES:
            if self.uses_queue:
                self.register_buffer(f"{name}_bank", torch.zeros(size, d))
                self.register_buffer(f"{name}_bank_ptr", torch.zeros((), dtype=torch.long))
                self.register_buffer(f"{name}_bank_count", torch.zeros((), dtype=torch.long))
                self.register_buffer(f"{name}_staged", torch.zeros(staged, d))
                self.register_buffer(f"{name}_staged_count", torch.zeros((), dtype=torch.long))
            else:
                setattr(self, f"{name}_bank", nn.Parameter(l2norm(torch.randn(size, d))))

    def bank(self, modality: str) -> Tensor:
        """The slots of ``modality``'s bank that fragments attend over ``[m, d]``: the filled
        part of a queue, or every learned slot (L2-normalised, like the fragments)."""
        bank = getattr(self, f"{modality}_bank")
        if not self.uses_queue:
            return l2norm(bank)
        return bank[: int(getattr(self, f"{modality}_bank_count"))]

    def associate(
        self,
        fragments: Tensor,
        bank: Tensor,
        memory: MemoryDistillation,
        lam: float,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Each fragment ``[N, n, d]`` attends over ``bank [m, d]``; the gate fuses the two.

        ``mask [N, n]`` marks real fragments (padding is left out of the attention's norm).
        With an empty bank the fragments are returned unchanged.
        """
        if bank.shape[0] == 0:
            return fragments
        context = bank.to(fragments.dtype)[None]
        scores = raw_scores(fragments, context, self.config.attn_sim)
        weights = attention_from_scores(scores, lam, self.config.attn_norm, query_mask=mask)
        return memory(fragments, attend(weights, context)[0])

    def slot_attention(
        self, fragments: Tensor, bank: Tensor, lam: float, mask: Tensor | None = None
    ) -> Tensor:
        """Each fragment's attention ``[N, n, m]`` over the slots of ``bank [m, d]`` (the
        cross-attention unit; ``mask [N, n]`` marks real fragments)."""
        context = bank.to(fragments.dtype)[None]
        scores = raw_scores(fragments, context, self.config.attn_sim)
        return attention_from_scores(scores, lam, self.config.attn_norm, query_mask=mask)[0]

    def recall(
        self, fragments: Tensor, bank: Tensor, lam: float, mask: Tensor | None = None
    ) -> Tensor:
        """The bank's answer to an item ``[N, d]``: the slots weighted by its real fragments'
        mean :meth:`slot_attention`. Zeros when the bank is empty."""
        if bank.shape[0] == 0:
            return fragments.new_zeros(fragments.shape[0], fragments.shape[-1])
        weights = self.slot_attention(fragments, bank, lam, mask)
        mean = weights.mean(dim=1) if mask is None else masked_mean(weights, mask)
        return mean.to(fragments.dtype) @ bank.to(fragments.dtype)

    def _added(self, base: Tensor, gate: Tensor, memory: Tensor) -> Tensor:
        """What the residual adds to VSE++'s vector ``base [N, d]``: ``member_gate_scale ·
        gate ⊙ memory``, the memory first scaled to ``base``'s length unless ``member_memory``
        is ``raw``. A closed gate adds exact zeros, so the embedding is VSE++'s bit for bit."""
        if self.config.member_memory != "raw":
            memory = l2norm(memory) * torch.linalg.vector_norm(base, dim=-1, keepdim=True)
        return self.config.member_gate_scale * gate * memory

    def _recall(self, fragments: Tensor, bank: Tensor, lam: float, mask: Tensor | None) -> Tensor:
        """:meth:`recall`, less the bank's mean slot under ``member_memory: centered`` (what a
        uniform attention would recall, the same vector for every item)."""
        memory = self.recall(fragments, bank, lam, mask)
        if self.config.member_memory == "centered" and bank.shape[0] > 0:
            memory = memory - bank.mean(dim=0).to(memory.dtype)
        return memory

    def image_terms(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The residual form's parts for images ``[N, R, img_dim]``: VSE++'s vector (the mean
        of the projected regions) ``[N, d]``, what the gated memory adds to it ``[N, d]``, and
        the unit regions ``[N, R, d]`` (what the image bank stores). Part of a training step
        (a queue bank commits the previous step's fragments first)."""
        projected = self.image_encoder.project(features)
        regions = l2norm(projected)
        self._begin_step("image")
        memory = self._recall(regions, self.bank("text"), self.config.image_lambda, None)
        base = projected.mean(dim=1)
        return base, self._added(base, self.image_gate, memory), regions

    def caption_terms(
        self, tokens: Tensor, lengths: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The residual form's parts for captions: VSE++'s vector (the GRU's final state, or
        the word mean under ``text_pool: mean``) ``[B, d]``, what the gated memory adds
        ``[B, d]``, the unit words ``[B, L, d]`` and their mask ``[B, L]``."""
        words, sentence = self.text_encoder(tokens, lengths)
        mask = length_mask(lengths.to(words.device), words.shape[1])
        base = sentence if self.config.text_pool == "last" else masked_mean(words, mask)
        self._begin_step("text")
        memory = self._recall(words, self.bank("image"), self.config.lambda_softmax, mask)
        return base, self._added(base, self.text_gate, memory), words, mask

    def encode_images(self, features: Tensor) -> Tensor:
        """``[N, R, img_dim]`` → ``[N, d]`` unit image vectors."""
        if self.residual:
            base, added, regions = self.image_terms(features)
            self._stage("image", regions.reshape(-1, regions.shape[-1]))
            return l2norm(base + added)
        regions = self.image_encoder(features)
        self._begin_step("image")
        fused = self.associate(
            regions, self.bank("text"), self.image_memory, self.config.image_lambda
        )
        if self.region_pool is not None:
            pooled = self.region_pool(fused)
        else:
            pooled = fused.mean(dim=1)
        self._stage("image", regions.reshape(-1, regions.shape[-1]))
        return l2norm(pooled)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``[B, L]`` token ids → ``[B, d]`` unit caption vectors (padding plays no part)."""
        if self.residual:
            base, added, words, mask = self.caption_terms(tokens, lengths)
            self._stage("text", words[mask])
            return l2norm(base + added)
        words, _ = self.text_encoder(tokens, lengths)
        mask = length_mask(lengths.to(words.device), words.shape[1])
        self._begin_step("text")
        fused = self.associate(
            words, self.bank("image"), self.text_memory, self.config.lambda_softmax, mask
        )
        if self.word_pool is not None:
            pooled = self.word_pool(fused, mask)
        else:
            pooled = masked_mean(fused, mask)
        self._stage("text", words[mask])
        return l2norm(pooled)

    def _writes(self) -> bool:
        """Whether calls now stage and commit fragments: a queue bank in training mode."""
        return self.uses_queue and self.training

    def _begin_step(self, modality: str) -> None:
        """A training call of a modality that has fragments staged starts a new step: commit
        both modalities' staged fragments to their banks first."""
        if self._writes() and int(getattr(self, f"{modality}_staged_count")) > 0:
            for name in MODALITIES:
                self._commit(name)

    @torch.no_grad()
    def _stage(self, modality: str, fragments: Tensor) -> None:
        """Keep a training step's last S fragments ``[n, d]`` (detached) until the next step."""
        if not self._writes():
            return
        if batch_is_sharded():  # the queue holds the global batch's fragments, as in one process
            fragments = gather_uneven(fragments.detach())
        staged = getattr(self, f"{modality}_staged")
        keep = fragments[-staged.shape[0] :]
        staged[: keep.shape[0]] = keep.detach().to(staged.dtype)
        getattr(self, f"{modality}_staged_count").fill_(keep.shape[0])

    @torch.no_grad()
    def _commit(self, modality: str) -> None:
        """Write the staged fragments into the bank: a FIFO ring at its pointer, oldest slots
        first, or k-means centroids (:func:`kmeans_update`)."""
        count = getattr(self, f"{modality}_staged_count")
        n = int(count)
        if n == 0:
            return
        if self.config.member_bank == "kmeans":
            filled = getattr(self, f"{modality}_bank_count")
            bank = getattr(self, f"{modality}_bank")
            staged = getattr(self, f"{modality}_staged")[:n]
            filled.fill_(kmeans_update(bank, int(filled), staged, self.config.member_ema))
            count.zero_()
            return
        bank = getattr(self, f"{modality}_bank")
        ptr = getattr(self, f"{modality}_bank_ptr")
        filled = getattr(self, f"{modality}_bank_count")
        size = bank.shape[0]
        slots = (ptr + torch.arange(n, device=bank.device)) % size
        bank.index_copy_(0, slots, getattr(self, f"{modality}_staged")[:n])
        ptr.copy_((ptr + n) % size)
        filled.copy_((filled + n).clamp(max=size))
        count.zero_()


register_model("member", MEMBER)
