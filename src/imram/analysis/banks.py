"""``imram analyze banks``: what a MEMBER's memory banks hold and who attends to them.

A bank that every fragment attends to uniformly adds the same vector to every item and so
changes no ranking. For each bank this reports, over a split's fragments (words attend over
the image bank, regions over the text bank): the mean entropy of a fragment's attention as a
share of the uniform ``log S`` (1.0: uniform), the share of slots that are some fragment's
favourite, and for the image bank the words that attend most to each of its busiest slots
(the text bank's slots are described by the images whose regions favour them). For the
residual form, the gates' mean magnitude and the memory's share of each vector (the mean of
‖added memory‖ / ‖VSE++'s vector‖ over the split's items) say how much of the memory reaches
the embeddings, and the split's rsum with the gates closed (VSE++'s vectors of the same
weights) against its rsum as trained says what the memory does for retrieval.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imram.analysis.report import write_report_files
from imram.checkpoint import load_checkpoint
from imram.data import PrecompDataset, pad_captions
from imram.devices import default_device
from imram.errors import ConfigError
from imram.evaluation import evaluate_model
from imram.models.encoders import length_mask
from imram.models.member import MEMBER, MODALITIES

BATCH = 128


@dataclass(kw_only=True)
class BankResult:
    """The table, ``report.md`` and ``banks.json`` of one analysis."""

    table: str
    report_md: Path
    report_json: Path

    def summary(self) -> str:
        return f"{self.table}\nwrote {self.report_md} and {self.report_json}"


def bank_statistics(weights: torch.Tensor) -> dict[str, float]:
    """``weights [F, S]`` (each row a fragment's attention over S slots) → the mean entropy as
    a share of ``log S``, and the share of slots that are some fragment's favourite."""
    slots = weights.shape[1]
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(dim=1)
    favourites = torch.unique(weights.argmax(dim=1)).numel()
    return {
        "entropy_share": float(entropy.mean() / math.log(slots)) if slots > 1 else 0.0,
        "favoured_slots": favourites / slots,
    }


@torch.no_grad()
def bank_analysis(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "test",
    device: str | None = None,
    top_slots: int = 8,
    top_words: int = 6,
) -> BankResult:
    """Attention of ``split``'s words and regions over a MEMBER checkpoint's banks, written to
    ``out/report.md`` and ``out/banks.json``."""
    device = device or str(default_device())
    loaded = load_checkpoint(checkpoint, map_location=device)
    model = loaded.model
    if not isinstance(model, MEMBER):
        raise ConfigError(
            f"{loaded.path}: a {loaded.config.model.name} checkpoint; banks are MEMBER's"
        )
    dataset = loaded.open_split(data, split)
    cfg = loaded.config.model
    image_bank, text_bank = model.bank("image"), model.bank("text")
    if image_bank.shape[0] == 0 or text_bank.shape[0] == 0:
        raise ConfigError(f"{loaded.path}: its banks are empty (a model that never trained)")
    word_weights, word_ids, shares = [], [], {name: [] for name in MODALITIES}
    for start in range(0, dataset.num_captions, BATCH):
        ids = [
            dataset.caption_tokens(j)
            for j in range(start, min(start + BATCH, dataset.num_captions))
        ]
        tokens, lengths = (t.to(device) for t in pad_captions(ids))
        if model.residual:  # the words come with the residual's parts: encoded once
            base, added, words, mask = model.caption_terms(tokens, lengths)
            shares["text"].append(_share(base, added))
        else:
            words, _ = model.text_encoder(tokens, lengths)
            mask = length_mask(lengths, words.shape[1])
        weights = model.slot_attention(words, image_bank, cfg.lambda_softmax, mask)
        word_weights.append(weights[mask].cpu())
        word_ids.append(tokens[mask].cpu())
    region_weights, favourite_images = [], []
    for start in range(0, dataset.num_images, BATCH):
        rows = list(range(start, min(start + BATCH, dataset.num_images)))
        features = dataset.images(rows).to(device)
        if model.residual:
            base, added, regions = model.image_terms(features)
            shares["image"].append(_share(base, added))
        else:
            regions = model.image_encoder(features)
        weights = model.slot_attention(regions, text_bank, cfg.image_lambda).cpu()
        region_weights.append(weights.reshape(-1, weights.shape[-1]))
        favourite_images += [
            (i, int(w.mean(0).argmax())) for i, w in zip(rows, weights, strict=True)
        ]
    words_w, ids = torch.cat(word_weights), torch.cat(word_ids)
    regions_w = torch.cat(region_weights)
    slot_words = _slot_words(words_w, ids, loaded.vocab, top_slots, top_words)
    stats = {
        "image bank (words attend)": bank_statistics(words_w),
        "text bank (regions attend)": bank_statistics(regions_w),
    }
    gates, memory_share, rsum = {}, {}, {}
    if model.residual:
        scale = cfg.member_gate_scale
        gates = {
            name: scale * float(getattr(model, f"{name}_gate").abs().mean()) for name in MODALITIES
        }
        memory_share = {name: float(torch.cat(shares[name]).mean()) for name in MODALITIES}
        rsum = _rsum_with_and_without_memory(model, dataset, device)
    lines = ["| bank | slots | entropy / log S | favoured slots |", "|---|---:|---:|---:|"]
    sizes = (len(image_bank), len(text_bank))
    for (name, values), size in zip(stats.items(), sizes, strict=True):
        share, favoured = values["entropy_share"], values["favoured_slots"]
        lines.append(f"| {name} | {size} | {share:.3f} | {favoured:.2f} |")
    table = "\n".join(lines)
    by_slot = Counter(slot for _, slot in favourite_images)
    text = "\n".join(
        [
            f"# imram analyze banks: {loaded.path} on {data} ({split})",
            "",
            f"MEMBER `{cfg.member_bank}` banks of {cfg.member_bank_size}, fusion "
            f"`{cfg.member_fusion}`; {dataset.num_captions} captions, {dataset.num_images} images.",
            "Entropy 1.0 means a fragment spreads its attention evenly over every slot (the bank "
            "then adds the same vector to every item).",
            "",
            table,
            "",
            *([_gates_line(gates, memory_share), ""] if gates else []),
            *(
                [
                    f"Retrieval on this split (1k protocol): rsum {rsum['trained']:.1f} as "
                    f"trained, {rsum['gates_closed']:.1f} with the gates closed (VSE++'s vectors "
                    "of the same weights).",
                    "",
                ]
                if rsum
                else []
            ),
            "Busiest image-bank slots and the words that attend to them most:",
            "",
            *[_slot_line(slot) for slot in slot_words],
            "",
            f"Text-bank slots favoured by images (an image's mean region attention): "
            f"{len(by_slot)} distinct slots for {dataset.num_images} images; the busiest "
            + ", ".join(f"{slot} ({n} images)" for slot, n in by_slot.most_common(5))
            + ".",
        ]
    )
    payload: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "split": split,
        "banks": stats,
        "gates": gates,
        "memory_share": memory_share,
        "rsum": rsum,
        "image_bank_slots": slot_words,
        "text_bank_favourites": dict(by_slot.most_common()),
    }
    written = write_report_files(Path(out), "banks.json", payload, text)
    return BankResult(table=table, **written)


def _share(base: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """Each item's ‖added memory‖ / ‖VSE++'s vector‖ ``[N]``, on the CPU."""
    return (added.norm(dim=-1) / base.norm(dim=-1)).cpu()


def _rsum_with_and_without_memory(
    model: MEMBER, dataset: PrecompDataset, device: str
) -> dict[str, float]:
    """The split's rsum as trained and with both residual gates closed (restored after)."""
    trained, _, _ = evaluate_model(model, dataset, "1k", device=device)
    gates = [model.image_gate, model.text_gate]
    kept = [gate.detach().clone() for gate in gates]
    try:
        for gate in gates:
            gate.zero_()
        closed, _, _ = evaluate_model(model, dataset, "1k", device=device)
    finally:
        for gate, value in zip(gates, kept, strict=True):
            gate.copy_(value)
    return {"trained": trained["rsum"], "gates_closed": closed["rsum"]}


def _slot_words(
    weights: torch.Tensor, ids: torch.Tensor, vocab: Any, top_slots: int, top_words: int
) -> list[dict[str, Any]]:
    """The ``top_slots`` slots with the most word attention, each with the ``top_words`` words
    (by id, seen at least twice) whose occurrences put the most attention on it on average, so
    that frequent words do not crowd out the ones a slot stands for."""
    total = weights.sum(dim=0)
    share = total / total.sum()
    words, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(words), weights.shape[1]).index_add_(0, inverse, weights.float())
    means = (sums / counts[:, None]).masked_fill((counts < 2)[:, None], -1.0)
    out = []
    for slot in torch.argsort(total, descending=True)[:top_slots].tolist():
        best = words[torch.argsort(means[:, slot], descending=True)[:top_words]].tolist()
        out.append({"slot": slot, "share": float(share[slot]), "words": vocab.decode(best)})
    return out


def _gates_line(gates: dict[str, float], share: dict[str, float]) -> str:
    return (
        f"Residual gates, mean |g|: image {gates['image']:.4f}, text {gates['text']:.4f}; the "
        f"memory's share of the vector (mean ‖added‖ / ‖VSE++'s‖): image {share['image']:.2%}, "
        f"text {share['text']:.2%}."
    )


def _slot_line(slot: dict[str, Any]) -> str:
    words = ", ".join(slot["words"])
    return f"- slot {slot['slot']} ({slot['share']:.1%} of word attention): {words}"
